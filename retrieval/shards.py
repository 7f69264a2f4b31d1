"""Sharded embedding: n machines (or GPUs) each embed one part of a set; one merges the parts.

``embed.py --shard i/n`` embeds part ``i`` of ``n`` of a set into
``<run>/embeddings/<set>.shard-<i>-of-<n>.h5``; ``embed.py --merge`` checks the parts and joins
them into ``<set>.h5``, as if the set had been embedded whole.

Part ``i`` of a set of N images is the contiguous range ``[i*N//n, (i+1)*N//n)`` of the set's
item order (parts differ in size by at most one; some are empty when n > N). A shard file is a
gallery (:mod:`retrieval.gallery`) of its range, written resumably and atomically like a whole
gallery; its readable images are the items, the positions (in the range) of unreadable ones are
its ``dropped`` dataset, and ``extra["shard"]`` records ``index``, ``count``, ``start``,
``stop``, ``total`` (N) and ``items`` (:func:`retrieval.gallery.items_hash` of the whole set).

Merging refuses, naming the shard and the command that remakes it, shards of another model or
config, shards of another item list, missing parts and parts of different counts (which
overlap). It writes the merged gallery atomically and never deletes the shards.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.lists import ImageList
from retrieval.embedder import embed_images
from retrieval.gallery import (
    FileStats,
    Gallery,
    GalleryIdentity,
    items_hash,
    partial_path,
    read_gallery,
    write_gallery,
)
from tfcbir import UserError

log = logging.getLogger("tfcbir")

_SHARD_FILE = re.compile(r"(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.h5")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; a one-line UserError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise UserError(
            f"--shard {text}: not of the form i/n; give the part to embed and the number of "
            "parts, e.g. --shard 0/4 (parts 0 to 3)"
        )
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise UserError(
            f"--shard {text}: there is no part {index} of {count}; give i/n with 0 <= i < n, "
            f"e.g. --shard 0/{max(count, 2)}"
        )
    return index, count


def shard_range(total: int, index: int, count: int) -> tuple[int, int]:
    """``(start, stop)``: the items of part ``index`` of ``count`` of a set of ``total``."""
    return index * total // count, (index + 1) * total // count


def shard_path(gallery: str | Path, index: int, count: int) -> Path:
    """``<set>.shard-<index>-of-<count>.h5`` beside the gallery ``<set>.h5``."""
    gallery = Path(gallery)
    return gallery.with_name(f"{gallery.stem}.shard-{index}-of-{count}.h5")


def list_hash(images: ImageList) -> str:
    """:func:`retrieval.gallery.items_hash` of an image list."""
    return items_hash(images.paths, images.labels, images.classes)


def embed_shard(
    embedder,
    images: ImageList,
    gallery: Path,
    shard: tuple[int, int],
    *,
    split: str,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Embed part ``shard = (i, n)`` of ``images`` into its shard file beside ``gallery``.

    Resumable like a whole gallery. A finished shard file is kept when a merge would accept it
    (same model, config and items); any other one is embedded again.
    """
    index, count = shard
    start, stop = shard_range(len(images), index, count)
    part = images.subset(np.arange(start, stop))
    out = shard_path(gallery, index, count)
    if out.exists():
        try:
            found = read_gallery(out, expect=embedder.gallery_identity(part))
            _check_record(found, index, count, images, split, "")
        except UserError:
            log.info("%s is not a shard of this model and set; embedding it again", out)
            out.unlink()
    record = {
        "index": index,
        "count": count,
        "start": start,
        "stop": stop,
        "total": len(images),
        "items": list_hash(images),
    }
    return embed_images(
        embedder,
        part,
        out,
        split=split,
        batch_size=batch_size,
        progress=progress,
        extra={"shard": record},
        allow_empty=True,  # a part may be empty or all unreadable; the merge accounts for it
    )


@dataclass(frozen=True)
class CheckedShards:
    """The shards of one set, all checked: ``shards[i]`` is part i of ``len(shards)``."""

    gallery: Path  # the merged gallery to write
    shards: list[Gallery]
    images: ImageList
    split: str

    @property
    def dropped(self) -> np.ndarray:
        """(K,) positions in the set of the unreadable images that no shard holds."""
        starts = [s.extra["shard"]["start"] for s in self.shards]
        return np.concatenate(
            [np.zeros(0, np.int64)] + [start + s.dropped for start, s in zip(starts, self.shards)]
        )

    def merge(self) -> Path:
        """Write the merged gallery atomically; returns its path. The shards are kept."""
        first = self.shards[0]
        return write_gallery(
            self.gallery,
            np.concatenate([s.embeddings for s in self.shards]),
            np.concatenate([s.labels for s in self.shards]),
            [path for s in self.shards for path in s.paths],
            self.images.classes,
            normalized=first.normalized,
            identity=GalleryIdentity(
                first.model_id, first.config_hash, list_hash(self.images), first.model_step
            ),
            data_root=str(self.images.root),
            split=self.split,
            extra={
                **{k: v for k, v in first.extra.items() if k != "shard"},
                "merged_shards": len(self.shards),
            },
            dropped=self.dropped,
            files=FileStats.concatenate([s.files for s in self.shards]),
        )


def check_shards(
    gallery: Path,
    images: ImageList,
    *,
    split: str,
    expect: GalleryIdentity,
    command: str,
) -> CheckedShards:
    """The shards of ``gallery`` (``<set>.h5``) for the set ``images``, checked for a merge.

    Refused (UserError naming the shard and how to remake it): no shards; parts of different
    counts; a missing part; a damaged shard; one of another config or model checkpoint than
    ``expect`` says (its ``items_hash`` is the whole set's), or of another model than the other
    shards; one made for another item list or whose items are not its range of the set.
    ``command`` is the ``python embed.py ...`` line that, with ``--shard i/n`` added, re-embeds a
    shard.
    """
    folder = gallery.parent
    found: dict[int, dict[int, Path]] = {}  # count -> index -> file
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            match = _SHARD_FILE.fullmatch(path.name)
            if match and match["stem"] == gallery.stem:
                found.setdefault(int(match["count"]), {})[int(match["index"])] = path
    if not found:
        raise UserError(
            f"no shards of the {split} set to merge in {folder} ({gallery.stem}.shard-<i>-of-"
            f"<n>.h5); embed them first: {command} --shard i/n for each i in 0..n-1"
        )
    count = _one_count(found, gallery, command)
    files = found[count]
    unknown = sorted(i for i in files if i >= count)
    if unknown:
        raise UserError(
            f"{files[unknown[0]]}: there is no part {unknown[0]} of {count}; delete that file"
        )
    missing = [i for i in range(count) if i not in files]
    if missing:
        index = missing[0]
        path = shard_path(gallery, index, count)
        resumes = " (it was interrupted; this resumes it)" if partial_path(path).exists() else ""
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise UserError(
            f"shard {index}/{count} of the {split} set is missing (no {path}; parts missing: "
            f"{listed}); embed it: {command} --shard {index}/{count}{resumes}"
        )

    shards = []
    for index in range(count):
        redo = f"re-embed it: {command} --shard {index}/{count}"
        shard = read_gallery(files[index], advice=redo)
        _check_record(shard, index, count, images, split, redo)
        shards.append(shard)
    _check_identities(shards, expect, command)
    checked = CheckedShards(gallery, shards, images, split)
    if len(checked.dropped) == len(images):
        raise UserError(
            f"none of the {len(images)} images of the {split} set could be read by any shard; "
            f"check {images.root}"
        )
    return checked


def _one_count(found: dict[int, dict[int, Path]], gallery: Path, command: str) -> int:
    """The number of parts the shards were cut into; refuses a mixture (their ranges overlap)."""
    if len(found) == 1:
        return next(iter(found))
    # The count with the most files is taken as meant; a file of another count is named.
    ranked = sorted(found, key=lambda n: (-len(found[n]), n))
    count, other = ranked[0], ranked[1]
    odd = next(iter(found[other].values()))
    raise UserError(
        f"{odd} is one of {other} parts, but {gallery.parent} also holds shards of the set cut "
        f"into {count} parts; they overlap. Delete the shards of one count (e.g. "
        f"{gallery.stem}.shard-*-of-{other}.h5) and embed any part then missing: "
        f"{command} --shard i/{count}"
    )


def _check_record(
    shard: Gallery, index: int, count: int, images: ImageList, split: str, redo: str
) -> None:
    """``shard`` is part ``index`` of ``count`` of exactly this item list."""
    record = shard.extra.get("shard")
    where = f"shard {index}/{count} ({shard.path})"
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a shard (it has no shard record); {redo}")
    if (record.get("index"), record.get("count")) != (index, count):
        raise UserError(
            f"{where}: the file is part {record.get('index')} of {record.get('count')}, not what "
            f"its name says (renamed?); {redo}"
        )
    if record.get("total") != len(images) or record.get("items") != list_hash(images):
        then = record.get("total")
        change = (
            f"{then} images then, {len(images)} now"
            if then != len(images)
            else "as many images, other paths or labels"
        )
        raise UserError(
            f"{where} was made for another list of {split} images ({change}: the data set or "
            f"its split changed since); {redo}"
        )
    start, stop = shard_range(len(images), index, count)
    dropped = shard.dropped
    kept = np.setdiff1d(np.arange(stop - start), dropped)
    if (
        (record.get("start"), record.get("stop")) != (start, stop)
        or len(np.unique(dropped)) != len(dropped)
        or (len(dropped) and (dropped.min() < 0 or dropped.max() >= stop - start))
        or len(kept) != len(shard)
        or shard.paths != [images.paths[start + k] for k in kept]
        or not np.array_equal(shard.labels, images.labels[start + kept])
        or shard.classes != images.classes
    ):
        raise UserError(
            f"{where}: its items are not images {start} to {stop - 1} of the {split} set "
            f"(each once, readable or recorded as dropped); {redo}"
        )


def _check_identities(shards: list[Gallery], expect: GalleryIdentity, command: str) -> None:
    """Every shard was made by the expected config and model checkpoint, and all by one model."""
    count = len(shards)
    identities = [(s.model_id, s.model_step, s.dim, s.normalized) for s in shards]
    usual = Counter(identities).most_common(1)[0][0]
    for index, shard in enumerate(shards):
        redo = f"re-embed it: {command} --shard {index}/{count}"
        where = f"shard {index}/{count} ({shard.path})"
        if shard.config_hash != expect.config_hash:
            raise UserError(
                f"{where} was embedded with another config (config_hash {shard.config_hash}, "
                f"expected {expect.config_hash}); {redo}"
            )
        if shard.model_id != expect.model_id:
            raise UserError(
                f"{where} was embedded with another model checkpoint (model_id "
                f"{shard.model_id}, expected {expect.model_id}); {redo}"
            )
        if identities[index] != usual:
            raise UserError(
                f"{where} was embedded with another model than the other shards (model_id "
                f"{shard.model_id} step {shard.model_step}, the others {usual[0]} step "
                f"{usual[1]}); {redo}"
            )
