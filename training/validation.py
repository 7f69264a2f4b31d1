"""Validation during training: which images select the model (:func:`choose_validation`), and
their score, decoded once (:class:`Validator`). No TensorFlow here: ``train.py --check`` uses it.

The validation mirrors the evaluation protocol of the split: for a class-disjoint split the
held-out images are searched among themselves (leave-one-out, as the test classes will be); for a
split by images they are queries against (a sample of) the training images, the gallery the test
queries will search. The score is ``train.validation.metric`` (:data:`VALIDATION_METRICS`):
Recall@1 (the default) or MAP@R, which ranks the whole class, both :mod:`retrieval.metrics`' (in
the run's search geometry; a query without a relevant item is left out), so the number that
selects the model is the one evaluation.py reports.
"""

from __future__ import annotations

import logging

import numpy as np

from datasets.lists import ImageList, Splits, ValidationSplit, validation_split
from datasets.pipeline import iter_eval_batches
from retrieval.metrics import SELECTION_METRICS, Metrics, evaluate, selection_score
from retrieval.search import unit_rows
from tfcbir import UserError

log = logging.getLogger("tfcbir")

# train.validation.metric: its name -> (metrics.csv's and best.json's key, how logs show it).
VALIDATION_METRICS = {name: (f"val_{name}", shown) for name, shown in SELECTION_METRICS.items()}


def choose_validation(config: dict, splits: Splits) -> ValidationSplit:
    """The run's training and validation images (``train.validation``; none when
    ``train.validate_every`` is 0), with a warning when the model is selected on the test split."""
    validation = config["train"]["validation"]
    source = "none" if config["train"]["validate_every"] == 0 else validation["source"]
    chosen = validation_split(splits, source, validation["holdout"], config["seed"])
    if chosen.source == "test":
        log.warning(
            "train.validation.source: test: the model is selected on the test split, so the test "
            "metrics of evaluation.py are optimistic; 'holdout' (the default) keeps them honest"
        )
    return chosen


class Validator:
    """A model's ``metric`` (a key of :data:`VALIDATION_METRICS`: Recall@1 or MAP@R):
    ``queries`` against ``gallery`` (None: leave-one-out on queries).

    Each set is cut to ``max_images`` (a seeded sample). normalized: compare unit vectors by
    cosine (config.normalized_embeddings), else by Euclidean distance. Labels of both sets must
    index the same classes.
    """

    def __init__(
        self,
        queries: ImageList,
        data: dict,
        max_images: int,
        seed: int,
        normalized: bool,
        gallery: ImageList | None = None,
        metric: str = "recall@1",
    ):
        self.normalized, self.metric = normalized, metric
        leave_one_out = gallery is None
        self.queries = DecodedImages(
            _sample(queries, max_images, seed, by_class=leave_one_out), data
        )
        self.gallery = (
            None if gallery is None else DecodedImages(_sample(gallery, max_images, seed), data)
        )
        labels = self.queries.labels
        if self.gallery is None and not (np.bincount(labels) >= 2).any():
            raise UserError(
                f"train.validation: no two of the {len(labels)} validation images share a "
                "class, so Recall@1 is undefined; raise train.validation.holdout or "
                "train.validation.max_images, or set train.validation.source: none"
            )
        if self.gallery is not None and not np.isin(labels, self.gallery.labels).any():
            raise UserError(
                "train.validation: no validation image has a class among the training images "
                "it is searched in; raise train.validation.max_images"
            )

    def recall_at_1(self, model) -> float:
        return selection_score(self.metrics(model), "recall@1")

    def score(self, model) -> float:
        """The model's validation ``metric``: the number that selects the best weights."""
        return selection_score(self.metrics(model), self.metric)

    def metrics(self, model) -> Metrics:
        """:func:`retrieval.metrics.evaluate` of the model's validation embeddings."""
        queries = self.queries.embed(model, self.normalized)
        if self.gallery is None:
            gallery, exclude = queries, np.arange(len(queries))
        else:
            gallery, exclude = self.gallery.embed(model, self.normalized), None
        return evaluate(
            queries,
            self.queries.labels,
            gallery,
            self.gallery.labels if self.gallery is not None else self.queries.labels,
            normalized=self.normalized,
            exclude=exclude,
            r=1,
            ks=(1,),
            nmi=False,
        )


def _sample(images: ImageList, max_images: int, seed: int, by_class: bool = False) -> ImageList:
    """At most ``max_images`` of ``images``, seeded: a random sample of images, or with
    ``by_class`` whole classes of two images or more in a random order (leave-one-out needs
    each image's classmates: a sample of images from many small classes would leave mostly
    single images, which Recall@1 ignores)."""
    if len(images) <= max_images:
        return images
    rng = np.random.default_rng([seed, 11])
    if not by_class:
        return images.subset(np.sort(rng.permutation(len(images))[:max_images]))
    counts = images.class_counts()
    classes = rng.permutation(np.flatnonzero(counts >= 2))
    taken = classes[np.cumsum(counts[classes]) <= max_images]
    return images.subset(np.isin(images.labels, taken))


class DecodedImages:
    """A list's images decoded once at the evaluation size (centre crop), and their labels.

    An unreadable file is left out (with a warning naming it): ``indices`` (N,) int64 are the
    positions in ``images`` of the N images decoded, in order; ``pixels`` (N, h, w, 3) uint8 and
    ``labels`` (N,) int64 are theirs. Anything else kept per image of the list is indexed with
    ``indices`` to line up with them.
    """

    def __init__(self, images: ImageList, data: dict):
        pixels, positions = [], []
        for indices, batch in iter_eval_batches(
            images.absolute_paths(),
            image_size=tuple(data["image_size"]),
            resize=tuple(data["resize"]) if data["resize"] else None,
            batch_size=64,
        ):
            pixels.append(batch)
            positions.append(indices)
        if not pixels:
            raise UserError(
                f"none of the {len(images)} validation images can be read (the first: "
                f"{images.root / images.paths[0]}); replace them, or set "
                "train.validate_every: 0 to train without validation"
            )
        self.pixels = np.concatenate(pixels)
        self.indices = np.concatenate(positions).astype(np.int64)
        self.labels = images.labels[self.indices].astype(np.int64)

    def embed(self, model, normalized: bool, batch_size: int = 128) -> np.ndarray:
        """(N, D) float32 embeddings, as the run's search sees them."""
        embeddings = np.concatenate(
            [
                np.asarray(model(self.pixels[i : i + batch_size], training=False), np.float32)
                for i in range(0, len(self.pixels), batch_size)
            ]
        )
        return unit_rows(embeddings) if normalized else embeddings
