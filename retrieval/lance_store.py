"""LanceDB galleries: a gallery in one Lance table, searched, filtered and updated in the engine.

With ``index.backend: lancedb`` a gallery lives in a LanceDB database (``index.uri``: a local
folder, or an object-store URI such as ``s3://bucket/galleries`` that many readers share) instead
of an HDF5 file. Each gallery is one data table, ``<run>-<set>``, one row per image:

- ``path`` (relative to the data root; the key of upserts), ``class`` (its class name),
  ``item`` (its position in the image list when it was written), ``vector`` (D float32);
- ``file_size``, ``file_mtime`` (ns) and ``file_sha256`` (null unless ``--verify``): the file
  as it was embedded, what :func:`retrieval.gallery.plan_update` compares;
- ``embedded_by``: the model and config that embedded the row (:func:`model_key`), so that
  parts written by several workers can be checked to come from one model;
- ``m0``, ``m1``, ...: the columns of ``<root>/metadata.csv`` (:class:`Metadata`), where
  filters are pushed down (:meth:`LanceIndex.search_where`).

What a table is of is one row of the database's ``tfcbir_galleries`` table, keyed by the data
table's name: the :class:`~retrieval.gallery.GalleryIdentity` and the rest of an HDF5
gallery's attributes, the metadata columns, the index, and ``table_version``: the data table's
version the record describes. A reader checks out that version, so it sees the rows and the
identity of one finished write, never a write in progress (``embed.py --update`` or a worker's
part); the record is written last, after the rows and the index. Workers of ``embed.py --shard
i/n`` upsert their rows into the one table and each records its part (``<table>#part-i-of-n``);
the worker that finds every part recorded with one identity finishes the gallery (stale rows
dropped, index built, record written): no merge step.

The vectors are not read until something needs them all (:class:`LazyVectors`: an evaluation,
a re-ranking); a search asks the engine (:class:`LanceIndex`: exact without an ANN index,
else IVF-PQ, IVF-HNSW-SQ, ... with ``index.search_parameters`` such as ``nprobes=20``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from retrieval.filters import Columns, Filter, sql_literal
from retrieval.gallery import FileStats, Gallery, GalleryIdentity, check_identity
from retrieval.search import check_embeddings, exclusion_mask
from tfcbir import UserError, __version__
from tfcbir.text import one_line

log = logging.getLogger("tfcbir")

FORMAT_VERSION = 1
RECORDS = "tfcbir_galleries"  # the table of gallery records, one per data table
#: ANN index parameters (``index.build_parameters``), each an int, passed to ``create_index``.
BUILD_PARAMETERS = (
    "num_partitions",
    "num_sub_vectors",
    "num_bits",
    "max_iterations",
    "sample_rate",
    "m",
    "ef_construction",
)
#: Search parameters (``index.search_parameters``), each an int.
SEARCH_PARAMETERS = ("nprobes", "refine_factor", "ef")
#: A column of each kind of metadata, empty: what a filter is checked against.
_EMPTY = {
    "number": lambda: np.zeros(0, np.float64),
    "date": lambda: np.zeros(0, "datetime64[D]"),
    "boolean": lambda: np.zeros(0, bool),
    "text": lambda: np.zeros(0, object),
}
#: Fetch at most this many rows' vectors by path; past it, read the whole column.
_FETCH_ROWS = 4096


def import_lancedb():
    """The lancedb module, its Rust logs kept to errors; UserError when it is not installed."""
    os.environ.setdefault("LANCE_LOG", "error")
    os.environ.setdefault("LANCEDB_LOG", "error")
    # lancedb registers a converter for HuggingFace's `datasets` when a module of that name is
    # loaded, and imports HF classes from it: ours (tfcbir's datasets/) is hidden meanwhile.
    ours = sys.modules.pop("datasets", None)
    try:
        import lancedb
    except ImportError:
        raise UserError(
            "index.backend lancedb needs the lancedb package: pip install -r "
            "requirements-lancedb.txt"
        ) from None
    finally:
        if ours is not None:
            sys.modules["datasets"] = ours
    return lancedb


def engine_message(error: BaseException) -> str:
    """A LanceDB error on one line (:func:`tfcbir.text.one_line`), without the Rust source
    locations the engine appends."""
    return one_line(RuntimeError(re.sub(r",? */\S+\.rs:\d+:\d+", "", str(error))), 300)


def parse_parameters(text: str, allowed: Sequence[str], key: str) -> dict[str, int]:
    """``"a=1,b=2"`` as ``{"a": 1, "b": 2}``; UserError (one line naming ``key``) for a name
    not in ``allowed`` or a value that is not an integer."""
    found: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = (s.strip() for s in item.partition("="))
        if name not in allowed or not equals:
            raise UserError(
                f"{key}: {item!r} is not one of {', '.join(f'{a}=<n>' for a in allowed)}"
            )
        try:
            found[name] = int(value)
        except ValueError:
            raise UserError(f"{key}: {name} must be an integer; got {value!r}") from None
    return found


def connect(uri: str):
    """The LanceDB database at ``uri``; UserError (one line) when it cannot be reached."""
    lancedb = import_lancedb()
    try:
        if "://" not in uri:
            Path(uri).mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(uri)
        db.list_tables()  # an object store is only reached on the first request
    except Exception as error:  # noqa: BLE001 - any failure to reach it is the user's to fix
        raise UserError(
            f"index.uri {uri}: cannot open the LanceDB database ({engine_message(error)}); check "
            "the URI, the network and the credentials (AWS_*, GOOGLE_*, AZURE_* variables)"
        ) from None
    return db


def model_key(identity: GalleryIdentity) -> str:
    """The short hash of the model and config of an identity: each row's ``embedded_by``."""
    text = f"{identity.model_id}\n{identity.config_hash}\n{identity.model_step}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Metadata:
    """Per-image attributes to store with a gallery: ``columns`` name -> (N,) array aligned to
    the rows (as :func:`retrieval.filters.read_metadata` gives them), ``source``: the hash of
    the file they came from ("" when none)."""

    columns: dict
    source: str = ""

    def kinds(self) -> list[dict]:
        """One entry per column: its name, its table column (``m0``, ...) and its kind."""
        return [
            {"name": name, "column": f"m{i}", "kind": Columns(self.columns).column(name).kind}
            for i, name in enumerate(self.columns)
        ]

    def subset(self, rows: np.ndarray) -> Metadata:
        return Metadata({k: np.asarray(v)[rows] for k, v in self.columns.items()}, self.source)


def _arrow_column(values: np.ndarray, kind: str):
    import pyarrow as pa

    if kind == "number":
        return pa.array(np.asarray(values, np.float64), pa.float64(), from_pandas=True)
    if kind == "date":
        return pa.array(np.asarray(values, "datetime64[D]"), pa.date32(), from_pandas=True)
    present = [None if v is None or v != v else v for v in values]
    return pa.array(present, pa.bool_() if kind == "boolean" else pa.string())


@dataclass(frozen=True)
class Rows:
    """Gallery rows to write: paths (N,), class names (N,), items (N,) int64, vectors (N, D),
    their files' stats and metadata (aligned to the rows) and who embedded them."""

    paths: list[str]
    class_names: list[str]
    items: np.ndarray
    vectors: np.ndarray
    files: FileStats | None
    metadata: Metadata | None
    embedded_by: str

    @classmethod
    def of_gallery(cls, gallery: Gallery, metadata: Metadata | None, items=None) -> Rows:
        return cls(
            list(gallery.paths),
            gallery.class_names(),
            np.arange(len(gallery)) if items is None else np.asarray(items, np.int64),
            np.asarray(gallery.embeddings, np.float32),
            gallery.files,
            metadata,
            model_key(gallery.identity),
        )

    def subset(self, rows: np.ndarray) -> Rows:
        return Rows(
            [self.paths[i] for i in rows],
            [self.class_names[i] for i in rows],
            self.items[rows],
            self.vectors[rows],
            None if self.files is None else self.files.subset(rows),
            None if self.metadata is None else self.metadata.subset(rows),
            self.embedded_by,
        )

    def table(self):
        """The rows as a pyarrow Table of the data table's schema."""
        import pyarrow as pa

        n, dim = self.vectors.shape
        files = self.files or FileStats(np.full(n, -1, np.int64), np.full(n, -1, np.int64))
        sha = None if files.sha256 is None else [bytes(row) for row in files.sha256]
        columns = {
            "path": pa.array(self.paths, pa.string()),
            "class": pa.array(self.class_names, pa.string()),
            "item": pa.array(self.items, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(self.vectors).ravel(), pa.float32()), dim
            ),
            "file_size": pa.array(files.sizes, pa.int64()),
            "file_mtime": pa.array(files.mtimes, pa.int64()),
            "file_sha256": pa.array(sha if sha is not None else [None] * n, pa.binary()),
            "embedded_by": pa.array([self.embedded_by] * n, pa.string()),
        }
        if self.metadata is not None:
            for entry in self.metadata.kinds():
                values = self.metadata.columns[entry["name"]]
                columns[entry["column"]] = _arrow_column(values, entry["kind"])
        return pa.table(columns)


def paths_condition(paths: Sequence[str]) -> str:
    """SQL: ``path`` is one of ``paths``."""
    return "path IN (" + ", ".join(sql_literal(p) for p in paths) + ")"


class LanceStore:
    """One gallery's data table and record in a LanceDB database (see the module docstring).
    ``location`` names it in messages (``<uri>#<table>``)."""

    def __init__(self, db, uri: str, name: str):
        self.db, self.uri, self.name = db, uri, name
        self.location = f"{uri}#{name}"

    # --- records ----------------------------------------------------------------------------

    def _records(self, create: bool = False):
        try:
            return self.db.open_table(RECORDS)
        except ValueError:  # not created yet
            if not create:
                return None
        import pyarrow as pa

        schema = pa.schema(
            [("name", pa.string()), ("table_version", pa.int64()), ("record", pa.string())]
        )
        return self.db.create_table(RECORDS, schema=schema, exist_ok=True)

    def _table_names(self) -> list[str]:
        listed = self.db.list_tables()
        return list(getattr(listed, "tables", listed))

    def record(self, name: str | None = None) -> dict | None:
        """The record of this table (or of ``name``, e.g. a part's), or None."""
        records = self._records()
        if records is None:
            return None
        key = name or self.name
        found = records.search().where(f"name = {sql_literal(key)}").limit(None).to_arrow()
        if not found.num_rows:
            return None
        record = json.loads(found["record"][0].as_py())
        record["table_version"] = int(found["table_version"][0].as_py())
        return record

    def records_like(self, prefix: str) -> list[dict]:
        """Every record whose name starts with ``prefix``."""
        records = self._records()
        if records is None:
            return []
        pattern = prefix.replace("%", r"\%").replace("_", r"\_")
        found = records.search().where(f"name LIKE {sql_literal(pattern + '%')}").limit(None)
        rows = found.to_arrow().to_pylist()
        return [json.loads(row["record"]) | {"name": row["name"]} for row in rows]

    def put_record(self, record: dict, version: int, name: str | None = None) -> None:
        import pyarrow as pa

        row = pa.table(
            {
                "name": [name or self.name],
                "table_version": pa.array([version], pa.int64()),
                "record": [json.dumps(record, sort_keys=True)],
            }
        )
        records = self._records(create=True)
        records.merge_insert(
            "name"
        ).when_matched_update_all().when_not_matched_insert_all().execute(row)

    def drop_records(self, names: Sequence[str]) -> None:
        records = self._records()
        if records is not None and names:
            records.delete("name IN (" + ", ".join(sql_literal(n) for n in names) + ")")

    # --- the data table ---------------------------------------------------------------------

    def table(self, version: int | None = None):
        """The data table (checked out at ``version`` when given)."""
        table = self.db.open_table(self.name)
        if version is not None:
            table.checkout(version)
        return table

    def exists(self) -> bool:
        return self.name in self._table_names()

    def overwrite(self, rows: Rows):
        """Replace the data table by ``rows`` (a new version; readers of the old one go on)."""
        table = self.db.create_table(self.name, rows.table(), mode="overwrite")
        table.create_scalar_index("path", replace=True)
        return table

    def upsert(self, rows: Rows):
        """Insert ``rows``, replacing those of the same paths; creates the table if needed."""
        data = rows.table()
        if not self.exists():
            try:
                table = self.db.create_table(self.name, data)
                table.create_scalar_index("path", replace=True)
                return table
            except (ValueError, OSError, RuntimeError):  # another worker created it first
                pass
        table = self.table()
        table.merge_insert("path").when_matched_update_all().when_not_matched_insert_all().execute(
            data
        )
        return table

    def build_index(self, table, index_type: str, parameters: dict, metric: str) -> str:
        """Build the ANN index ``index_type`` (``exact``: none, a flat search) over the
        table's vectors; one line saying what was built."""
        if index_type == "exact":
            for index in table.list_indices():
                if getattr(index, "columns", None) == ["vector"]:
                    table.drop_index(index.name)
            return "no ANN index (exact search)"
        options = dict(parameters)
        if index_type.startswith("IVF"):
            options.setdefault("num_partitions", max(1, int(np.sqrt(table.count_rows()))))
        try:
            table.create_index(
                metric=metric, vector_column_name="vector", index_type=index_type, **options
            )
        except Exception as error:  # noqa: BLE001 - lance's errors for a misfit index
            raise UserError(
                f"cannot build the LanceDB index {index_type} ({', '.join(f'{k}={v}' for k, v in options.items())}) "
                f"on {table.count_rows()} rows: {engine_message(error)}; change index.type or "
                "index.build_parameters (e.g. fewer num_partitions, num_sub_vectors dividing "
                "the dimension), or use exact"
            ) from None
        return f"{index_type} index ({', '.join(f'{k}={v}' for k, v in options.items())})"

    def publish(self, gallery: Gallery, record: dict, rows: Rows, index: tuple) -> str:
        """Write a whole gallery: its rows (replacing the table), the index ``(type,
        parameters)``, then its record; one line saying what was written."""
        table = self.overwrite(rows)
        built = self.build_index(table, *index, metric=metric_of(gallery.normalized))
        self.put_record(record, table.version)
        return f"{len(rows.paths)} rows -> {self.location} (version {table.version}), {built}"

    # --- reading ----------------------------------------------------------------------------

    def read(
        self,
        *,
        expect: GalleryIdentity | None = None,
        order: Sequence[str] | None = None,
        advice: str,
        missing: str,
    ) -> Gallery:
        """The gallery as its record describes it, at the recorded version, in the order of
        ``order`` (the image list's paths; default: the items' order when written); its vectors
        are :class:`LazyVectors`. UserError (one line) when there is none (``missing``: how to
        make it), it is of another format, or not of ``expect`` (``advice``: the fix)."""
        record = self.record()
        if record is None:
            raise UserError(f"{self.location}: no gallery there; {missing}")
        if record.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.location} was written by another tfcbir (format "
                f"{record.get('format_version')}); {advice}"
            )
        try:
            table = self.table(record["table_version"])
        except ValueError:  # the record outlived its table (dropped by hand)
            raise UserError(f"{self.location}: no gallery there; {missing}") from None
        found = (
            table.search()
            .select(["path", "class", "item", "file_size", "file_mtime", "file_sha256"])
            .limit(None)
            .to_arrow()
        )
        paths = found["path"].to_pylist()
        rank = found["item"].to_numpy()
        if order is not None:
            position = {path: i for i, path in enumerate(order)}
            rank = np.array([position.get(p, len(position)) for p in paths], np.int64)
        rows = np.lexsort((np.array(paths, dtype=object), rank))
        gallery = self._gallery(record, found, rows, table)
        if expect is not None:
            check_identity(gallery, expect, advice)
        return gallery

    def _gallery(self, record: dict, found, rows: np.ndarray, table) -> Gallery:
        classes = record["classes"]
        label_of = {name: i for i, name in enumerate(classes)}
        paths = [found["path"][int(i)].as_py() for i in rows]
        sha = found["file_sha256"].to_pylist()
        hashes = None
        if len(sha) and all(s is not None for s in sha):
            hashes = np.frombuffer(b"".join(sha[i] for i in rows), np.uint8).reshape(-1, 32)
        files = FileStats(
            found["file_size"].to_numpy()[rows], found["file_mtime"].to_numpy()[rows], hashes
        )
        return Gallery(
            path=Path(self.location),
            embeddings=LazyVectors(table, paths, record["dim"]),
            labels=np.array(
                [label_of[c] for c in np.array(found["class"].to_pylist())[rows]], np.int64
            )
            if len(rows)
            else np.zeros(0, np.int64),
            paths=paths,
            classes=list(classes),
            normalized=record["normalized"],
            model_id=record["model_id"],
            model_step=record["model_step"],
            config_hash=record["config_hash"],
            items_hash=record["items_hash"],
            created=record["created"],
            version=record["tfcbir_version"],
            data_root=record["data_root"],
            split=record["split"],
            gallery_id=record["gallery_id"],
            # the record read, at its version: what the engine's index and an update need
            extra=dict(record.get("extra", {}))
            | {"lancedb": {"location": self.location, **record}},
            dropped=np.asarray(record.get("dropped", []), np.int64),
            files=files,
        )


def metric_of(normalized: bool) -> str:
    return "dot" if normalized else "l2"


def stored_record(gallery: Gallery) -> dict:
    """The record a gallery was read with (:meth:`LanceStore.read`); KeyError for a gallery
    not read from a table."""
    return gallery.extra["lancedb"]


def engine_index(gallery: Gallery, search_parameters: dict) -> LanceIndex:
    """The engine's search over the table ``gallery`` was read from, at the same version (its
    positions are the gallery's)."""
    return LanceIndex(
        gallery.embeddings.table,
        gallery,
        metric=metric_of(gallery.normalized),
        search_parameters=search_parameters,
        metadata=stored_record(gallery).get("metadata", []),
    )


def gallery_record(
    gallery: Gallery, *, metadata: Metadata | None, index: tuple, parts: int = 0
) -> dict:
    """The record of a gallery (its attributes, without the rows) written with it."""
    return {
        "format_version": FORMAT_VERSION,
        "dim": int(gallery.dim),
        "normalized": bool(gallery.normalized),
        "model_id": gallery.model_id,
        "model_step": int(gallery.model_step),
        "config_hash": gallery.config_hash,
        "items_hash": gallery.items_hash,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tfcbir_version": __version__,
        "data_root": gallery.data_root,
        "split": gallery.split,
        "gallery_id": gallery.gallery_id,
        "classes": list(gallery.classes),
        "extra": {k: v for k, v in gallery.extra.items() if k != "lancedb"},
        "dropped": [int(i) for i in gallery.dropped],
        "size": len(gallery),
        "metadata": [] if metadata is None else metadata.kinds(),
        "metadata_source": "" if metadata is None else metadata.source,
        "index": {"type": index[0], "parameters": index[1]},
        "parts": parts,
    }


class LazyVectors:
    """A Lance gallery's (N, D) vectors, read when needed: a few rows by path (a "more like
    this" query), or the whole column once (an evaluation, a re-ranking), in the gallery's
    order. Behaves as a read-only float32 array for indexing and ``np.asarray``."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, table, paths: list[str], dim: int):
        self.table, self._paths = table, paths  # the table at the gallery's version
        self.shape = (len(paths), int(dim))
        self._all: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def load(self) -> np.ndarray:
        """Every vector (N, D), read once."""
        if self._all is None:
            found = self.table.search().select(["path", "vector"]).limit(None).to_arrow()
            self._all = self._in_order(found, self._paths)
        return self._all

    def _in_order(self, found, paths: Sequence[str]) -> np.ndarray:
        row_of = {p: i for i, p in enumerate(found["path"].to_pylist())}
        vectors = _vectors(found["vector"], self.shape[1])
        return vectors[[row_of[p] for p in paths]] if len(paths) else vectors[:0]

    def __array__(self, dtype=None, copy=None):
        array = self.load()
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, key):
        if self._all is None:
            picked = np.asarray(key) if not isinstance(key, slice | tuple) else None
            if picked is not None and picked.dtype.kind in "iu" and picked.size <= _FETCH_ROWS:
                flat = picked.ravel()
                paths = [self._paths[int(i)] for i in flat]
                condition = paths_condition(sorted(set(paths))) if paths else "FALSE"
                found = (
                    self.table.search().where(condition).select(["path", "vector"]).limit(None)
                ).to_arrow()
                return self._in_order(found, paths).reshape(*picked.shape, self.shape[1])
        return self.load()[key]


def _vectors(column, dim: int) -> np.ndarray:
    """(N, D) float32 of a fixed-size-list Arrow column."""
    flat = column.combine_chunks().values.to_numpy(zero_copy_only=False)
    return np.asarray(flat, np.float32).reshape(-1, dim)


@dataclass(frozen=True)
class PushedFilter:
    """A filter expression as SQL for the engine (:meth:`LanceIndex.pushed_filter`)."""

    sql: str
    text: str


class LanceIndex:
    """Search of a Lance gallery in the engine: exact without an ANN index, approximate with
    one (``search_parameters``: ``nprobes``, ``refine_factor``, ``ef``). Scores and ties as
    :class:`retrieval.search.ExactIndex` gives them: cosine for a normalised gallery, else
    negative Euclidean distance; best first, then the lower gallery position."""

    filters_in_engine = True  # filters are pushed down (Searcher.where_mask)

    def __init__(self, table, gallery: Gallery, *, metric, search_parameters, metadata):
        self.table, self.metric = table, metric
        self.parameters = dict(search_parameters)
        self.size = len(gallery)
        self._position = {path: i for i, path in enumerate(gallery.paths)}
        self._columns = {entry["name"]: entry for entry in metadata}
        if "class" not in self._columns:
            self._columns["class"] = {"name": "class", "column": "class", "kind": "text"}

    def __len__(self) -> int:
        return self.size

    def pushed_filter(self, expression: Filter) -> PushedFilter:
        """The expression as SQL over the table's columns, checked as a filter over the
        metadata is (unknown column, literal of the wrong kind: UserError, one line)."""
        empty = Columns({name: _EMPTY[e["kind"]]() for name, e in self._columns.items()})
        names = {name: e["column"] for name, e in self._columns.items()}
        return PushedFilter(expression.sql(empty, names), expression.text)

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`retrieval.search.ExactIndex.search`."""
        return self.search_where(queries, k, None, exclude)

    def search_where(
        self,
        queries: np.ndarray,
        k: int,
        where: PushedFilter | None,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best items of each query (Q, D) among those ``where`` keeps (filtered before
        the search, so k are found when k match): scores (Q, k) float32, positions (Q, k)
        int64, padded with -inf / -1."""
        queries = check_embeddings(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        exclude = exclusion_mask(exclude, len(queries), self.size)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        indices = np.full((len(queries), k), -1, np.int64)
        fetch = min(k + exclude.shape[1], self.size)
        if not len(queries) or not fetch:
            return scores, indices
        found = self._query(queries, fetch, where)
        for q in range(len(queries)):
            rows = found.get(q, ([], []))
            position = np.array([self._position.get(p, -1) for p in rows[0]], np.int64)
            score = np.asarray(rows[1], np.float32)
            keep = (position >= 0) & ~np.isin(position, exclude[q])
            position, score = position[keep], score[keep]
            order = np.lexsort((position, -score))[:k]
            scores[q, : len(order)], indices[q, : len(order)] = score[order], position[order]
        return scores, indices

    def _query(self, queries: np.ndarray, fetch: int, where: PushedFilter | None) -> dict:
        """query -> (paths, scores) of the engine's ``fetch`` best."""
        builder = self.table.search(queries if len(queries) > 1 else queries[0])
        builder = builder.distance_type(self.metric).limit(fetch).select(["path"])
        if "nprobes" in self.parameters:
            builder = builder.nprobes(self.parameters["nprobes"])
        if "refine_factor" in self.parameters:
            builder = builder.refine_factor(self.parameters["refine_factor"])
        if "ef" in self.parameters:
            builder = builder.ef(self.parameters["ef"])
        if where is not None:
            builder = builder.where(where.sql, prefilter=True)
        result = builder.to_arrow()
        distance = result["_distance"].to_numpy(zero_copy_only=False).astype(np.float64)
        if self.metric == "dot":
            score = 1.0 - distance  # lance's dot distance is 1 - x.y
        else:
            score = -np.sqrt(np.maximum(distance, 0.0))  # lance's l2 is squared
        which = (
            result["query_index"].to_numpy()
            if "query_index" in result.column_names
            else np.zeros(result.num_rows, np.int64)
        )
        paths = result["path"].to_pylist()
        grouped: dict[int, tuple[list, list]] = {}
        for q, path, s in zip(which.tolist(), paths, score.tolist()):
            entry = grouped.setdefault(q, ([], []))
            entry[0].append(path)
            entry[1].append(s)
        return grouped
