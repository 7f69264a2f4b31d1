"""Answering queries: the ranked answers of each image or text query, as text, JSON and a
picture."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datasets.images import ImageError, load_image
from retrieval.filters import filtered_topk
from retrieval.gallery import Gallery
from retrieval.visualize import result_grid, save_grid, text_tile
from tfcbir import UserError


@dataclass
class Answer:
    rank: int
    score: float
    class_name: str
    path: str  # relative to the gallery's data root
    match: bool | None  # None when the query's class is unknown
    index: int  # the item's position in the gallery


class AnswerCountError(UserError):
    """k answers cannot be given: k < 1, or more than the ``available`` gallery items (the
    gallery's size, less one when each query's own item is left out)."""

    def __init__(self, k: int, available: int, gallery: Gallery):
        self.k, self.available, self.gallery = k, available, gallery
        super().__init__(
            f"{k} answers asked: at least 1 is needed"
            if k < 1
            else f"{k} answers asked of the gallery {gallery.path}, which has {available} "
            "images to answer with"
        )


def check_k(k: int, gallery: Gallery, leave_one_out: bool = False) -> None:
    """AnswerCountError unless 1 <= k <= the gallery's size (less one with ``leave_one_out``)."""
    available = len(gallery) - (1 if leave_one_out else 0)
    if not 1 <= k <= available:
        raise AnswerCountError(k, available, gallery)


def check_r(r: int, gallery: Gallery, leave_one_out: bool = False) -> None:
    """:func:`check_k` in the CLIs' terms (their ``-r``)."""
    try:
        check_k(r, gallery, leave_one_out)
    except AnswerCountError as error:
        if r < 1:
            raise UserError(f"-r {r}: give a number of answers >= 1") from None
        raise UserError(
            f"-r {r} is larger than the gallery {gallery.path} ({error.available} images); "
            f"give -r <= {error.available}"
        ) from None


def rank(
    index,
    gallery: Gallery,
    queries: np.ndarray,
    query_labels: list[int | None],
    r: int,
    exclude: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> list[list[Answer]]:
    """The r best answers (Q lists) of queries (Q, D) whose labels may be unknown (None).
    mask: (N,) bool, the gallery items a filter keeps (:func:`retrieval.filters.filtered_topk`:
    the r best of those, fewer only when fewer match), or a filter pushed to the index's
    engine (:meth:`retrieval.lance_store.LanceIndex.pushed_filter`); None: all."""
    if mask is None:
        scores, indices = index.search(queries, r, exclude)
    elif not isinstance(mask, np.ndarray):  # a filter the index's engine runs (LanceDB)
        scores, indices = index.search_where(queries, r, mask, exclude)
    else:
        scores, indices = filtered_topk(index, queries, r, mask, exclude)
    answers = []
    for row_scores, row_indices, label in zip(scores, indices, query_labels):
        answers.append(
            [
                Answer(
                    rank=i + 1,
                    score=float(s),
                    class_name=gallery.classes[gallery.labels[j]],
                    path=gallery.paths[j],
                    match=None if label is None else bool(gallery.labels[j] == label),
                    index=int(j),
                )
                for i, (s, j) in enumerate(zip(row_scores, row_indices))
                if j >= 0
            ]
        )
    return answers


def table(query: str, query_class: str | None, answers: list[Answer]) -> str:
    lines = [f"query {query}" + (f" (class {query_class})" if query_class else "")]
    lines.append(f"{'rank':>4}  {'score':>8}  {'match':<5}  class / path")
    for a in answers:
        match = "-" if a.match is None else "yes" if a.match else "no"
        lines.append(f"{a.rank:>4}  {a.score:>8.4f}  {match:<5}  {a.class_name} / {a.path}")
    return "\n".join(lines)


def as_json(query: str, query_class: str | None, answers: list[Answer]) -> dict:
    return {"query": query, "class": query_class, "answers": [asdict(a) for a in answers]}


def text_as_json(
    text: str, query_class: str | None, answers: list[Answer], unknown_words: list[str]
) -> dict:
    """A text query's answers: :func:`as_json`'s fields (``query`` is the text) plus
    ``query_text`` and ``unknown_words`` (words the text tower could only read as unknown)."""
    return {
        **as_json(text, query_class, answers),
        "query_text": text,
        "unknown_words": list(unknown_words),
    }


def text_table(text: str, query_class: str | None, answers: list[Answer]) -> str:
    return table(f"text {text!r}", query_class, answers)


def picture(
    query_path: str | Path,
    query_class: str | None,
    answers: list[Answer],
    gallery: Gallery,
    out: Path,
) -> Path:
    """Save the query beside its answers (green frame: same class, red: other, grey: unknown)."""
    query_image = load_image(query_path, max_pixels=64_000_000)
    title = f"{Path(query_path).name}: top {len(answers)} of {len(gallery)}"
    return _grid(query_image, query_class, answers, gallery, out, title)


def text_picture(
    text: str, query_class: str | None, answers: list[Answer], gallery: Gallery, out: Path
) -> Path:
    """Save a text query (its words drawn as the query's tile) beside its answers."""
    title = f"text query: top {len(answers)} of {len(gallery)}"
    return _grid(text_tile(text), query_class, answers, gallery, out, title)


def _grid(query_image, query_class, answers, gallery, out: Path, title: str) -> Path:
    results = []
    root = Path(gallery.data_root)
    for a in answers:
        try:
            image = load_image(root / a.path, max_pixels=64_000_000)
        except ImageError:  # the gallery image moved or broke since embedding: show a blank
            image = np.full((32, 32, 3), 255, np.uint8)
        results.append((image, a.class_name, a.score, a.match))
    grid = result_grid(query_image, results, query_label=query_class, title=title)
    return save_grid(out, grid)
