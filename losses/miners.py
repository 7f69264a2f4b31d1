"""Miners: which pairs or triplets of a batch a loss learns from, as objects the loss is given
(pytorch-metric-learning's miners), chosen by the config's ``loss.miner``
(:data:`losses.catalog.MINERS`).

A miner reads a :class:`PairwiseBatch`, the (B, R) table of one distance between B anchors and R
references with the masks of their positive and negative pairs, and returns

- :class:`Pairs`: the kept positive and negative pairs, two (B, R) masks (``miner.pairs``); as
  triplets, every kept positive of an anchor goes with every kept negative of it;
- :class:`Triplets`: one negative per kept (anchor, positive) (``miner.triplets``), as the
  distances d(a, p) and d(a, n) of each kept entry.

The references are the batch itself unless a loss is given others (a cross-batch memory:
``loss(labels, embeddings, ref_labels=..., ref_embeddings=...)``); within the batch an anchor is
not its own positive. Nothing here builds a (B, R, R) tensor: O(B R) memory. Mining picks by
value; the gradient flows through the loss's terms (the picked distances stay differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from losses.base import class_masks, fill, sorted_negatives
from losses.catalog import MINERS, registered_name
from losses.distances import Distance


@dataclass(frozen=True)
class PairwiseBatch:
    """Anchors against references: ``values`` (B, R), a distance or, with ``larger_is_closer``,
    a similarity; ``positives`` (B, R) bool, same label (not the anchor itself); ``negatives``
    (B, R) bool, another label."""

    values: tf.Tensor
    positives: tf.Tensor
    negatives: tf.Tensor
    larger_is_closer: bool = False

    @classmethod
    def compare(
        cls, distance: Distance, labels, embeddings, ref_labels=None, ref_embeddings=None
    ) -> PairwiseBatch:
        """labels (B,), embeddings (B, D) against ref_labels (R,), ref_embeddings (R, D); None:
        against the batch itself."""
        if ref_embeddings is None:
            positives, negatives = class_masks(labels)
        else:
            same = tf.equal(labels[:, None], ref_labels[None, :])
            positives, negatives = same, tf.logical_not(same)
        values = distance.pairwise(embeddings, ref_embeddings)
        return cls(values, positives, negatives, distance.larger_is_closer)

    @property
    def distances(self) -> tf.Tensor:
        """(B, R), smaller is closer: the values, negated for a similarity."""
        return -self.values if self.larger_is_closer else self.values

    @property
    def closeness(self) -> tf.Tensor:
        """(B, R), larger is closer: the values, negated for a distance."""
        return self.values if self.larger_is_closer else -self.values


@dataclass(frozen=True)
class Pairs:
    """Kept pairs: ``positives`` and ``negatives``, (B, R) bool."""

    positives: tf.Tensor
    negatives: tf.Tensor


@dataclass(frozen=True)
class Triplets:
    """One negative per kept (anchor, positive): ``mask`` (bool), ``positive`` d(a, p) and
    ``negative`` d(a, n), all (B, R) (one entry per pair) or (B, 1) (one per anchor)."""

    mask: tf.Tensor
    positive: tf.Tensor
    negative: tf.Tensor


class Miner:
    """Picks pairs (:meth:`pairs`) or triplets (:meth:`triplets`) of a :class:`PairwiseBatch`."""

    @property
    def name(self) -> str:
        return registered_name(MINERS, type(self)) or type(self).__name__

    def pairs(self, batch: PairwiseBatch) -> Pairs:
        raise ValueError(f"the {self.name} miner picks triplets, not pairs")

    def triplets(self, batch: PairwiseBatch) -> Triplets | Pairs:
        """Triplets, or Pairs meaning every kept positive with every kept negative."""
        return self.pairs(batch)


class AllMiner(Miner):
    """Every positive and every negative pair."""

    def pairs(self, batch):
        return Pairs(batch.positives, batch.negatives)


class SemiHardMiner(Miner):
    """For every positive pair (a, p), the closest negative farther than the positive,
    d(a, n) > d(a, p) (strictly); if there is none, the farthest negative of the anchor; if the
    anchor has no negative at all, the smallest distance of its row (0, its own, within the
    batch): tensorflow-addons' ``TripletSemiHardLoss`` choice, same values and gradients.

    Addons tiles a (B*B, B) matrix (4 GB at B = 512). Here each anchor's negative distances are
    sorted once, and for each positive a batched binary search (``tf.searchsorted``) finds the
    first negative beyond it: O(B R) memory, O(B R log R) time. The chosen distance is gathered
    from the sorted, still differentiable, distances, so gradients reach d(a, p) and d(a, n) as
    in addons.
    """

    def triplets(self, batch):
        distances = batch.distances  # (B, R)
        sorted_distances, count = sorted_negatives(distances, batch.negatives)
        # Entry (a, p): how many of a's negatives are <= d(a, p); the next one is the semi-hard.
        first_beyond = tf.searchsorted(sorted_distances, distances, side="right")
        farthest = tf.maximum(count - 1, 0)[:, None]
        index = tf.where(first_beyond < count[:, None], first_beyond, farthest)
        negative = tf.gather(sorted_distances, index, batch_dims=1)  # (B, R)
        # No negative at all: addons' masked maximum over an empty mask is the row minimum.
        row_minimum = tf.reduce_min(distances, axis=1, keepdims=True)
        negative = tf.where(count[:, None] > 0, negative, row_minimum)
        return Triplets(batch.positives, distances, negative)


class BatchHardMiner(Miner):
    """Each anchor's hardest positive (the farthest) and hardest negative (the closest), for the
    anchors that have both (Hermans, Beyer and Leibe 2017)."""

    def triplets(self, batch):
        distances = batch.distances
        hardest_positive = tf.reduce_max(
            tf.where(batch.positives, distances, fill(-float("inf"), distances)), axis=1
        )
        hardest_negative = tf.reduce_min(
            tf.where(batch.negatives, distances, fill(float("inf"), distances)), axis=1
        )
        return Triplets(
            self.valid(batch)[:, None], hardest_positive[:, None], hardest_negative[:, None]
        )

    def pairs(self, batch):
        closeness = tf.stop_gradient(batch.closeness)
        farthest = tf.argmin(
            tf.where(batch.positives, closeness, fill(float("inf"), closeness)), axis=1
        )
        closest = tf.argmax(
            tf.where(batch.negatives, closeness, fill(-float("inf"), closeness)), axis=1
        )
        valid = self.valid(batch)[:, None]
        size = tf.shape(closeness)[1]
        positives = tf.one_hot(farthest, size, on_value=True, off_value=False)
        negatives = tf.one_hot(closest, size, on_value=True, off_value=False)
        return Pairs(tf.logical_and(positives, valid), tf.logical_and(negatives, valid))

    @staticmethod
    def valid(batch) -> tf.Tensor:
        """(B,) bool: the anchor has a positive and a negative."""
        return tf.logical_and(
            tf.reduce_any(batch.positives, axis=1), tf.reduce_any(batch.negatives, axis=1)
        )


class MultiSimilarityMiner(Miner):
    """The multi-similarity loss's pair mining (Wang et al. 2019, the authors' code), on
    closeness c (a similarity, or a negated distance): keep negative n if
    c(a, n) + epsilon > min_p c(a, p); keep positive p if c(a, p) - epsilon < max_n c(a, n)."""

    def __init__(self, epsilon: float):
        self.epsilon = float(epsilon)

    def pairs(self, batch):
        values = tf.stop_gradient(batch.closeness)
        hardest_positive = tf.reduce_min(
            tf.where(batch.positives, values, fill(float("inf"), values)), axis=1, keepdims=True
        )
        hardest_negative = tf.reduce_max(
            tf.where(batch.negatives, values, fill(-float("inf"), values)), axis=1, keepdims=True
        )
        kept_negatives = tf.logical_and(batch.negatives, values + self.epsilon > hardest_positive)
        kept_positives = tf.logical_and(batch.positives, values - self.epsilon < hardest_negative)
        return Pairs(kept_positives, kept_negatives)


def miner(name: str, params: dict | None = None) -> Miner:
    """The miner ``name`` (:data:`losses.catalog.MINERS`) with its parameters from ``params``
    (other keys ignored), the catalog's defaults for the missing ones."""
    entry = MINERS.get(name, "miner")
    params = params or {}
    return entry.builder(**{k: params.get(k, p.default) for k, p in entry.params.items()})
