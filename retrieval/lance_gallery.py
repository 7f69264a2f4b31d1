"""A run's galleries in LanceDB (``index.backend: lancedb``): embed.py's writes and the readers.

The table layout and its record are :mod:`retrieval.lance_store`'s. This module connects a
config to them: the database (``index.uri``, default ``<run>/lancedb``), each set's table
(``<run>-<set>``), the index (``index.type``, ``index.build_parameters``) and the search
parameters, and carries out embed.py's three writes:

- :func:`publish_set`: a whole gallery, embedded into ``<set>.h5`` as the HDF5 backend does
  (resumable), then written to the table; the staging file is removed once the table has it;
- :func:`write_part`: ``embed.py --shard i/n``: the part's rows upserted into the one table and
  its part recorded; the worker that finds every part recorded finishes the gallery;
- :func:`update_set`: ``embed.py --update``: only the added and changed images embedded, their
  rows upserted, the removed ones deleted, the index brought up to date (LanceDB's
  ``optimize``), the record written last.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from config.settings import data_dir
from retrieval.embedder import Embedder, embed_changes
from retrieval.filters import METADATA_FILE, read_metadata
from retrieval.gallery import (
    Gallery,
    GalleryIdentity,
    UpdateReport,
    check_identity,
    read_gallery,
)
from retrieval.lance_store import (
    BUILD_PARAMETERS,
    SEARCH_PARAMETERS,
    LanceIndex,
    LanceStore,
    Metadata,
    Rows,
    connect,
    engine_index,
    gallery_record,
    metric_of,
    model_key,
    parse_parameters,
    paths_condition,
    stored_record,
)
from runs.folder import RunFolder
from tfcbir.files import hash_file

#: Delete rows by path in batches of this many (one SQL condition each).
DELETE_BATCH = 1000


def uses_lancedb(config: dict) -> bool:
    return config["index"]["backend"] == "lancedb"


def lance_uri(config: dict) -> str:
    """``index.uri`` as LanceDB opens it: an object-store URI as it is, a folder made absolute
    (relative to data_dir), ``<run>/lancedb`` when empty."""
    uri = config["index"]["uri"]
    if not uri:
        return str(RunFolder.of(config).path / "lancedb")
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else data_dir() / path)


def store_of(config: dict, name: str) -> LanceStore:
    """The table of set ``name`` of the config's run (UserError when the database cannot be
    reached)."""
    uri = lance_uri(config)
    return LanceStore(connect(uri), uri, f"{config['name']}-{name}")


def index_spec(config: dict, index_type: str | None = None) -> tuple[str, dict]:
    """(index type, build parameters) of the config (``index_type`` overrides the type)."""
    parameters = parse_parameters(
        config["index"]["build_parameters"], BUILD_PARAMETERS, "index.build_parameters"
    )
    return index_type or config["index"]["type"], parameters


def open_lance_gallery(
    config: dict, name: str, *, expect: GalleryIdentity, order, config_path
) -> Gallery:
    """Set ``name``'s gallery from its table, refused unless of ``expect`` (as
    :func:`retrieval.evaluate.open_gallery` refuses a stale HDF5 gallery)."""
    command = f"python embed.py -c {config_path or '<config>'} --split {name}"
    return store_of(config, name).read(
        expect=expect, order=order, advice=f"re-embed it: {command}", missing=f"embed it: {command}"
    )


def open_lance_index(config: dict, gallery: Gallery) -> LanceIndex:
    """The engine's search over the table ``gallery`` was read from, at its version."""
    parameters = parse_parameters(
        config["index"]["search_parameters"], SEARCH_PARAMETERS, "index.search_parameters"
    )
    return engine_index(gallery, parameters)


def lance_stamp(store: LanceStore) -> tuple | None:
    """The table's record's (table version, gallery id): they change with every write; None
    when it cannot be read now."""
    try:
        record = store.record()
    except Exception:  # noqa: BLE001 - an unreachable store now: looked at again later
        return None
    return None if record is None else (record["table_version"], record["gallery_id"])


def metadata_of(root, paths: list[str]) -> Metadata | None:
    """The columns of ``<root>/metadata.csv`` aligned to ``paths``, or None without one."""
    found = Path(root) / METADATA_FILE
    if not found.is_file():
        return None
    return Metadata(read_metadata(found, list(paths)), hash_file(found))


def up_to_date(record: dict | None, identity: GalleryIdentity) -> bool:
    """Whether a table's record (None: none) is of a finished gallery of ``identity``."""
    if record is None:
        return False
    found = GalleryIdentity(
        record["model_id"], record["config_hash"], record["items_hash"], record["model_step"]
    )
    return not identity.differences(found)


def reindex(config: dict, store: LanceStore, record: dict, index_type=None) -> str | None:
    """Build the table's index again when the config asks for another one than its record
    says (type or build parameters); one line saying so, or None when it already has it."""
    spec = index_spec(config, index_type)
    if record is None or (record["index"]["type"], record["index"]["parameters"]) == spec:
        return None
    was = record["index"]["type"]
    table = store.table()
    built = store.build_index(table, *spec, metric=metric_of(record["normalized"]))
    record["index"] = {"type": spec[0], "parameters": spec[1]}
    store.put_record(record, table.version)
    return f"{store.location}: {built}, in place of {was}"


def _items(images, paths: list[str]) -> np.ndarray:
    position = {path: i for i, path in enumerate(images.paths)}
    return np.array([position[p] for p in paths], np.int64)


def publish_set(config: dict, store: LanceStore, staging: Path, images, index_type=None) -> str:
    """Write the gallery embedded into ``staging`` (an HDF5 file) to the table with its
    metadata and index, then remove ``staging``; one line saying what was written."""
    gallery = read_gallery(staging)
    metadata = metadata_of(images.root, gallery.paths)
    spec = index_spec(config, index_type)
    record = gallery_record(gallery, metadata=metadata, index=spec)
    line = store.publish(
        gallery, record, Rows.of_gallery(gallery, metadata, _items(images, gallery.paths)), spec
    )
    staging.unlink()
    return line


def part_name(store: LanceStore, index: int, count: int) -> str:
    return f"{store.name}#part-{index}-of-{count}"


def part_written(store: LanceStore, shard: tuple[int, int], identity: GalleryIdentity) -> bool:
    """Whether part ``shard`` of ``identity``'s gallery is in the table already."""
    record = store.record(part_name(store, *shard))
    return record is not None and _part_of(record) == (
        identity.model_id,
        identity.config_hash,
        identity.model_step,
        identity.items_hash,
    )


def write_part(
    config: dict,
    store: LanceStore,
    shard_file: Path,
    shard: tuple[int, int],
    images,
    index_type=None,
) -> str:
    """``embed.py --shard i/n``: upsert the part embedded into ``shard_file`` into the table,
    record the part, remove the file; finish the gallery when every part of this model is in.
    One line saying where it stands."""
    part = read_gallery(shard_file)
    metadata = metadata_of(images.root, part.paths)
    table = store.upsert(Rows.of_gallery(part, metadata, _items(images, part.paths)))
    record = gallery_record(part, metadata=metadata, index=index_spec(config, index_type))
    start = int(part.extra["shard"]["start"])  # the part's unreadable items, in the whole list
    record["dropped"] = [start + int(i) for i in part.dropped]
    store.put_record(record, table.version, name=part_name(store, *shard))
    shard_file.unlink()
    return finish_parts(config, store, images, shard, index_type)


def _part_of(record: dict) -> tuple:
    """What the parts of one gallery share: the model, the config and the whole image list."""
    return (
        record["model_id"],
        record["config_hash"],
        record["model_step"],
        record["extra"]["shard"]["items"],
    )


def finish_parts(
    config: dict, store: LanceStore, images, shard: tuple[int, int], index_type=None
) -> str:
    """Finish the gallery when all the parts of part ``shard``'s gallery are recorded: drop the
    rows of other models or of images no longer listed, build the index, write the record."""
    count = shard[1]
    parts = [
        r for r in store.records_like(f"{store.name}#part-") if r["name"].endswith(f"-of-{count}")
    ]
    mine = store.record(part_name(store, *shard)) | {"name": part_name(store, *shard)}
    same = [r for r in parts if _part_of(r) == _part_of(mine)]
    indices = {r["extra"]["shard"]["index"] for r in same}
    if len(indices) < count:
        return f"part in {store.location}: {len(indices)} of {count} parts written"
    table = store.table()
    key = model_key(GalleryIdentity(mine["model_id"], mine["config_hash"], "", mine["model_step"]))
    found = table.search().select(["path", "embedded_by"]).limit(None).to_arrow()
    listed = set(images.paths)
    stale = [
        p
        for p, by in zip(found["path"].to_pylist(), found["embedded_by"].to_pylist())
        if by != key or p not in listed
    ]
    _delete_paths(table, stale)
    spec = index_spec(config, index_type)
    built = store.build_index(table, *spec, metric=metric_of(mine["normalized"]))
    record = dict(mine)
    record.pop("name")
    record.update(
        items_hash=record["extra"]["shard"]["items"],
        dropped=sorted(i for r in same for i in r["dropped"]),
        size=table.count_rows(),
        gallery_id=uuid.uuid4().hex,
        parts=count,
        classes=list(images.classes),
    )
    record["extra"] = {k: v for k, v in record["extra"].items() if k != "shard"}
    store.put_record(record, table.version)
    store.drop_records([r["name"] for r in parts])
    return f"all {count} parts in: {record['size']} rows -> {store.location}, {built}"


def _delete_paths(table, paths: list[str]) -> None:
    for start in range(0, len(paths), DELETE_BATCH):
        table.delete(paths_condition(paths[start : start + DELETE_BATCH]))


def update_set(
    embedder: Embedder,
    store: LanceStore,
    name: str,
    images,
    *,
    verify: bool = False,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    config_path=None,
) -> UpdateReport:
    """``embed.py --update`` of set ``name``'s table ``store``: as
    :func:`retrieval.embedder.update_gallery` does for a file, with upserts and deletes; the
    index follows (``optimize``). A changed metadata.csv rewrites every row's attributes (no
    image is embedded again for it)."""
    command = f"python embed.py -c {config_path or '<config>'} --split {name}"
    old = store.read(
        order=images.paths, advice=f"re-embed it: {command}", missing=f"embed it: {command}"
    )
    expect = GalleryIdentity(
        embedder.model_id, embedder.config_hash, old.items_hash, embedder.model_step
    )
    check_identity(old, expect, f"re-embed it whole: {command}")
    changes = embed_changes(
        embedder, old, images, split=name, verify=verify, batch_size=batch_size, progress=progress
    )
    plan, keep = changes.plan, changes.keep
    identity = embedder.gallery_identity(images)
    record = stored_record(old)  # as read, at the version the plan was made against
    metadata = metadata_of(images.root, list(images.paths))
    changed_metadata = (metadata.source if metadata else "") != record["metadata_source"]
    written = bool(
        len(plan.to_embed)
        or plan.removed
        or plan.relabelled
        or changed_metadata
        or identity.differences(old.identity)
    )
    if written:
        rows = _new_rows(images, changes, metadata, identity)
        table = _apply(store, old, images, plan, rows, keep, changed_metadata)
        new = replace(
            old,
            items_hash=identity.items_hash,
            classes=list(images.classes),
            dropped=changes.failed,
            gallery_id=uuid.uuid4().hex,
        )
        spec = (record["index"]["type"], record["index"]["parameters"])
        new_record = gallery_record(new, metadata=metadata, index=spec)
        new_record["size"] = table.count_rows()
        store.put_record(new_record, table.version)
    return UpdateReport.of_plan(plan, old, keep, path=Path(store.location), written=written)


def _new_rows(images, changes, metadata, identity) -> Rows:
    """The rows of the list's items (all N, in list order): the embedded ones' vectors in
    place, the kept ones' zero (only written when every row is rewritten, from the table)."""
    vectors = np.zeros((len(images), changes.embedded.shape[1]), np.float32)
    vectors[changes.plan.to_embed] = changes.embedded
    return Rows(
        list(images.paths),
        [images.classes[int(label)] for label in images.labels],
        np.arange(len(images)),
        vectors,
        changes.files,
        metadata,
        model_key(identity),
    )


def _apply(store, old: Gallery, images, plan, rows: Rows, keep, rewrite: bool):
    """Carry out ``plan`` on the table: every row rewritten (``rewrite``: the metadata changed;
    kept vectors read from the table), else deletes, upserts and class renames alone."""
    kept = np.flatnonzero(plan.sources >= 0)
    table = store.table()
    spec = stored_record(old)["index"]
    if rewrite:
        vectors = rows.vectors.copy()
        vectors[kept] = old.embeddings[plan.sources[kept]]
        table = store.overwrite(replace(rows, vectors=vectors).subset(np.flatnonzero(keep)))
        store.build_index(table, spec["type"], spec["parameters"], metric_of(old.normalized))
        return table
    listed = set(images.paths)
    gone = [p for p in old.paths if p not in listed]
    unreadable = [images.paths[i] for i in np.flatnonzero(~keep)]
    _delete_paths(table, gone + unreadable)
    todo = plan.to_embed[keep[plan.to_embed]]
    if len(todo):
        upsert = table.merge_insert("path").when_matched_update_all()
        upsert.when_not_matched_insert_all().execute(rows.subset(todo).table())
    _rename_classes(table, old, images, plan, kept)
    if spec["type"] != "exact":
        table.optimize()  # new rows into the index, small fragments compacted
    return table


def _rename_classes(table, old: Gallery, images, plan, kept: np.ndarray) -> None:
    """Kept rows whose class name changed (a relabelled list) get the new name."""
    renamed: dict[str, list[str]] = {}
    for i in kept:
        new = images.classes[int(images.labels[i])]
        if old.classes[int(old.labels[plan.sources[i]])] != new:
            renamed.setdefault(new, []).append(images.paths[i])
    for name, paths in renamed.items():
        for start in range(0, len(paths), DELETE_BATCH):
            table.update(
                where=paths_condition(paths[start : start + DELETE_BATCH]), values={"class": name}
            )
