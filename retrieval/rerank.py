"""Query-time re-ranking: alpha query expansion, database-side augmentation, k-reciprocal.

Each method answers as :mod:`retrieval.search` does: scores (Q, k) float32, higher is better, and
gallery indices (Q, k), best first, ties to the lower gallery index, ``exclude`` leaving items
out of a query's answers (leave-one-out: the query's own item), padding -1 / -inf. A method is
a :class:`RerankSpec` (validated from a config value or a ``--rerank`` flag);
:func:`rerank_index` makes an index of it with ``search(queries, k, exclude, query_items)``, and
:func:`evaluate_reranked` its metrics.

alpha query expansion and database-side augmentation (Radenovic, Tolias and Chum, "Fine-tuning
CNN Image Retrieval with No Human Annotation", TPAMI 2018), on unit vectors (cosine scores s):

- ``alpha_qe``: a query q is searched once, and ``q + sum_{i=1..n} max(s_i, 0)^alpha g_i`` over
  its n best gallery items g_i (the excluded left out), scaled to unit length, is searched again.
  A negative score weighs 0 (its power is undefined); alpha = 0 is average query expansion.
- ``dba``: every gallery vector g becomes ``g + sum_{i=1..n} max(s_i, 0)^alpha g_i`` over its n
  best other gallery items, unit length, and the queries are searched against those.
- ``dba_alpha_qe``: both, alpha-QE against the augmented gallery (one alpha and n for both).

Their answers are an exact search with other vectors, so their metrics are exact at any cut-off
(:func:`evaluate_reranked` runs :func:`retrieval.metrics.evaluate` on the new vectors).

``k_reciprocal`` (Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017). The pool is the gallery and the queries of one call (the
paper ranks probes and gallery in one pool), gallery first; a query that is a gallery item
(``query_items``, leave-one-out) is that item of the pool, with that item's vector. Over the pool:

- d(p, x): the squared Euclidean distance over the largest one from p to the pool (the authors'
  code: d in [0, 1], where lambda = 0.3 and the weights exp(-d) were tuned). The neighbour
  lists, the largest distances and the queries' final d come from the float32 scores of
  :mod:`retrieval.search` (``2 - 2 s`` for unit vectors, ``s^2`` for ``s = -distance``), the
  weights of V from float64 differences of the vectors: equal to within float32 rounding;
- N(p, k): p, then its k nearest other items (ties to the lower pool index, as search ranks);
- R(p, k) = {x in N(p, k) : p in N(x, k)}, the k-reciprocal neighbours;
- R*(p) = R(p, k1) united with R(c, h) for each c in R(p, k1) whose
  ``|R(c, h) & R(p, k1)| >= 2/3 |R(c, h)|`` (the paper's eq. 6; the authors' code has ``>``),
  h = round(k1 / 2) (half to even, NumPy's rounding as in the authors' code);
- V_p: exp(-d(p, x)) for x in R*(p), else 0, scaled to sum 1 (as the authors' code);
- local query expansion: V_p becomes the mean of V_x over the k2 nearest x of p (p included);
- the Jaccard distance d_J(p, g) = 1 - sum_j min(V_pj, V_gj) / sum_j max(V_pj, V_gj);
- the final distance d*(q, g) = (1 - lambda) d_J(q, g) + lambda d(q, g), ascending; the score
  returned is -d* (float32), ties to the lower gallery index.

What this computes without the paper's (Q+G) x (Q+G) matrices (14 GB of float32 for 60,000):
neighbour lists of max(k1, k2 - 1) items per pool item from :class:`ExactIndex`'s blocked search,
each item's largest distance from a blocked pass, and V as sparse rows (|R*| entries), exact for
every pool item they are computed for (the queries, their candidates and those items' k2
nearest). One approximation: only each query's ``candidates`` best gallery items by the original
score are re-ranked by d*. Every other item is given d_J = 1, as if it shared no k-reciprocal
neighbour with the query, so those follow the candidates in their original order (score
``-((1 - lambda) + lambda d)``); the paper gives them their true d_J, which is below 1 exactly
when their expanded V shares an item with the query's. With
``candidates`` >= the gallery's size the ranking is the paper's (``tests/test_rerank.py`` checks
it against a dense implementation of the formulas above).

Memory: the pool's lists and V (O((Q + G) k1) plus the candidates' sparse rows) and blocks of at
most ``memory_mb``. Time: a search of the gallery against itself and a pass for each item's
largest distance once per index; per call, the queries against the pool and the gallery against
the new queries. ``benchmarks/rerank.py`` measures each method at 60,000 images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.metrics import (
    DEFAULT_KS,
    Metrics,
    checked_labels,
    evaluate,
    ranked_metrics,
    relevant_counts,
)
from retrieval.search import (
    DEFAULT_MEMORY_MB,
    EXCLUDED,
    ExactIndex,
    block_rows,
    check_embeddings,
    pair_keys,
    similarity,
)
from tfcbir import UserError
from tfcbir.params import Param, check_value, fmt, validate

#: The re-ranking methods; ``none`` is the plain search.
METHODS = ("none", "alpha_qe", "dba", "dba_alpha_qe", "k_reciprocal")
#: The methods that sum neighbours' vectors, which need unit vectors.
EXPANSIONS = ("alpha_qe", "dba", "dba_alpha_qe")

EXPANSION_PARAMS = {
    "alpha": Param(
        float, 3.0, "A neighbour's weight is its cosine score to the power alpha.", min=0
    ),
    "neighbours": Param(int, 2, "Neighbours summed into each vector (n).", min=1),
}
K_RECIPROCAL_PARAMS = {
    "k1": Param(int, 20, "Neighbours of the k-reciprocal sets R(p, k1).", min=1),
    "k2": Param(int, 6, "Neighbours averaged by the local query expansion.", min=1),
    "lambda": Param(float, 0.3, "Weight of the original distance in the final one.", min=0, max=1),
    "candidates": Param(
        int, 100, "Each query's best gallery items re-ranked (the rest keep their order).", min=1
    ),
}
#: The parameters of each method, with their defaults.
PARAMS = {
    "none": {},
    "alpha_qe": EXPANSION_PARAMS,
    "dba": EXPANSION_PARAMS,
    "dba_alpha_qe": EXPANSION_PARAMS,
    "k_reciprocal": K_RECIPROCAL_PARAMS,
}


@dataclass(frozen=True)
class RerankSpec:
    """A re-ranking method and its parameters (see the module's docstring); ``path`` is where
    it was given (``eval.rerank``, ``--rerank``), for error messages."""

    method: str = "none"
    alpha: float = 3.0
    neighbours: int = 2
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3  # the key "lambda"
    candidates: int = 100
    path: str = "eval.rerank"

    @classmethod
    def parse(cls, value, path: str = "eval.rerank") -> RerankSpec:
        """From a config value: null or ``none`` (no re-ranking), a method's name (its
        defaults), or a mapping ``{method: <name>, <its parameters>}``. UserError names the key
        (``eval.rerank.k1: 0 is below the minimum 1``)."""
        if value is None:
            value = {"method": "none"}
        elif isinstance(value, str):
            value = {"method": value}
        elif not isinstance(value, dict):
            raise UserError(
                f"{path}: {fmt(value)} is neither a method nor a mapping; give one of "
                + ", ".join(METHODS)
                + " or {method: ..., <its parameters>}"
            )
        if "method" not in value:
            raise UserError(f"{path}.method: missing; give one of {', '.join(METHODS)}")
        method = check_value(value["method"], Param(str, choices=METHODS), f"{path}.method")
        params = {key: v for key, v in value.items() if key != "method"}
        for key in params:
            if key not in PARAMS[method]:
                known = ", ".join(["method", *PARAMS[method]])
                raise UserError(f"{path}.{key}: not a parameter of {method}; its keys are {known}")
        checked = validate(params, PARAMS[method], path)
        fields = {("lambda_value" if key == "lambda" else key): v for key, v in checked.items()}
        return cls(method=method, path=path, **fields)

    @classmethod
    def parse_flag(cls, text: str, path: str = "--rerank") -> RerankSpec:
        """From a command-line flag: ``METHOD`` or ``METHOD:KEY=VALUE,KEY=VALUE``, e.g.
        ``k_reciprocal:k1=20,lambda=0.3``."""
        method, _, rest = text.partition(":")
        value: dict = {"method": method.strip()}
        for pair in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, number = pair.partition("=")
            if not equals or not key.strip():
                raise UserError(
                    f"{path}: {text!r} is not METHOD or METHOD:KEY=VALUE,...; e.g. "
                    "k_reciprocal:k1=20,lambda=0.3"
                )
            value[key.strip()] = _flag_value(number.strip())
        return cls.parse(value, path)

    @property
    def active(self) -> bool:
        return self.method != "none"

    def as_config(self) -> dict:
        """The config form: the method and its parameters (JSON-ready, for results files)."""
        values = {"method": self.method}
        for key in PARAMS[self.method]:
            values[key] = getattr(self, "lambda_value" if key == "lambda" else key)
        return values

    def require_unit_vectors(self, normalized: bool) -> None:
        """UserError when the method sums vectors by their cosine scores and the embeddings
        are compared by Euclidean distance."""
        if self.method in EXPANSIONS and not normalized:
            raise UserError(
                f"{self.path}.method: {self.method} weighs neighbours by their cosine score, "
                "but these embeddings are compared by Euclidean distance (a head that does not "
                "normalise); use k_reciprocal or none, or a normalising head (model.head: "
                "direct_normalize)"
            )


def add_rerank_argument(parser) -> None:
    """``--rerank METHOD[:KEY=VALUE,...]`` (read with :func:`flag_spec`)."""
    parser.add_argument(
        "--rerank",
        metavar="METHOD[:KEY=VALUE,...]",
        help="re-rank the answers: none, alpha_qe, dba, dba_alpha_qe or k_reciprocal, e.g. "
        "k_reciprocal:k1=20,lambda=0.3 (default: the config's eval.rerank)",
    )


def flag_spec(text: str | None) -> RerankSpec | None:
    """The re-ranking a ``--rerank`` flag asks for; None when it was not given (the config's
    ``eval.rerank`` then applies). UserError (one line) for a bad one."""
    return None if text is None else RerankSpec.parse_flag(text)


def _flag_value(text: str):
    """A flag's value as the config would hold it: an integer, a number, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# --- the entry points ----------------------------------------------------------------------------


def rerank_index(
    spec: RerankSpec,
    gallery: np.ndarray,
    *,
    normalized: bool,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> ExpansionIndex | KReciprocalIndex:
    """An index of the gallery (N, D) that answers re-ranked by ``spec``; its ``search(queries,
    k, exclude=None, query_items=None)`` returns scores and indices (Q, k) as
    :meth:`retrieval.search.ExactIndex.search`. The gallery's share of the work (DBA's vectors,
    k-reciprocal's neighbour lists) is done here, once."""
    spec.require_unit_vectors(normalized)
    if spec.method == "k_reciprocal":
        return KReciprocalIndex(
            gallery,
            normalized=normalized,
            k1=spec.k1,
            k2=spec.k2,
            lambda_value=spec.lambda_value,
            candidates=spec.candidates,
            memory_mb=memory_mb,
        )
    if spec.method in ("dba", "dba_alpha_qe"):
        gallery = augmented_gallery(
            gallery, alpha=spec.alpha, neighbours=spec.neighbours, memory_mb=memory_mb
        )
    base = ExactIndex(gallery, normalized, memory_mb=memory_mb)
    expanding = spec.method in ("alpha_qe", "dba_alpha_qe")
    return ExpansionIndex(base, spec.alpha, spec.neighbours if expanding else 0)


def rerank(
    spec: RerankSpec,
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    normalized: bool,
    k: int,
    exclude: np.ndarray | None = None,
    query_items: np.ndarray | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery items (N, D) of each query (Q, D), re-ranked by ``spec``: scores (Q, k)
    float32 and indices (Q, k) int64, best first, as :meth:`ExactIndex.search`.

    exclude: None, (Q,) or (Q, M) gallery indices left out of each query's answers (-1: none).
    query_items: (Q,) the gallery index of each query that is a gallery item (-1: none), as in
    leave-one-out, where ``exclude`` is the same array; only k-reciprocal uses it (the query is
    that item of its pool instead of a new one).
    """
    index = rerank_index(spec, gallery, normalized=normalized, memory_mb=memory_mb)
    return index.search(queries, k, exclude, query_items=query_items)


# --- alpha query expansion and database-side augmentation --------------------------------------


def expanded(
    vectors: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray,
    pool: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """Unit rows (B, D) float32 of ``vectors + sum_i max(scores_i, 0)^alpha pool[neighbours_i]``:
    vectors (B, D); neighbours (B, n) indices into pool (N, D) and their scores (B, n), as a
    search returns them (padding -1 weighs nothing). Summed and scaled in float64."""
    total = np.asarray(vectors, dtype=np.float64).copy()
    valid = neighbours >= 0
    weights = np.where(valid, np.maximum(scores, 0.0).astype(np.float64) ** alpha, 0.0)
    for column in range(neighbours.shape[1]):
        total += (
            weights[:, column, None] * pool[np.where(valid[:, column], neighbours[:, column], 0)]
        )
    norms = np.linalg.norm(total, axis=1, keepdims=True)
    return (total / np.maximum(norms, 1e-12)).astype(np.float32)


def augmented_gallery(
    gallery: np.ndarray, *, alpha: float, neighbours: int, memory_mb: float = DEFAULT_MEMORY_MB
) -> np.ndarray:
    """Database-side augmentation of unit vectors (N, D): each one summed with its ``neighbours``
    best other gallery items weighted by score^alpha, unit length (N, D) float32."""
    index = ExactIndex(gallery, True, memory_mb=memory_mb)
    n = min(neighbours, len(index) - 1)
    if n < 1:
        return index.embeddings.copy()
    scores, found = index.search(index.embeddings, n, exclude=np.arange(len(index)))
    return expanded(index.embeddings, found, scores, index.embeddings, alpha)


class ExpansionIndex:
    """Search with alpha query expansion (``neighbours`` >= 1; 0: plain search) against ``base``,
    an :class:`ExactIndex` of the gallery (augmented by DBA or not)."""

    def __init__(self, base: ExactIndex, alpha: float, neighbours: int):
        self.base, self.alpha, self.neighbours = base, alpha, neighbours
        self.normalized = base.normalized

    def __len__(self) -> int:
        return len(self.base)

    def expand(self, queries: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """The queries (Q, D) as searched: alpha-expanded over their best items not excluded."""
        queries = check_embeddings(queries, "queries")
        if not self.neighbours or not len(self.base):
            return queries
        scores, found = self.base.search(queries, min(self.neighbours, len(self.base)), exclude)
        return expanded(queries, found, scores, self.base.embeddings, self.alpha)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
        query_items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`ExactIndex.search` of the expanded queries; query_items is not used."""
        return self.base.search(self.expand(queries, exclude), k, exclude)


# --- k-reciprocal re-ranking ---------------------------------------------------------------------


@dataclass
class Pool:
    """The items k-reciprocal neighbourhoods range over: the gallery, then the new queries."""

    vectors: np.ndarray  # (P, D)
    lists: np.ndarray  # (P, 1 + W) int64: each item itself, then its W nearest other items
    farthest: np.ndarray  # (P,) float64: each item's largest squared distance to the pool
    positions: np.ndarray  # (Q,) int64: each query's item

    def distances(self, owners: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """d: squared distances from items ``owners`` over their rows' largest (0 if all 0)."""
        largest = self.farthest[owners]
        return squared / np.where(largest > 0, largest, 1.0)


class KReciprocalIndex:
    """k-reciprocal re-ranking of an exact search (see the module's docstring).

    gallery: (N, D). The gallery's neighbour lists (``max(k1, k2 - 1)`` others per item) and each
    item's largest distance are computed here, once; each :meth:`search` adds its queries to the
    pool and re-ranks each query's ``candidates`` best items.
    """

    def __init__(
        self,
        gallery: np.ndarray,
        *,
        normalized: bool,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        candidates: int = 100,
        memory_mb: float = DEFAULT_MEMORY_MB,
    ):
        self.index = ExactIndex(gallery, normalized, memory_mb=memory_mb)
        self.normalized, self.memory_mb = self.index.normalized, memory_mb
        self.k1, self.k2, self.lambda_value, self.candidates = k1, k2, lambda_value, candidates
        self.width = max(k1, k2 - 1)  # the others each pool item's list holds
        embeddings = self.index.embeddings
        n_gallery = len(embeddings)
        self._list_scores, self._lists = nearest(
            self.index, embeddings, min(self.width, n_gallery - 1), np.arange(n_gallery)
        )
        self._farthest = farthest_squared(embeddings, embeddings, normalized, memory_mb)[0]

    def __len__(self) -> int:
        return len(self.index)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
        query_items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best gallery items of each query (Q, D), re-ranked: scores (Q, k) float32 (-d*)
        and indices (Q, k) int64, best first, ties to the lower index, padded with -inf / -1.

        exclude: as :meth:`ExactIndex.search`. query_items: (Q,) the gallery index of each query
        that is a gallery item (-1: a new item), e.g. leave-one-out's ``exclude``.
        """
        queries = check_embeddings(queries, "queries")
        if queries.shape[1] != self.index.dim:
            raise ValueError(
                f"queries have dimension {queries.shape[1]}, the gallery {self.index.dim}"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        items = self._query_items(query_items, len(queries))
        if not len(queries):
            return self.index.search(queries, k, exclude)
        pool = self.pool(queries, items)
        scores, found = self.index.search(
            pool.vectors[pool.positions], max(k, self.candidates), exclude
        )
        head = min(self.candidates, found.shape[1])
        encoded, row_of = self._encoded(pool, found[:, :head])
        # Blocks of queries: a few float64 (B, depth) temporaries within the budget.
        step = block_rows(found.shape[1], 40, self.memory_mb)
        for start in range(0, len(found), step):
            block = slice(start, start + step)
            scores[block], found[block] = self._reranked(
                pool, encoded, row_of, pool.positions[block], scores[block], found[block], head
            )
        if k < found.shape[1]:
            return np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(found[:, :k])
        return scores, found

    def _reranked(self, pool, encoded, row_of, positions, scores, found, head):
        """New scores -d* (B, C) float32 and indices (B, C) of a block of queries (pool items
        ``positions`` (B,)) from their plain search (scores, found (B, C)): the first ``head``
        re-ranked, the rest given d_J = 1 (their order kept)."""
        valid = found >= 0
        squared = np.where(valid, squared_distances(scores, self.normalized), 0.0)
        distances = pool.distances(positions[:, None], squared)
        jaccard = np.ones(found.shape)
        rows, columns = np.nonzero(valid[:, :head])
        jaccard[rows, columns] = jaccard_distances(
            encoded, row_of[positions[rows]], row_of[found[rows, columns]], self.memory_mb
        )
        final = (1.0 - self.lambda_value) * jaccard + self.lambda_value * distances
        new_scores = np.where(valid, -final, -np.inf).astype(np.float32)
        new_scores[:, :head], found[:, :head] = best_first(new_scores[:, :head], found[:, :head])
        return new_scores, found

    def _encoded(self, pool: Pool, candidates: np.ndarray) -> tuple[object, np.ndarray]:
        """V after local query expansion (:meth:`expanded_vectors`) of the queries and their
        candidates (Q, C) (-1: none), and the row (P,) of each pool item in it (-1: none)."""
        needed = np.zeros(len(pool.vectors), dtype=bool)
        needed[pool.positions] = True
        needed[candidates[candidates >= 0]] = True
        items = np.flatnonzero(needed)
        row_of = np.full(len(needed), -1, dtype=np.int64)
        row_of[items] = np.arange(len(items))
        return self.expanded_vectors(pool, items), row_of

    def _query_items(self, query_items, n_queries: int) -> np.ndarray:
        if query_items is None:
            return np.full(n_queries, -1, dtype=np.int64)
        items = np.asarray(query_items, dtype=np.int64)
        if items.shape != (n_queries,):
            raise ValueError(f"query_items has shape {items.shape}; expected ({n_queries},)")
        if len(items) and (items.min() < -1 or items.max() >= len(self)):
            raise ValueError(f"query_items holds indices outside [-1, {len(self)})")
        return items

    def pool(self, queries: np.ndarray, query_items: np.ndarray) -> Pool:
        """The gallery with the new queries (``query_items`` -1) added: every item's list of
        nearest others and largest distance, the gallery's merged with the new queries'."""
        gallery = self.index.embeddings
        n_gallery = len(gallery)
        new = np.flatnonzero(query_items < 0)
        positions = query_items.copy()
        positions[new] = n_gallery + np.arange(len(new))
        if not len(new):
            lists, farthest, vectors = self._lists, self._farthest, gallery
        else:
            lists, farthest = self._with_new_items(queries[new])
            vectors = np.concatenate([gallery, queries[new]])
        itself = np.arange(len(vectors), dtype=np.int64)[:, None]
        return Pool(vectors, np.concatenate([itself, lists], axis=1), farthest, positions)

    def _with_new_items(self, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lists (G + E, W) and largest squared distances (G + E,) of the pool of the gallery
        and the new items extras (E, D) (pool indices G..G+E-1)."""
        gallery, n_gallery, n_extra = self.index.embeddings, len(self), len(extras)
        width = min(self.width, n_gallery + n_extra - 1)
        extra_index = ExactIndex(extras, self.normalized, memory_mb=self.memory_mb)
        to_gallery = nearest(self.index, extras, min(width, n_gallery))
        to_extras = nearest(extra_index, extras, min(width, n_extra - 1), np.arange(n_extra))
        from_gallery = nearest(extra_index, gallery, min(width, n_extra))
        extra_lists = merged_top([to_gallery, shifted(to_extras, n_gallery)], width)[1]
        gallery_lists = merged_top(
            [(self._list_scores, self._lists), shifted(from_gallery, n_gallery)], width
        )[1]
        extra_far, gallery_far = farthest_squared(
            extras, gallery, self.normalized, self.memory_mb, columns=True
        )
        extra_far_own = farthest_squared(extras, extras, self.normalized, self.memory_mb)[0]
        farthest = np.concatenate(
            [np.maximum(self._farthest, gallery_far), np.maximum(extra_far, extra_far_own)]
        )
        return np.concatenate([gallery_lists, extra_lists]), farthest

    def expanded_vectors(self, pool: Pool, items: np.ndarray):
        """V after the local query expansion of the pool items (n,) ascending: a CSR matrix
        (n, P), each row the mean of V over the item's k2 nearest (the item included)."""
        import scipy.sparse  # heavy (0.2 s to import), and only k-reciprocal needs it

        k2 = min(self.k2, pool.lists.shape[1])
        nearest_k2 = pool.lists[items, :k2]
        members = np.unique(nearest_k2)
        encoded = self.vectors(pool, members)
        averaging = scipy.sparse.csr_matrix(
            (
                np.ones(nearest_k2.size),
                (
                    np.repeat(np.arange(len(items)), k2),
                    np.searchsorted(members, nearest_k2).ravel(),
                ),
            ),
            shape=(len(items), len(members)),
        )
        result = (averaging @ encoded).tocsr()
        result.data /= k2
        result.sort_indices()
        return result

    def vectors(self, pool: Pool, items: np.ndarray):
        """V of the pool items (n,): a CSR matrix (n, P) float64, row i holding exp(-d) over
        R*(items[i]), scaled to sum 1."""
        import scipy.sparse

        k1_width = min(self.k1, pool.lists.shape[1] - 1) + 1
        half_width = min(int(np.around(self.k1 / 2)), pool.lists.shape[1] - 1) + 1
        # Per row: (k1 + 1)^2 (h + 1) flags and (k1 + 1)(h + 1)^2 int64 of the lists' lists.
        step = max(1, 2**20 // (k1_width * k1_width * half_width))
        counts, indices, data = [], [], []
        for start in range(0, len(items), step):
            owners = items[start : start + step]
            found = reciprocal_sets(pool.lists, owners, k1_width, half_width)
            rows, columns = np.nonzero(found >= 0)
            members = found[rows, columns]
            weights = np.exp(
                -pool.distances(owners[rows], pair_squared(pool.vectors, owners[rows], members))
            )
            weights /= np.bincount(rows, weights, minlength=len(owners))[rows]
            counts.append(np.bincount(rows, minlength=len(owners)))
            indices.append(members)
            data.append(weights)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
        return scipy.sparse.csr_matrix(
            (np.concatenate(data), np.concatenate(indices), indptr),
            shape=(len(items), len(pool.vectors)),
        )


def nearest(
    index: ExactIndex, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`ExactIndex.search`, or empty (Q, 0) scores and indices when k is 0."""
    if k < 1:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return index.search(queries, k, exclude)


def shifted(found: tuple[np.ndarray, np.ndarray], offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Search results (scores, indices) with the indices moved by offset (padding stays -1)."""
    scores, indices = found
    return scores, np.where(indices >= 0, indices + offset, -1)


def merged_top(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (B, k) of several search results (scores, indices) (B, k_i) of the same
    queries over disjoint items, by (score, index) as :func:`retrieval.search.pair_keys`."""
    scores = np.concatenate([part[0] for part in parts], axis=1)
    indices = np.concatenate([part[1] for part in parts], axis=1)
    keys = np.where(indices >= 0, pair_keys(scores, indices), EXCLUDED)
    order = np.argsort(keys, axis=1)[:, ::-1][:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def best_first(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of scores (B, C) float32 and their gallery indices (B, C) (-1: padding, last)
    sorted best first, ties to the lower index."""
    keys = np.where(indices >= 0, pair_keys(scores, indices), EXCLUDED)
    order = np.argsort(keys, axis=1)[:, ::-1]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def squared_distances(scores: np.ndarray, normalized: bool) -> np.ndarray:
    """Squared Euclidean distances (float64) from search scores: ``2 - 2 s`` for unit vectors,
    ``s^2`` for ``s = -distance``; -inf (padding) gives inf."""
    scores = np.asarray(scores, dtype=np.float64)
    if normalized:
        return np.maximum(2.0 - 2.0 * scores, 0.0)
    return scores * scores


def farthest_squared(
    rows: np.ndarray,
    targets: np.ndarray,
    normalized: bool,
    memory_mb: float = DEFAULT_MEMORY_MB,
    columns: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The largest squared distance (n,) float64 from each of rows (n, D) to targets (m, D), by
    blocks of :func:`retrieval.search.similarity`; with ``columns`` also from each target to
    the rows (m,) (else None)."""
    sq_norms = None if normalized else np.einsum("nd,nd->n", targets, targets, dtype=np.float32)
    step = max(1, min(1024, len(rows), block_rows(len(targets), 4, memory_mb)))
    buffer = np.empty((step, len(targets)), dtype=np.float32)  # reused: fresh ones page-fault
    row_lowest = np.empty(len(rows), dtype=np.float32)
    column_lowest = np.full(len(targets), np.inf, dtype=np.float32)
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        scores = similarity(
            block,
            targets,
            normalized=normalized,
            gallery_sq_norms=sq_norms,
            out=buffer[: len(block)],
        )
        row_lowest[start : start + step] = scores.min(axis=1)
        if columns:
            np.minimum(column_lowest, scores.min(axis=0), out=column_lowest)
    return (
        squared_distances(row_lowest, normalized),
        squared_distances(column_lowest, normalized) if columns else None,
    )


def pair_squared(vectors: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n,) float64 between vectors[first] and vectors[second]
    (n,), from their differences (0 for an item and itself), in bounded chunks."""
    out = np.empty(len(first), dtype=np.float64)
    step = max(1, 2**18 // max(1, vectors.shape[1]))  # 2 MiB a float64 temporary
    for start in range(0, len(first), step):
        stop = start + step
        difference = vectors[first[start:stop]].astype(np.float64) - vectors[second[start:stop]]
        out[start:stop] = np.einsum("nd,nd->n", difference, difference)
    return out


def reciprocal_mask(lists: np.ndarray, items: np.ndarray, width: int) -> np.ndarray:
    """(n, width) bool: whether ``lists[items, j]`` (j < width) has items[i] in its own first
    ``width`` entries, i.e. is in R(items[i], width - 1)."""
    forward = lists[items, :width]
    return (lists[forward, :width] == items[:, None, None]).any(axis=2)


def reciprocal_sets(
    lists: np.ndarray, items: np.ndarray, k1_width: int, half_width: int
) -> np.ndarray:
    """R*(p) of the items p (n,): pool indices (n, W) ascending, -1 where none, from the lists
    (P, 1 + w) of each item and its nearest; ``k1_width`` = k1 + 1, ``half_width`` = h + 1."""
    forward = lists[items, :k1_width]  # (n, k1 + 1)
    members = np.where(reciprocal_mask(lists, items, k1_width), forward, -1)  # R(p, k1)
    halves = lists[forward, :half_width]  # (n, k1 + 1, h + 1): N(c, h) of each c
    half_mask = reciprocal_mask(lists, forward.ravel(), half_width).reshape(halves.shape)
    shared = (halves[..., None] == members[:, None, None, :]).any(axis=3) & half_mask
    # R(c, h) joins when at least 2/3 of it is in R(p, k1): 3 |shared| >= 2 |R(c, h)|, exact.
    joins = (members >= 0) & (3 * shared.sum(axis=2) >= 2 * half_mask.sum(axis=2))
    added = np.where(joins[..., None] & half_mask, halves, -1).reshape(len(items), -1)
    found = np.sort(np.concatenate([members, added], axis=1), axis=1)
    repeated = np.zeros(found.shape, dtype=bool)
    repeated[:, 1:] = found[:, 1:] == found[:, :-1]
    found[repeated] = -1
    return found


def jaccard_distances(
    encoded, first: np.ndarray, second: np.ndarray, memory_mb: float = DEFAULT_MEMORY_MB
) -> np.ndarray:
    """``1 - sum min / sum max`` (n,) float64 of the rows ``first`` and ``second`` (n,) of the
    non-negative CSR matrix ``encoded`` (``sum max = sum a + sum b - sum min``), by chunks of
    pairs whose rows take at most about ``memory_mb``."""
    sums = np.asarray(encoded.sum(axis=1)).ravel()
    shared = np.empty(len(first), dtype=np.float64)
    # Per pair: both rows' entries copied (12 bytes each), their minimum and SciPy's
    # temporaries: about 48 bytes an entry, measured.
    entries = 2 * max(1.0, encoded.nnz / max(1, encoded.shape[0]))
    step = max(1, int(memory_mb * 2**20 / (48 * entries)))
    for start in range(0, len(first), step):
        stop = start + step
        smaller = encoded[first[start:stop]].minimum(encoded[second[start:stop]])
        shared[start:stop] = np.asarray(smaller.sum(axis=1)).ravel()
    return 1.0 - shared / (sums[first] + sums[second] - shared)


# --- metrics of re-ranked answers ---------------------------------------------------------------


def evaluate_reranked(
    spec: RerankSpec,
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    normalized: bool,
    exclude: np.ndarray | None = None,
    query_items: np.ndarray | None = None,
    r: int | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    ap_denominator: str = "min_r_g",
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> Metrics:
    """:func:`retrieval.metrics.evaluate`'s metrics (NMI: None) of the answers re-ranked by
    ``spec``; the arguments as there, query_items as :func:`rerank` (leave-one-out: the same
    array as exclude).

    alpha-QE and DBA: ``evaluate`` of the new vectors, exact at any r. k-reciprocal: its ranked
    lists, as deep as the cut-offs and the largest class need (:func:`ranked_metrics`), so it
    needs a cut-off r (UserError otherwise)."""
    index = rerank_index(spec, gallery, normalized=normalized, memory_mb=memory_mb)
    if isinstance(index, ExpansionIndex):
        return evaluate(
            index.expand(queries, exclude),
            query_labels,
            index.base.embeddings,
            gallery_labels,
            normalized=index.normalized,
            exclude=exclude,
            r=r,
            ks=ks,
            ap_denominator=ap_denominator,
            nmi=False,
            memory_mb=memory_mb,
        )
    if r is None:
        raise UserError(
            f"{spec.path}: k_reciprocal re-ranks each query's best answers, so its evaluation "
            "needs a cut-off r (mAP@r)"
        )
    query_labels, gallery_labels = checked_labels(
        query_labels, gallery_labels, len(queries), len(gallery)
    )
    n_relevant = relevant_counts(query_labels, gallery_labels, exclude)
    depth = min(max(r, *ks, int(n_relevant.max(initial=0))), len(gallery))
    _, indices = index.search(queries, depth, exclude, query_items=query_items)
    return ranked_metrics(
        indices,
        query_labels,
        gallery_labels,
        exclude=exclude,
        r=r,
        ks=ks,
        ap_denominator=ap_denominator,
    )
