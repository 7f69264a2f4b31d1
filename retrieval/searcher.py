"""One long-lived search: a run's model, gallery and index, loaded once, answering batches of queries.

``Searcher.open(config)`` loads the embedding model (:func:`retrieval.embedder.load_embedder`),
the gallery of the config's protocol (:func:`retrieval.evaluate.open_gallery`: refused unless
fresh) and its index (:func:`retrieval.faiss_index.open_index`: exact or FAISS). Its methods take
batches of queries and give one :class:`Result` per query, its answers ranked by
:func:`retrieval.answers.rank`:

- :meth:`Searcher.search_files`: image files (streamed in batches; unreadable ones skipped);
- :meth:`Searcher.search_bytes`: encoded images, e.g. uploads (decoded in memory);
- :meth:`Searcher.search_images`: decoded ``(H, W, 3)`` uint8 arrays;
- :meth:`Searcher.search_gallery`: gallery items by index ("more like this"), each left out of
  its own answers as in leave-one-out;
- :meth:`Searcher.search_text`: words, for a model with a text tower (:attr:`Searcher.has_text`).

Scores are those of the index (cosine for a normalised gallery, clipped into [-1, 1]; negative
Euclidean distance otherwise). :meth:`Searcher.reopen` gives a Searcher over the gallery file as
it is now with the same models (a service swaps to it when the gallery is re-embedded).

cbir.py, test.py and serve.py are its front ends. Its errors (UserError and its kinds
:class:`~retrieval.answers.AnswerCountError`, :class:`GalleryIndexError`,
:class:`datasets.images.ImageError`) say what is wrong; each front end says how to fix it in its
own terms. A Searcher may be shared by threads: the model and the index are used under one lock,
images are decoded outside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.images import DEFAULT_MAX_PIXELS, fit_image, load_and_fit
from retrieval import answers, sets
from retrieval.answers import Answer
from retrieval.embedder import load_embedder, load_text_encoder, no_text_tower_error
from retrieval.evaluate import open_gallery
from retrieval.faiss_index import open_index
from retrieval.filters import METADATA_FILE, Columns, parse_filter, read_metadata
from retrieval.gallery import Gallery
from retrieval.lance_gallery import lance_stamp, open_lance_index, store_of, uses_lancedb
from retrieval.rerank import RerankSpec, rerank_index
from retrieval.text_queries import open_text_gallery
from runs.weights import has_text_tower, model_source
from tfcbir import UserError

log = logging.getLogger("tfcbir")


@dataclass
class Result:
    """One query's answers. ``query``: what was asked (a path, an upload's name, a gallery path,
    a text); ``query_class``: its class where known (None otherwise; answers then have
    ``match`` None); ``position``: the query's place in the batch it was asked in;
    ``query_index``: its gallery position when it is a gallery item."""

    query: str
    query_class: str | None
    answers: list[Answer]
    position: int = 0
    query_index: int | None = None
    kind: str = "image"  # or "gallery" (search_gallery), "text" (search_text)
    unknown_words: list[str] = field(default_factory=list)  # a text's, read as unknown

    def as_json(self) -> dict:
        """cbir.py --json's record of the query (:func:`retrieval.answers.as_json`, or
        :func:`retrieval.answers.text_as_json` for a text)."""
        if self.kind == "text":
            return answers.text_as_json(
                self.query, self.query_class, self.answers, self.unknown_words
            )
        return answers.as_json(self.query, self.query_class, self.answers)

    def table(self) -> str:
        if self.kind == "text":
            return answers.text_table(self.query, self.query_class, self.answers)
        return answers.table(self.query, self.query_class, self.answers)


def _search_index(config: dict, gallery: Gallery, index, config_path, rerank):
    """The gallery's index: a re-ranking's (``rerank``, else the config's ``eval.rerank``), the
    engine's for a LanceDB gallery, or the exact or FAISS index ``index`` (default:
    ``index.type``)."""
    rerank = rerank or RerankSpec.parse(config["eval"]["rerank"])
    index = index or config["index"]["type"]
    if uses_lancedb(config) and not rerank.active:
        return open_lance_index(config, gallery)
    if rerank.active:
        if index != "exact":
            log.info(
                "re-ranking (%s) searches the gallery exactly, not its %s index",
                rerank.method,
                index,
            )
        return rerank_index(rerank, gallery.embeddings, normalized=gallery.normalized)
    return open_index(
        gallery,
        index,
        search_parameters=config["index"]["search_parameters"],
        config_path=config_path,
    )


class GalleryIndexError(UserError):
    """A gallery position that does not exist."""

    def __init__(self, index, size: int):
        self.index, self.size = index, size
        super().__init__(
            f"there is no gallery item {index}: the gallery has {size} items, 0 to {size - 1}"
        )


@dataclass(frozen=True)
class _Opening:
    """How :meth:`Searcher.open` found its gallery and index: to find them again."""

    gallery: str  # the set's name
    index: str | None
    checkpoint: str | Path | None
    config_path: str | Path | None
    rerank: RerankSpec | None = None

    def gallery_and_index(self, config: dict, embedder, text_encoder, made):
        """The gallery (checked against the models' weights) and its index."""
        # The weights' hash checks the gallery (that of their files when no model is loaded);
        # with a text tower, the towers it records and its dimension too.
        if text_encoder is not None:
            found = open_text_gallery(
                config, self.gallery, text_encoder, self.config_path, self.checkpoint, made
            )
        else:
            model_id = embedder.model_id if embedder is not None else None
            found = open_gallery(
                config, self.gallery, self.config_path, model_id, self.checkpoint, made
            )
        search_index = _search_index(config, found, self.index, self.config_path, self.rerank)
        return found, search_index


class Searcher:
    """A run's model, gallery and index (see the module docstring). Build it with
    :meth:`open`. ``embedder``: the image model (:class:`retrieval.embedder.Embedder`), None
    when only text queries are to be answered; ``text_encoder``: the model's text tower (an
    object with ``embed(texts) -> (B, D)``), None when it has none or it is not wanted."""

    def __init__(
        self,
        config: dict,
        embedder,
        gallery: Gallery,
        index,
        *,
        protocol: sets.Protocol | None = None,
        text_encoder=None,
    ):
        self.config = config
        self.embedder = embedder
        self.gallery = gallery
        self.index = index
        self.protocol = protocol or sets.protocol(config)
        self.text_encoder = text_encoder
        self._lock = threading.RLock()  # around the model and the index
        self._opening: _Opening | None = None  # how open() found the gallery: for reopen()
        self._positions = {path: i for i, path in enumerate(gallery.paths)}
        self._metadata: Columns | None = None  # read on the first filtered query
        self._table = None  # a LanceDB gallery's store, for table_stamp

    @classmethod
    def open(
        cls,
        config: dict,
        *,
        gallery: str | None = None,
        index: str | None = None,
        checkpoint: str | Path | None = None,
        config_path: str | Path | None = None,
        images: bool = True,
        text: bool | None = None,
        rerank: RerankSpec | None = None,
    ) -> Searcher:
        """Load ``config``'s model (its best weights, or ``checkpoint``), the gallery of set
        ``gallery`` (default: the protocol's gallery) and its index (``index``: ``"exact"`` or
        the FAISS factory string embed.py built; default: the config's ``index.type``).
        ``config_path`` names the config in the commands that errors suggest.

        images: load the image model (else only gallery and text queries can be answered);
        text: load the text tower too (UserError for a model without one); default: when the
        model has one. rerank: how answers are re-ranked (default: the config's
        ``eval.rerank``); a re-ranking searches its own exact index, not a FAISS one."""
        made = sets.splits(config) if sets.needs_splits(config, gallery or "gallery") else None
        protocol = sets.protocol(config, made)  # the data set's split read once, passed on
        name = gallery or protocol.gallery
        if text is None:
            text = has_text_tower(config)
        if text and not has_text_tower(config):
            raise no_text_tower_error(config)
        source = model_source(config, checkpoint) if text or images else None  # resolved once
        text_encoder = load_text_encoder(config, checkpoint, source) if text else None
        embedder = load_embedder(config, checkpoint, source) if images else None
        opening = _Opening(name, index, checkpoint, config_path, rerank)
        found, search_index = opening.gallery_and_index(config, embedder, text_encoder, made)
        searcher = cls(
            config, embedder, found, search_index, protocol=protocol, text_encoder=text_encoder
        )
        searcher._opening = opening
        return searcher

    def reopen(self) -> Searcher:
        """A new Searcher over the gallery as its file is now (e.g. re-embedded) and its index,
        with this one's options; this one is left as it is (a service swaps to the new one).
        The models are kept unless the run's weights changed (retrained, then re-embedded):
        then they are loaded again, as :meth:`open` does. UserError as :meth:`open` (a stale
        gallery, an index of another gallery); ValueError for a Searcher not made by
        :meth:`open`."""
        if self._opening is None:
            raise ValueError("only a Searcher made by Searcher.open can be reopened")
        config = self.config
        name = self._opening.gallery
        loaded = self.text_encoder or self.embedder
        if loaded is not None:
            weights = model_source(config, self._opening.checkpoint)
            if weights.model_id != loaded.model_id:  # new weights: load them
                return type(self).open(
                    config,
                    gallery=name,
                    index=self._opening.index,
                    checkpoint=self._opening.checkpoint,
                    config_path=self._opening.config_path,
                    images=self.embedder is not None,
                    text=self.text_encoder is not None,
                )
        made = sets.splits(config) if sets.needs_splits(config, name) else None
        found, search_index = self._opening.gallery_and_index(
            config, self.embedder, self.text_encoder, made
        )
        searcher = type(self)(
            config,
            self.embedder,
            found,
            search_index,
            protocol=self.protocol,
            text_encoder=self.text_encoder,
        )
        searcher._opening = self._opening
        return searcher

    def __len__(self) -> int:
        return len(self.gallery)

    def table_stamp(self) -> tuple | None:
        """For a LanceDB gallery opened by :meth:`open`: its record's table version and
        gallery id, which change with every write (None when it cannot be read now); None
        for an HDF5 gallery."""
        if self._opening is None or not uses_lancedb(self.config):
            return None
        if self._table is None:  # connected once: a live service asks every few seconds
            try:
                self._table = store_of(self.config, self._opening.gallery)
            except UserError:
                return None
        return lance_stamp(self._table)

    @property
    def can_reopen(self) -> bool:
        """Whether :meth:`reopen` can find the gallery again (made by :meth:`open`)."""
        return self._opening is not None

    @property
    def has_text(self) -> bool:
        """Whether the model has a text tower, so :meth:`search_text` can answer."""
        return self.text_encoder is not None

    # --- what the gallery holds ---------------------------------------------------------------

    def check_k(self, k: int, *, leave_one_out: bool = False) -> None:
        """AnswerCountError unless 1 <= k <= the gallery's size (less one with leave_one_out)."""
        answers.check_k(k, self.gallery, leave_one_out)

    def check_index(self, index: int) -> int:
        """``index`` as an int; GalleryIndexError unless 0 <= index < len(gallery)."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise GalleryIndexError(index, len(self))
        if not 0 <= index < len(self):
            raise GalleryIndexError(index, len(self))
        return int(index)

    def position(self, path: str) -> int | None:
        """The gallery position of the item at ``path`` (relative to the data root), or None."""
        return self._positions.get(path)

    def image_file(self, index: int) -> Path:
        """Gallery item ``index``'s image file (GalleryIndexError for a position not in it)."""
        return Path(self.gallery.data_root) / self.gallery.paths[self.check_index(index)]

    def class_of(self, index: int) -> str:
        return self.gallery.classes[int(self.gallery.labels[self.check_index(index)])]

    def known_class(self, path: str | Path) -> int | None:
        """The label of a query file inside a class folder of the gallery's data set, else None."""
        try:
            Path(path).resolve().relative_to(Path(self.gallery.data_root).resolve())
        except ValueError:
            return None
        folder = Path(path).parent.name
        return self.gallery.classes.index(folder) if folder in self.gallery.classes else None

    # --- metadata filters ---------------------------------------------------------------------

    def metadata(self) -> Columns:
        """The gallery items' attributes: the columns of ``<data root>/metadata.csv`` (read
        once, aligned to the gallery's paths; missing values for items without a row) and
        ``class``, each item's class, unless the file has a column of that name."""
        if self._metadata is None:
            found = Path(self.gallery.data_root) / METADATA_FILE
            columns = read_metadata(found, list(self.gallery.paths)) if found.is_file() else {}
            columns.setdefault(
                "class", np.array(self.gallery.classes, dtype=object)[self.gallery.labels]
            )
            self._metadata = Columns(columns)
        return self._metadata

    def where_mask(self, where: str | None, label: str = "--where"):
        """(N,) bool: the gallery items the filter expression ``where`` keeps (see
        :mod:`retrieval.filters`); None without one; for an index that filters in its engine
        (a LanceDB table), the expression as it runs there (``filters_in_engine``). UserError
        (one line) for a malformed expression, an unknown column or a comparison of the wrong
        kind; ``label`` names the expression's field in it (``--where``, ``where``)."""
        if where is None or not where.strip():
            return None
        expression = parse_filter(where, label=label)
        if getattr(self.index, "filters_in_engine", False):
            return self.index.pushed_filter(expression)
        return expression.mask(self.metadata())

    # --- queries ------------------------------------------------------------------------------

    def search_files(
        self,
        paths: Sequence[str | Path],
        k: int,
        *,
        labels: Sequence[int | None] | None = None,
        exclude: Sequence[int | None] | None = None,
        batch_size: int = 64,
        on_error: Callable[[int, str], None] | None = None,
        where: str | None = None,
    ) -> Iterator[Result]:
        """Results of image files, in order, batch by batch as they are embedded; a file that
        cannot be read is skipped (``on_error(position, message)``, and a warning).

        labels: each query's label (None: unknown); default: :meth:`known_class` of its path.
        exclude: each query's gallery position to leave out of its answers (None: none), e.g.
        the query itself in a leave-one-out protocol. where: a filter on the gallery's metadata
        (:meth:`where_mask`); the answers are the k best of the items it keeps.
        """
        self.check_k(k, leave_one_out=exclude is not None and any(e is not None for e in exclude))
        mask = self.where_mask(where)
        paths = [str(p) for p in paths]
        if labels is None:
            labels = [self.known_class(p) for p in paths]
        embedder = self._image_model()
        batches = embedder.embed_files(paths, batch_size=batch_size, on_error=on_error)
        while True:
            with self._lock:  # the forward pass runs inside next()
                batch = next(batches, None)
                if batch is None:
                    return
                positions, embeddings = batch
                batch_labels = [labels[i] for i in positions]
                left_out = None if exclude is None else [exclude[i] for i in positions]
                ranked = self._rank(embeddings, batch_labels, k, left_out, mask)
            for i, label, found in zip(positions, batch_labels, ranked):
                yield Result(paths[i], self._class_name(label), found, position=int(i))

    def search_bytes(
        self,
        images: Sequence[bytes],
        k: int,
        *,
        names: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        where: str | None = None,
    ) -> list[Result]:
        """Results of encoded images (e.g. uploads: JPEG, PNG, ... as bytes), decoded in memory as
        files are (the same pixels as :meth:`search_files` of the same file, hence the same
        answers). ``names`` name them in the results and errors. ImageError for one that
        cannot be decoded or has more than ``max_pixels`` pixels; nothing is searched then."""
        self.check_k(k)
        mask = self.where_mask(where)
        embedder = self._image_model()
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        pixels = [
            load_and_fit(
                data,
                embedder.image_size,
                embedder.resize,
                max_pixels=max_pixels,
                name=name,
            )
            for data, name in zip(images, names)
        ]
        return self._search_pixels(pixels, names, k, mask)

    def search_images(
        self,
        images: Sequence[np.ndarray],
        k: int,
        *,
        names: Sequence[str] | None = None,
        where: str | None = None,
    ) -> list[Result]:
        """Results of decoded images, each ``(H, W, 3)`` uint8 of any size (fitted to the
        model's input as files are: :func:`datasets.images.fit_image`)."""
        self.check_k(k)
        mask = self.where_mask(where)
        embedder = self._image_model()
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        pixels = [fit_image(image, embedder.image_size, embedder.resize) for image in images]
        return self._search_pixels(pixels, names, k, mask)

    def search_gallery(
        self, indices: Sequence[int], k: int, *, where: str | None = None
    ) -> list[Result]:
        """ "More like this": results of gallery items (positions), each searched with its stored
        embedding and left out of its own answers (as leave-one-out evaluation does)."""
        self.check_k(k, leave_one_out=True)
        mask = self.where_mask(where)
        indices = [self.check_index(i) for i in indices]
        labels = [int(self.gallery.labels[i]) for i in indices]
        with self._lock:
            ranked = self._rank(self.gallery.embeddings[indices], labels, k, indices, mask)
        return [
            Result(
                self.gallery.paths[i],
                self._class_name(label),
                found,
                position=n,
                query_index=i,
                kind="gallery",
            )
            for n, (i, label, found) in enumerate(zip(indices, labels, ranked))
        ]

    def search_text(
        self,
        texts: Sequence[str],
        k: int,
        *,
        labels: Sequence[int | None] | None = None,
        where: str | None = None,
    ) -> list[Result]:
        """Results of text queries, embedded by the model's text tower (UserError for a model
        without one, or an empty text). labels: each text's class where known (e.g. an image's
        caption), else None; each result names the words the tower could only read as unknown.
        """
        if not self.has_text:
            raise self._no_text_error()
        self.check_k(k)
        texts = [" ".join(str(text).split()) for text in texts]
        if any(not text for text in texts):
            raise UserError("an empty text query: there are no words to search with")
        labels = list(labels) if labels is not None else [None] * len(texts)
        mask = self.where_mask(where)
        with self._lock:
            embeddings = self.text_encoder.embed(texts)
            ranked = self._rank(embeddings, labels, k, mask=mask)
        return [
            Result(
                text,
                self._class_name(label),
                found,
                position=n,
                kind="text",
                unknown_words=list(self.text_encoder.unknown_words(text)),
            )
            for n, (text, label, found) in enumerate(zip(texts, labels, ranked))
        ]

    # --- helpers ------------------------------------------------------------------------------

    def _search_pixels(
        self, pixels: list[np.ndarray], names: list[str], k: int, mask: np.ndarray | None
    ) -> list[Result]:
        if not pixels:
            return []
        self._image_model()
        with self._lock:
            embeddings = self.embedder.embed_pixels(np.stack(pixels))
            ranked = self._rank(embeddings, [None] * len(pixels), k, mask=mask)
        return [
            Result(name, None, found, position=n)
            for n, (name, found) in enumerate(zip(names, ranked))
        ]

    def _rank(
        self,
        embeddings: np.ndarray,
        labels: list[int | None],
        k: int,
        exclude: Sequence[int | None] | None = None,
        mask: np.ndarray | None = None,
    ) -> list[list[Answer]]:
        left_out = None
        if exclude is not None:
            left_out = np.array([-1 if e is None else int(e) for e in exclude], np.int64)
        ranked = answers.rank(self.index, self.gallery, embeddings, labels, k, left_out, mask)
        if self.gallery.normalized:
            # A cosine is at most 1; float32 rounding of unit vectors gives 1.0000001.
            for answer in (a for found in ranked for a in found):
                answer.score = min(max(answer.score, -1.0), 1.0)
        return ranked

    def _class_name(self, label: int | None) -> str | None:
        return None if label is None else self.gallery.classes[label]

    def _no_text_error(self) -> UserError:
        """Why text queries cannot be answered: the model has no text tower, or this Searcher
        was opened without the one it has (``Searcher.open(..., text=False)``)."""
        if has_text_tower(self.config):
            return UserError(
                f"this search was opened without the text tower of run {self.config['name']} "
                "(text=False), so it cannot answer text queries; open it with text=True"
            )
        return no_text_tower_error(self.config)

    def _image_model(self):
        if self.embedder is None:
            raise ValueError("this Searcher was opened without its image model (images=False)")
        return self.embedder
