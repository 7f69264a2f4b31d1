"""Training batches and evaluation batches of decoded images.

- :class:`TrainData`: P x K training batches, a pure function of ``(seed, step)``. The training
  images are decoded once, in parallel, into memory when they fit; otherwise each batch is
  decoded on demand. Unreadable files are skipped with a warning, never a crash mid-run.
- :func:`iter_eval_batches`: images of a list in order, resized and centre-cropped, streamed in
  batches with a bounded amount of work in flight (galleries may be larger than memory).
- :func:`find_unreadable`: every file of a list decoded once and dropped, to find the unreadable
  ones before a run (``train.py --check``).

Decoding runs in thread pools: PIL releases the GIL while decoding and resizing, so threads scale
without the cost of processes. TensorFlow is imported only by :meth:`TrainData.dataset`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from datasets.augment import Augmentation
from datasets.image_list import ImageList
from datasets.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    as_size,
    load_and_fit,
    load_image,
)
from datasets.sampler import PKSampler, draw_without_repeats
from tfcbir import UserError
from tfcbir.cpus import available_cpus
from tfcbir.text import shorten

log = logging.getLogger("tfcbir")

_AUGMENT_STREAM = 1  # the augmentation draws of step s come from default_rng([seed, s, 1])
_REPLACEMENT_STREAM = 3  # [seed, step, 3, slot]: images of a class replacing an unreadable one
_IMAGE_AUGMENT_STREAM = 4  # [seed, step, 4, slot]: the draws of data.augment's newer keys
_PROGRESS_SECONDS = 5.0
_NAMED_WARNINGS = 100  # unreadable files named one by one; beyond that only counted
_CHUNK = 16  # images per caching task: fewer futures for sets of millions of images


def default_workers() -> int:
    """Decoding threads: the CPUs this process may use (at most 32)."""
    return min(32, available_cpus())


def _ordered(
    pool: ThreadPoolExecutor, fn: Callable, items: Iterable, max_in_flight: int
) -> Iterator[tuple[object, Future]]:
    """``(item, future of fn(item))`` in the order of ``items``, keeping at most
    ``max_in_flight`` submitted and not yet handed out, so memory stays bounded."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max_in_flight:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:  # the consumer stopped early: do not decode what nobody will read
        for _, future in pending:
            future.cancel()


def _check_sizes(image_size, resize) -> tuple[tuple[int, int], tuple[int, int] | None]:
    image_size = as_size(image_size, "data.image_size")
    if resize is None:
        return image_size, None
    resize = as_size(resize, "data.resize")
    if resize[0] < image_size[0] or resize[1] < image_size[1]:
        raise UserError(
            f"data.resize: {list(resize)} is smaller than data.image_size "
            f"{list(image_size)}; the crop must fit inside the resized image"
        )
    return image_size, resize


class TrainData:
    """P x K training batches of ``images``, as NumPy arrays or a ``tf.data.Dataset``.

    Images are decoded at ``resize`` (or ``image_size`` when ``resize`` is None). If all of them
    fit in ``cache_max_bytes`` (N x h x w x 3 bytes) they are decoded once, in parallel, into
    memory; otherwise every batch decodes its own images (streaming).

    Unreadable files (corrupt, truncated, not images) never stop a run:

    - cached: they are found while caching, skipped with a warning naming each, and listed in
      ``skipped``; a class left without images is dropped from sampling with a warning.
    - streaming: a file that fails is replaced, in that batch and every later one, by the next
      readable image of its class (in list order); a class with no readable image at all is
      replaced by another class. Failures are warned about once and added to ``skipped``.

    Batch ``step`` is a pure function of ``(seed, step)`` (given the same files): the sampler's
    indices, then crops and flips drawn from ``np.random.default_rng([seed, step, 1])``, and
    any further augmentation (``augment``: resized crops, colour jitter, grayscale,
    RandAugment) of the image in batch slot ``i`` from ``default_rng([seed, step, 4, i])``.
    ``augment`` (a :class:`~datasets.augment.Augmentation`), when given, replaces ``flip`` and
    ``crop``. The decoded images are never changed: each batch augments copies of them.

    Attributes: ``skipped`` (relative paths of unreadable files), ``cached`` (bool),
    ``sampler`` (:class:`PKSampler` over the readable images), ``batch_size`` (P * K).
    """

    def __init__(
        self,
        images: ImageList,
        *,
        P: int,
        K: int,
        seed: int,
        image_size: tuple[int, int],
        resize: tuple[int, int] | None,
        flip: bool = True,
        crop: bool = True,
        augment: Augmentation | None = None,
        cache_max_bytes: int = 4 << 30,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if len(images) == 0:
            raise UserError(
                "data.root: the training list has no images; add images or check data.split"
            )
        # Checks P against the classes before spending minutes decoding (rebuilt below).
        PKSampler(images.labels, P, K, seed)
        self.images = images
        self.image_size, self.resize = _check_sizes(image_size, resize)
        self.decode_size = self.resize or self.image_size
        self.augment = augment or Augmentation(flip=bool(flip), crop=bool(crop))
        self.flip, self.crop, self.seed = self.augment.flip, self.augment.crop, int(seed)
        self.P, self.K = int(P), int(K)
        self.workers = workers or default_workers()
        self.max_pixels = max_pixels
        self.skipped: list[str] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # streaming's decoding threads
        self._unreadable: set[int] = set()  # streaming: image indices known to fail
        self._dead_labels: set[int] = set()  # streaming: classes without any readable image

        h, w = self.decode_size
        self.cache_bytes = len(images) * h * w * 3
        self.cached = self.cache_bytes <= cache_max_bytes
        if self.cached:
            self._cache, readable = self._decode_all()
            readable_indices = np.flatnonzero(readable)
        else:
            self._cache = None
            readable_indices = np.arange(len(images))
            log.info(
                "%d training images at %dx%d need %.1f GiB, more than the cache's %.1f GiB: "
                "decoding each batch on demand",
                len(images),
                h,
                w,
                self.cache_bytes / (1 << 30),
                cache_max_bytes / (1 << 30),
            )
        if len(readable_indices) == 0:
            raise UserError(
                f"data.root: none of the {len(images)} training images in "
                f"{images.root} could be read; see the warnings above"
            )
        self._warn_lost_classes(readable_indices)
        # The sampler's indices are positions in _readable, which holds ImageList indices.
        self._readable = readable_indices
        self.sampler = PKSampler(images.labels[readable_indices], self.P, self.K, self.seed)

    # -- public -------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    @property
    def num_images(self) -> int:
        """Images that can be sampled (readable ones, as far as known)."""
        return len(self._readable)

    @property
    def steps_per_round(self) -> int:
        """Steps in which every class appears at least once (the P x K analogue of an epoch)."""
        return self.sampler.steps_per_round

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``step``: images ``(P*K, h, w, 3)`` uint8 and labels ``(P*K,)`` int32, K
        consecutive images per class."""
        images, labels, _ = self.batch_items(step)
        return images, labels

    def batch_items(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`batch` and the ``(P*K,)`` int64 positions in ``images`` (the ImageList) of the
        images it holds (after any replacement of an unreadable file), to pair them with
        per-image data such as captions."""
        step = int(step)
        indices = self._readable[self.sampler.batch(step)]
        labels = self.images.labels[indices].copy()
        if self.cached:
            sources = [self._cache[i] for i in indices]
        else:
            sources, indices = self._stream(step, indices, labels)
        rng = np.random.default_rng([self.seed, step, _AUGMENT_STREAM])
        out = np.empty((len(indices), *self.image_size, 3), dtype=np.uint8)
        for slot, source in enumerate(sources):
            image_rng = None
            if self.augment.per_image:
                image_rng = np.random.default_rng([self.seed, step, _IMAGE_AUGMENT_STREAM, slot])
            out[slot] = self.augment.apply(source, self.image_size, rng, image_rng)
        return out, labels.astype(np.int32), np.asarray(indices, np.int64)

    def dataset(self, start_step: int, stop_step: int):
        """``tf.data.Dataset`` of the batches ``start_step .. stop_step - 1``, in order:
        ``(images uint8 (P*K, h, w, 3), labels int32 (P*K,))`` with static shapes, prefetched."""
        import tensorflow as tf  # here only: the rest of the package works without TensorFlow

        shape = (self.batch_size, *self.image_size, 3)

        def make(step):
            images, labels = tf.numpy_function(
                self.batch, [step], (tf.uint8, tf.int32), stateful=False
            )
            images.set_shape(shape)
            labels.set_shape((self.batch_size,))
            return images, labels

        # Batches are produced in parallel but handed out in step order (deterministic=True).
        parallel = 2 if self.cached else max(2, min(4, self.workers))
        return (
            tf.data.Dataset.range(int(start_step), int(stop_step))
            .map(make, num_parallel_calls=parallel, deterministic=True)
            .prefetch(2)
        )

    def close(self) -> None:
        """Stop streaming's decoding threads (they are idle between batches anyway)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- caching ------------------------------------------------------------------------------

    def _decode_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Decode every image into ``(N, h, w, 3)`` uint8; also ``(N,)`` bool: readable."""
        count = len(self.images)
        cache = np.empty((count, *self.decode_size, 3), dtype=np.uint8)
        readable = np.ones(count, dtype=bool)
        paths = self.images.absolute_paths()

        def decode_chunk(start: int) -> list[tuple[int, ImageError]]:
            failures = []
            for i in range(start, min(start + _CHUNK, count)):
                try:
                    cache[i] = load_image(paths[i], self.decode_size, max_pixels=self.max_pixels)
                except ImageError as error:
                    failures.append((i, error))
            return failures

        h, w = self.decode_size
        log.info(
            "decoding %d training images at %dx%d into memory (%.2f GiB) with %d threads",
            count,
            h,
            w,
            self.cache_bytes / (1 << 30),
            self.workers,
        )
        began = last_report = time.monotonic()
        done = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="tfcbir-cache") as pool:
            for start, future in _ordered(
                pool, decode_chunk, range(0, count, _CHUNK), max_in_flight=4 * self.workers
            ):
                for i, error in future.result():
                    readable[i] = False
                    self._note_unreadable(i, error)
                done = min(start + _CHUNK, count)
                now = time.monotonic()
                if now - last_report >= _PROGRESS_SECONDS and done < count:
                    rate = done / (now - began)
                    log.info(
                        "decoded %d/%d training images (%.0f%%, %.0f/s, about %.0f s left)",
                        done,
                        count,
                        100 * done / count,
                        rate,
                        (count - done) / rate,
                    )
                    last_report = now
        if self.skipped:
            log.warning(
                "%d of %d training images could not be read and are skipped (listed in "
                "TrainData.skipped)",
                len(self.skipped),
                count,
            )
        log.info("decoded %d training images in %.1f s", done, time.monotonic() - began)
        return cache, readable

    def _note_unreadable(self, index: int, error: ImageError) -> None:
        with self._lock:
            self.skipped.append(self.images.paths[index])
            number = len(self.skipped)
        if number <= _NAMED_WARNINGS:
            log.warning("skipping unreadable training image %s", error)
        elif number == _NAMED_WARNINGS + 1:
            log.warning("more unreadable training images; no longer naming each one")

    def _warn_lost_classes(self, readable_indices: np.ndarray) -> None:
        before = np.unique(self.images.labels)
        after = np.unique(self.images.labels[readable_indices])
        lost = np.setdiff1d(before, after)
        if len(lost):
            log.warning(
                "%d class(es) have no readable training image and are not sampled: %s",
                len(lost),
                shorten([self.images.classes[i] for i in lost], 20),
            )

    # -- streaming ----------------------------------------------------------------------------

    def _stream(
        self, step: int, indices: np.ndarray, labels: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Decode the images of one batch; unreadable ones replaced (see the class docstring).
        Returns the images and the positions of the images actually used. ``labels`` is
        updated in place where a whole class had to be replaced."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.workers, thread_name_prefix="tfcbir-stream"
                    )
        found = list(self._pool.map(self._load_or_substitute, indices))
        used = np.array([-1 if f is None else f[0] for f in found], np.int64)
        sources = [None if f is None else f[1] for f in found]
        for slot in range(0, len(indices), self.K):
            if any(source is None for source in sources[slot : slot + self.K]):
                group, label = self._replacement_group(step, slot, labels)
                sources[slot : slot + self.K] = [image for _, image in group]
                used[slot : slot + self.K] = [index for index, _ in group]
                labels[slot : slot + self.K] = label
        return sources, used

    def _load_or_substitute(self, index: int) -> tuple[int, np.ndarray] | None:
        """``(index, image)`` decoded, or else the next readable image of its class (cyclically
        in list order) with its index; None when the class has no readable image.
        Deterministic given the files."""
        label = int(self.images.labels[index])
        members = self.sampler.members[np.searchsorted(self.sampler.classes, label)]
        start = int(np.searchsorted(members, index))
        for candidate in np.roll(members, -start):
            candidate = int(candidate)
            if candidate in self._unreadable:
                continue
            try:
                path = os.path.join(self.images.root, self.images.paths[candidate])
                return candidate, load_image(path, self.decode_size, max_pixels=self.max_pixels)
            except ImageError as error:
                with self._lock:
                    known = candidate in self._unreadable
                    self._unreadable.add(candidate)
                if not known:
                    self._note_unreadable(candidate, error)
        with self._lock:
            known = label in self._dead_labels
            self._dead_labels.add(label)
        if not known:
            log.warning(
                "class %s has no readable training image; other classes take its place",
                self.images.classes[label],
            )
        return None

    def _replacement_group(
        self, step: int, slot: int, labels: np.ndarray
    ) -> tuple[list[tuple[int, np.ndarray]], int]:
        """K ``(index, image)`` of the first class after the dead one (in label order) that is
        readable and not in the batch, drawn from ``default_rng([seed, step, 3, slot])``; and
        that class."""
        classes = self.sampler.classes
        start = int(np.searchsorted(classes, labels[slot]))
        in_batch = set(labels.tolist())
        for offset in range(1, len(classes)):
            position = (start + offset) % len(classes)
            label = int(classes[position])
            if label in in_batch or label in self._dead_labels:
                continue
            members = self.sampler.members[position]
            rng = np.random.default_rng([self.seed, step, _REPLACEMENT_STREAM, slot])
            picks = draw_without_repeats(rng, len(members), self.K)
            group = [self._load_or_substitute(int(members[p])) for p in picks]
            if all(found is not None for found in group):
                return group, label
        raise UserError(
            f"data.root: too few training classes in {self.images.root} have "
            f"readable images to fill a batch of P={self.P} classes; see the warnings"
        )


def iter_eval_batches(
    paths: list[str],
    *,
    image_size: tuple[int, int],
    resize: tuple[int, int] | None,
    batch_size: int,
    workers: int | None = None,
    on_error: Callable[[int, str], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(indices int64 (b,), images uint8 (b, h, w, 3))`` of ``paths``, in order.

    Each image is resized to ``resize`` and centre-cropped to ``image_size`` (resized straight to
    ``image_size`` when ``resize`` is None). Decoding runs on ``workers`` threads with at most a
    few batches in flight, so any number of images streams in bounded memory.

    A file that cannot be read is left out of the batches (``indices`` say which images a batch
    holds; b < batch_size only for the last batch), with a warning naming it; ``on_error(index,
    message)`` is called for it too when given, e.g. to record which gallery entries are missing.
    """
    image_size, resize = _check_sizes(image_size, resize)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    workers = workers or default_workers()

    def decode(index: int) -> np.ndarray:
        return load_and_fit(paths[index], image_size, resize, max_pixels=max_pixels)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="tfcbir-eval")
    batch_indices: list[int] = []
    batch_images: list[np.ndarray] = []
    try:
        for index, future in _ordered(
            pool, decode, range(len(paths)), max_in_flight=max(2 * batch_size, 4 * workers)
        ):
            try:
                image = future.result()
            except ImageError as error:
                log.warning("skipping unreadable image %s", error)
                if on_error is not None:
                    on_error(index, str(error))
                continue
            batch_indices.append(index)
            batch_images.append(image)
            if len(batch_indices) == batch_size:
                yield np.array(batch_indices, dtype=np.int64), np.stack(batch_images)
                batch_indices, batch_images = [], []
        if batch_indices:
            yield np.array(batch_indices, dtype=np.int64), np.stack(batch_images)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def find_unreadable(
    paths: list[str],
    *,
    size: tuple[int, int] | None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[tuple[int, ImageError]]:
    """Decode every file of ``paths`` as training does (:func:`load_image` at ``size``) on
    ``workers`` threads, keeping nothing; the ``(index, error)`` of each file that fails, in
    index order. ``progress(done, total)`` is called from the calling thread as work finishes."""
    count = len(paths)
    workers = workers or default_workers()
    if size is not None:
        size = as_size(size, "size")

    def check_chunk(start: int) -> list[tuple[int, ImageError]]:
        failures = []
        for i in range(start, min(start + _CHUNK, count)):
            try:
                load_image(paths[i], size, max_pixels=max_pixels)
            except ImageError as error:
                failures.append((i, error))
        return failures

    failed: list[tuple[int, ImageError]] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="tfcbir-check") as pool:
        for start, future in _ordered(
            pool, check_chunk, range(0, count, _CHUNK), max_in_flight=4 * workers
        ):
            failed += future.result()
            if progress is not None:
                progress(min(start + _CHUNK, count), count)
    return failed
