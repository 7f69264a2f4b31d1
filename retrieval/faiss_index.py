"""Approximate search with FAISS, for galleries of millions of images (faiss-cpu is optional).

A :class:`FaissIndex` is built from a gallery with a FAISS factory string (``IVF4096,Flat``,
``HNSW32``, ``Flat``, ...) and has :class:`retrieval.search.ExactIndex`'s ``search``: scores
(cosine, or negative Euclidean distance) best first, ties to the lower gallery index, ``exclude``,
padding with -1 / -inf.

:func:`build_index` (for embed.py) builds and saves one; :func:`open_index` (for the evaluation
CLIs) opens the index a config names, ``"exact"`` or a factory string. An index is saved beside
its gallery as ``<gallery stem>.faiss``: one HDF5 file holding the serialised
index and what it was built from (the gallery's ``gallery_id``, the factory string, N, D, the
score type), written atomically. Loading refuses an index whose gallery has been re-embedded
since, or that was built with another factory string.

After a gallery update (:func:`retrieval.embedder.update_gallery`), :func:`update_index` makes
its index follow. An index's IDs are always the gallery's rows. An IVF index (``IVF...,Flat``,
``IVF...,PQ...``, on its own: not behind a transform or a refinement stage) and an ``IDMap``
or ``IDMap2`` index take the change in place, keeping their training: the removed and changed
items' IDs are removed (``remove_ids``), the kept items' IDs renumbered to their new rows, and
the new embeddings added with their rows as IDs (``add_with_ids``), so the cost follows the
change (plus one pass over the IDs). Any other index (``Flat``, whose IDs are positions;
``HNSW``, which cannot remove; a transform or ``RFlat`` in front) is built again from the
updated gallery. One log line says which.

Run-time parameters (``search_parameters``, e.g. ``"nprobe=32"`` or ``"efSearch=128"``, set with
``faiss.ParameterSpace``) trade speed for recall. FAISS's own defaults (nprobe=1, efSearch=16)
are too low for a million items, so an index gets :func:`default_parameters` first and the
config's string on top. Measured with ``benchmarks/search.py`` (1M x 128 unit vectors, 1,000
queries, top-10, 2 shared CPU cores; ms: one query at a time through :meth:`FaissIndex.search`):

- ``IVF4096,Flat`` (about 4 sqrt(N) lists): default ``nprobe`` = lists / 64 = 64. Clustered data
  (a Gaussian mixture, like real embeddings): recall@10 0.975 at 1.0 ms (nprobe=16: 0.958 at
  0.4 ms; 256: 0.990 at 3.2 ms). Build 4-6 min (k-means on up to 256 points a list); the index
  holds a copy of the vectors (~700 MiB at its peak beyond the gallery's 512).
- ``HNSW32``: default ``efSearch=256``. Clustered: recall@10 0.967 at 1.4 ms (efSearch=128: 0.955
  at 0.7 ms). Build 5-6 min; vectors plus graph, ~800 MiB beyond the gallery.
- ``IVF4096,PQ32np``: 32 bytes an item (~120 MiB beyond the gallery), but recall@10 stays near
  0.62 whatever nprobe: the codes are too coarse to rank a top 10. Add ``,RFlat`` to re-rank
  (``k_factor_rf``, default 4), at the cost of storing the vectors again. ``np`` skips
  polysemous training, which is slow (minutes more) and unused by a plain search.
- Random unit vectors (no structure, the worst case): no setting reaches recall@10 0.95 within
  2 ms; under 2 ms the best is ~0.22 (IVF nprobe=64), and 4-5 ms buy only 0.37-0.46. Use the
  exact index there: about 3 ms a query in batches of 1,000 (``retrieval.search.ExactIndex``).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from retrieval.gallery import Gallery, UpdateReport, hdf5_value
from retrieval.search import ExactIndex, SearchIndex, check_embeddings, exclusion_mask
from tfcbir import UserError, __version__
from tfcbir.files import atomic_output

INSTALL = "pip install -r requirements-faiss.txt"

#: Default run-time parameters (see the module docstring for what they reach).
PROBED_LISTS = 1 / 64  # nprobe = this share of an IVF index's lists ...
MIN_PROBES = 8  # ... but at least this many
EF_SEARCH = 256  # HNSW candidate list
REFINE_FACTOR = 4  # an RFlat stage re-ranks k * this many candidates


def import_faiss():
    """The faiss module, or a UserError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError(
            f"a FAISS index needs the optional package faiss-cpu; install it with: {INSTALL} "
            "(or use the exact index)"
        ) from None
    return faiss


def default_parameters(index) -> dict[str, int]:
    """The run-time parameters an index gets before the config's: {name: value} for those of
    nprobe, quantizer_efSearch, efSearch, k_factor_rf that apply to it."""
    faiss = import_faiss()
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    defaults = {}
    if "nprobe" in names:
        nlist = faiss.extract_index_ivf(index).nlist
        defaults["nprobe"] = min(nlist, max(MIN_PROBES, round(nlist * PROBED_LISTS)))
        if "quantizer_efSearch" in names:  # an HNSW quantizer must find the lists to probe
            defaults["quantizer_efSearch"] = max(EF_SEARCH, 2 * defaults["nprobe"])
    if "efSearch" in names:
        defaults["efSearch"] = EF_SEARCH
    if "k_factor_rf" in names:
        defaults["k_factor_rf"] = REFINE_FACTOR
    return defaults


def index_path(gallery_path: str | os.PathLike) -> Path:
    """Where the index of a gallery lives: ``<run>/embeddings/<split>.faiss``."""
    return Path(gallery_path).with_suffix(".faiss")


def build_index(gallery: Gallery, factory: str, *, search_parameters: str = "") -> Path:
    """embed.py's step: build a FAISS index of a gallery and save it beside it; returns its path."""
    index = FaissIndex.build(
        gallery.embeddings,
        normalized=gallery.normalized,
        factory=factory,
        search_parameters=search_parameters,
    )
    return index.save(index_path(gallery.path), gallery)


def open_index(
    gallery: Gallery,
    index: str = "exact",
    *,
    search_parameters: str = "",
    config_path: str | os.PathLike | None = None,
) -> SearchIndex:
    """The search index the config names: ``"exact"`` (no files, no faiss) or a FAISS factory
    string, whose index embed.py saved beside the gallery."""
    if index == "exact":
        return ExactIndex(gallery.embeddings, gallery.normalized)
    return FaissIndex.load(
        index_path(gallery.path),
        gallery,
        factory=index,
        search_parameters=search_parameters,
        config_path=config_path,
    )


class FaissIndex:
    """A FAISS index over a gallery (N, D); inner product when normalised, else L2.

    search_parameters: FAISS run-time parameters, e.g. ``"nprobe=16"`` (IVF) or
    ``"efSearch=64"`` (HNSW), trading speed for recall; applied on top of
    :func:`default_parameters`. ``parameters`` holds the ones in force, e.g.
    ``"nprobe=64"`` for ``IVF4096,Flat`` when none are given.
    """

    def __init__(self, index, *, normalized: bool, factory: str, search_parameters: str = ""):
        faiss = import_faiss()
        self.index = index
        self.normalized = bool(normalized)
        self.factory = factory
        self.search_parameters = search_parameters
        space = faiss.ParameterSpace()
        in_force = default_parameters(index)
        for name, value in in_force.items():
            space.set_index_parameter(index, name, value)
        if search_parameters:
            try:
                space.set_index_parameters(index, search_parameters)
            except RuntimeError as error:
                raise UserError(
                    f"FAISS search parameters {search_parameters!r} do not fit {factory}: "
                    f"{_first_line(error)}"
                ) from None
            for item in search_parameters.split(","):
                name, _, value = item.partition("=")
                in_force[name.strip()] = value.strip()
        self.parameters = ",".join(f"{name}={value}" for name, value in in_force.items())

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        *,
        normalized: bool,
        factory: str,
        search_parameters: str = "",
    ) -> FaissIndex:
        """Train (when the index type needs it) and fill an index with embeddings (N, D)."""
        faiss = import_faiss()
        embeddings = check_embeddings(embeddings, "gallery embeddings")
        metric = faiss.METRIC_INNER_PRODUCT if normalized else faiss.METRIC_L2
        try:
            index = faiss.index_factory(embeddings.shape[1], factory, metric)
        except RuntimeError as error:
            raise UserError(
                f"{factory!r} is not a FAISS factory string ({_first_line(error)}); "
                "use e.g. IVF4096,Flat, HNSW32 or Flat"
            ) from None
        if not index.is_trained:
            try:
                index.train(embeddings)
            except RuntimeError as error:  # e.g. fewer gallery items than IVF lists
                raise UserError(
                    f"cannot train the FAISS index {factory} on {len(embeddings)} gallery items "
                    f"({_first_line(error)}); use fewer lists, e.g. "
                    f"IVF{max(1, int(np.sqrt(len(embeddings))))},Flat, or the exact index"
                ) from None
        if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):  # IDs: the gallery's rows
            index.add_with_ids(embeddings, np.arange(len(embeddings), dtype=np.int64))
        else:
            index.add(embeddings)
        return cls(
            index, normalized=normalized, factory=factory, search_parameters=search_parameters
        )

    def __len__(self) -> int:
        return self.index.ntotal

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`retrieval.search.ExactIndex.search`, approximately."""
        queries = check_embeddings(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        exclude = exclusion_mask(exclude, len(queries), len(self))
        # Ask for as many more as may be excluded, then drop them, and one more: whether a tie
        # at the k-th score goes on past what FAISS returned. FAISS keeps the higher indices of
        # such a tie, so the rows where it may are asked again for twice as many.
        fetch = min(k + exclude.shape[1] + 1, len(self))
        scores, indices, unsure = self._top(queries, k, exclude, fetch)
        rows = np.flatnonzero(unsure)
        while len(rows) and fetch < len(self):
            fetch = min(2 * fetch, len(self))
            scores[rows], indices[rows], unsure = self._top(queries[rows], k, exclude[rows], fetch)
            rows = rows[unsure]
        return scores, indices

    def _top(self, queries, k, exclude, fetch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k best (B, k) of FAISS's ``fetch`` best of each query, ranked, and whether each
        row's k-th score ties with the last one fetched (the tie may go on)."""
        scores, indices = self.index.search(queries, fetch)
        if not self.normalized:  # FAISS's L2 is the squared distance
            scores = -np.sqrt(np.maximum(scores, 0.0))
        scores = scores.astype(np.float32, copy=False)
        indices = indices.astype(np.int64, copy=False)
        last, last_found = scores[:, -1].copy(), indices[:, -1] >= 0
        dropped = indices < 0
        if exclude.shape[1]:
            dropped |= (indices[:, :, None] == exclude[:, None, :]).any(axis=2)
        if dropped.any():
            scores = np.where(dropped, -np.inf, scores)
            indices = np.where(dropped, -1, indices)
        # Deterministic order: score descending, then gallery index ascending, -1 last. FAISS's
        # order is that already but for ties: sort only then (a tenth of a ms a single query).
        if not _ranked(scores, indices):
            order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -scores))
            scores = np.take_along_axis(scores, order, axis=1)
            indices = np.take_along_axis(indices, order, axis=1)
        scores, indices = scores[:, :k], indices[:, :k]
        if scores.shape[1] < k:  # k > N: pad as FAISS does
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
        unsure = last_found & (indices[:, -1] >= 0) & (scores[:, -1] == last)
        return scores, indices, unsure

    def save(self, path: str | os.PathLike, gallery: Gallery) -> Path:
        """Write the index atomically with the identity of the gallery it was built from."""
        faiss = import_faiss()
        if len(gallery) != len(self) or gallery.normalized != self.normalized:
            raise ValueError("the index was not built from this gallery")
        path = Path(path)
        with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("index", data=faiss.serialize_index(self.index))
            f.attrs.update(
                {
                    "gallery_id": gallery.gallery_id,
                    "gallery": gallery.path.name,
                    "factory": self.factory,
                    "normalized": self.normalized,
                    "n": len(self),
                    "dim": gallery.dim,
                    "tfcbir_version": __version__,
                }
            )
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        gallery: Gallery,
        *,
        factory: str | None = None,
        search_parameters: str = "",
        config_path: str | os.PathLike | None = None,
    ) -> FaissIndex:
        """Read the index of ``gallery``; refuse (UserError) a missing or stale one, or one of
        another factory string than ``factory`` (when given)."""
        faiss = import_faiss()
        path = Path(path)
        rebuild = (
            f"rebuild it: python embed.py -c {config_path or '<config>'} --split {gallery.split}"
        )
        if not path.is_file():
            raise UserError(f"{path}: no FAISS index there; {rebuild}")
        try:
            with h5py.File(path, "r") as f:
                attrs = {key: hdf5_value(value) for key, value in f.attrs.items()}
                data = f["index"][...]
            index = faiss.deserialize_index(data)
        except (OSError, KeyError, RuntimeError) as error:
            raise UserError(
                f"{path}: not a readable tfcbir FAISS index ({_first_line(error)}); {rebuild}"
            ) from None
        if attrs.get("gallery_id") != gallery.gallery_id or index.ntotal != len(gallery):
            raise UserError(
                f"{path} is stale: it was built from an earlier {attrs.get('gallery', 'gallery')}"
                f" than {gallery.path}; {rebuild}"
            )
        if factory is not None and attrs.get("factory") != factory:
            raise UserError(
                f"{path} was built as {attrs.get('factory')}, the config asks for {factory}; "
                f"{rebuild}"
            )
        return cls(
            index,
            normalized=bool(attrs["normalized"]),
            factory=attrs["factory"],
            search_parameters=search_parameters,
        )


def _ranked(scores: np.ndarray, indices: np.ndarray) -> bool:
    """Whether every row (B, K) is ranked already: scores descending, ties by ascending index
    (rows holding -1 padding count as not ranked)."""
    ahead, behind = scores[:, :-1], scores[:, 1:]
    in_order = (ahead > behind) | ((ahead == behind) & (indices[:, :-1] < indices[:, 1:]))
    return bool(in_order.all()) and not (indices < 0).any()


def _first_line(error: Exception) -> str:
    """FAISS's message without its C++ location prefix ("Error in ... at file:line: ...")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.rsplit(": ", 1)[-1]


def update_index(
    gallery: Gallery, update: UpdateReport, factory: str, *, search_parameters: str = ""
) -> tuple[Path, str]:
    """Make the index beside ``gallery`` (the gallery :func:`retrieval.embedder.update_gallery`
    wrote, as its ``update`` reports) follow the update: in place where the index type allows,
    else built again (see the module docstring). Returns the index path and one line saying
    what was done; an index that is missing, of another factory string or of another gallery
    than the one updated is built again."""
    faiss = import_faiss()
    path = index_path(gallery.path)
    found = _index_attrs(path)
    if found.get("gallery_id") == gallery.gallery_id and found.get("factory") == factory:
        return path, f"index {factory} {path} is up to date"
    reason = _why_rebuild(found, update, factory)
    index = _read_index(faiss, path) if reason is None else None
    if index is None and reason is None:
        reason = "the index file could not be read"
    if index is not None:
        if _renumbers_in_place(faiss, index):
            _apply_update(faiss, index, gallery, update)
            FaissIndex(
                index,
                normalized=gallery.normalized,
                factory=factory,
                search_parameters=search_parameters,
            ).save(path, gallery)
            return path, (
                f"index {factory} {path} updated in place (IDs are gallery rows): "
                f"{update.old_size - len(update.kept_old)} removed, "
                f"{update.new_size - len(update.kept_new)} added"
            )
        reason = f"a {type(index).__name__} cannot remove and renumber items in place"
    build_index(gallery, factory, search_parameters=search_parameters)
    return path, f"index {factory} {path} rebuilt from the updated gallery ({reason})"


def _index_attrs(path: Path) -> dict:
    """The attributes of the index file ``path``; {} when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {key: hdf5_value(value) for key, value in f.attrs.items()}
    except (OSError, KeyError):
        return {}


def _read_index(faiss, path: Path):
    """The FAISS index saved in ``path``, or None when it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return faiss.deserialize_index(f["index"][...])
    except (OSError, KeyError, RuntimeError):
        return None


def _why_rebuild(found: dict, update: UpdateReport, factory: str) -> str | None:
    """Why the index found (its attributes) cannot follow the update; None when it can."""
    if not found:
        return "there was no readable index"
    if found.get("factory") != factory:
        return f"it was built as {found.get('factory')}"
    if found.get("gallery_id") != update.old_gallery_id or found.get("n") != update.old_size:
        return "it was not of the gallery before the update"
    return None


def _renumbers_in_place(faiss, index) -> bool:
    """Whether ``index`` can remove IDs, renumber the rest and add with IDs: an IVF index whose
    lists are in memory and that keeps no direct map, or an IDMap/IDMap2 around a flat index
    (around anything else, the inner index's own positions would not follow a removal)."""
    if isinstance(index, faiss.IndexIVF):
        lists = faiss.downcast_InvertedLists(index.invlists)
        return isinstance(lists, faiss.ArrayInvertedLists) and index.direct_map.no()
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        return isinstance(inner, faiss.IndexFlat)
    return False


def _apply_update(faiss, index, gallery: Gallery, update: UpdateReport) -> None:
    """Remove the old rows not kept, renumber the kept ones to their new rows, add the new rows'
    embeddings with their rows as IDs."""
    renumber = np.full(update.old_size, -1, np.int64)
    renumber[update.kept_old] = update.kept_new
    index.remove_ids(np.flatnonzero(renumber < 0).astype(np.int64))
    if isinstance(index, faiss.IndexIVF):
        lists = faiss.downcast_InvertedLists(index.invlists)
        for number in range(index.nlist):
            size = lists.list_size(number)
            if size:  # the list's IDs, as a writable view of FAISS's memory
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
                ids[:] = renumber[ids]
    else:
        ids = faiss.vector_to_array(index.id_map)
        faiss.copy_array_to_vector(renumber[ids], index.id_map)
        if isinstance(index, faiss.IndexIDMap2):
            index.construct_rev_map()
    added = np.setdiff1d(np.arange(len(gallery)), update.kept_new)
    if len(added):
        index.add_with_ids(gallery.embeddings[added], added.astype(np.int64))
