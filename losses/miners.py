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
    dim: tf.Tensor | int | None = None  # the embedding dimension D (the distance-weighted n)

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
        return cls(
            values, positives, negatives, distance.larger_is_closer, tf.shape(embeddings)[-1]
        )

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
    """Picks pairs (:meth:`pairs`) or triplets (:meth:`triplets`) of a :class:`PairwiseBatch`.

    A miner that draws at random reads its stateless seed from :meth:`draw_seed`, a (2,) int64
    tensor: (0, 0) until :meth:`seed_draws` ties it to the run's seed and training step, so that
    a draw is a function of (seed, step) and a resumed run draws what the uninterrupted one did.
    """

    step_seed = None  # set by seed_draws: a function giving the (2,) seed

    def seed_draws(self, seed: int, step) -> None:
        """Draw from (seed, step()): step, a function giving the step as an integer tensor."""
        self.step_seed = lambda: tf.stack([tf.constant(seed, tf.int64), tf.cast(step(), tf.int64)])

    def draw_seed(self) -> tf.Tensor:
        """(2,) int64: the stateless seed of this step's draws."""
        return self.step_seed() if self.step_seed else tf.constant([0, 0], tf.int64)

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


def distance_weights(
    distances, negatives, dim: int, cutoff: float, nonzero_loss_cutoff: float
) -> tf.Tensor:
    """Each anchor's probabilities of drawing each reference as its negative, (B, R), rows summing
    to 1 (Wu et al. 2017, the authors' ``DistanceWeightedSampling``): proportional to 1 / q(d),
    q(d) proportional to d^(n-2) (1 - d^2 / 4)^((n-3)/2) the density of the distance between two
    points drawn uniformly on the unit sphere of R^n, d clipped below at ``cutoff``; 0 for the
    references that are not negatives or are at ``nonzero_loss_cutoff`` or farther (they would
    add no loss). A row without such a negative draws uniformly among its negatives (the
    authors' fallback draws among all).

    distances (B, R): Euclidean distances between unit vectors; negatives (B, R) bool; dim: n.
    """
    distances = tf.maximum(tf.stop_gradient(distances), cutoff)
    dim = tf.cast(dim, distances.dtype)
    eligible = tf.logical_and(negatives, distances < nonzero_loss_cutoff)
    # -log q(d) on the eligible entries only: log(1 - d^2/4) is -inf at d = 2.
    safe = tf.where(eligible, distances, tf.ones_like(distances))
    log_weights = (2.0 - dim) * tf.math.log(safe) - (dim - 3.0) / 2.0 * tf.math.log(
        1.0 - 0.25 * tf.square(safe)
    )
    some = tf.reduce_any(eligible, axis=1, keepdims=True)
    kept = tf.where(some, eligible, negatives)
    logits = tf.where(some, log_weights, tf.zeros_like(log_weights))
    logits = tf.where(kept, logits, fill(-float("inf"), logits))
    # A row without any negative gets zeros (no pair of it is kept).
    has_negative = tf.reduce_any(negatives, axis=1, keepdims=True)
    probabilities = tf.nn.softmax(tf.where(has_negative, logits, tf.zeros_like(logits)), axis=1)
    return tf.where(has_negative, probabilities, tf.zeros_like(probabilities))


class DistanceWeightedMiner(Miner):
    """One negative per positive pair (a, p), drawn among a's negatives with probability
    proportional to the inverse density of their distance on the unit sphere
    (:func:`distance_weights`; Wu, Manmatha, Smola and Krahenbuhl, "Sampling Matters in Deep
    Embedding Learning", ICCV 2017): hard and easy negatives alike, not only the hardest. The
    distances must be Euclidean between unit vectors (metric euclidean, a normalising head).
    The draw is stateless, seeded by ``draw_seed()`` (the run's seed and step)."""

    def __init__(self, cutoff: float, nonzero_loss_cutoff: float):
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)

    def weights(self, batch) -> tf.Tensor:
        """(B, R): each anchor's probabilities of drawing each reference."""
        return distance_weights(
            batch.distances, batch.negatives, batch.dim, self.cutoff, self.nonzero_loss_cutoff
        )

    def draw(self, batch) -> tf.Tensor:
        """(B, R) int32: entry (a, p), the reference drawn as the negative of the pair (a, p)."""
        probabilities = self.weights(batch)
        drawable = probabilities > 0.0
        # Never-drawn references get a huge negative logit (a row without negatives draws
        # anything: its pairs are not kept).
        logits = tf.where(
            drawable,
            tf.math.log(tf.where(drawable, probabilities, tf.ones_like(probabilities))),
            fill(-1e30, probabilities),
        )
        size = tf.shape(probabilities)[1]
        return tf.random.stateless_categorical(logits, size, self.draw_seed(), dtype=tf.int32)

    def valid(self, batch) -> tf.Tensor:
        """(B, R) bool: the positive pairs whose anchor has a negative."""
        return tf.logical_and(batch.positives, tf.reduce_any(batch.negatives, axis=1)[:, None])

    def triplets(self, batch):
        distances = batch.distances
        negative = tf.gather(distances, self.draw(batch), batch_dims=1)  # (B, R)
        return Triplets(self.valid(batch), distances, negative)

    def pairs(self, batch):
        draws = self.draw(batch)
        valid = self.valid(batch)
        # Every drawn negative of a kept positive pair, marked by a scatter: O(B R).
        rows = tf.broadcast_to(tf.range(tf.shape(draws)[0])[:, None], tf.shape(draws))
        indices = tf.stack([tf.boolean_mask(rows, valid), tf.boolean_mask(draws, valid)], axis=1)
        hits = tf.scatter_nd(indices, tf.ones(tf.shape(indices)[:1], tf.int32), tf.shape(draws))
        return Pairs(valid, tf.logical_and(hits > 0, batch.negatives))


def miner(name: str, params: dict | None = None) -> Miner:
    """The miner ``name`` (:data:`losses.catalog.MINERS`) with its parameters from ``params``
    (other keys ignored), the catalog's defaults for the missing ones."""
    entry = MINERS.get(name, "miner")
    params = params or {}
    return entry.builder(**{k: params.get(k, p.default) for k, p in entry.params.items()})
