"""P x K batch sampling: P classes per batch, K images of each.

A batch is a pure function of ``(seed, step)``, so a run resumed at step s sees exactly the batches
an uninterrupted run would have seen, without saving any sampler state.
"""

from __future__ import annotations

import math

import numpy as np

from tfcbir import UserError

# Tag of the per-step image draws: [seed, step, 2]. ([seed, step, 1] is the pipeline's
# augmentation; NumPy seeds [a, b] and [a, b, 0] are the same stream, hence no 0.)
_IMAGE_STREAM = 2


class PKSampler:
    """Indices of P x K batches over ``labels`` ``(N,)``.

    Classes: the classes present in ``labels`` are visited in rounds of ``ceil(C / P)`` steps; each
    round shuffles them with ``np.random.default_rng([seed, round])`` and each step takes the
    next P. The last step of a round, when C is not a multiple of P, is filled up with distinct
    classes drawn from the round's other classes, so every batch has P distinct classes and
    every class appears at least once per round.

    Images: K of each chosen class, drawn without replacement from
    ``np.random.default_rng([seed, step, 2])``. Only a class of n < K images repeats images, and
    as evenly as possible: each of its images appears floor(K / n) or ceil(K / n) times, so its
    group still holds distinct positives.
    """

    def __init__(self, labels: np.ndarray, P: int, K: int, seed: int):
        labels = np.asarray(labels).reshape(-1)
        if P < 1 or K < 1:
            raise UserError(f"train.batch: P={P} and K={K} must both be at least 1")
        self.P, self.K, self.seed = int(P), int(K), int(seed)
        self.classes, counts = np.unique(labels, return_counts=True)  # (C,) sorted labels
        if len(self.classes) < self.P:
            raise UserError(
                f"train.batch.P: {P} is more than the {len(self.classes)} classes "
                f"with training images; set train.batch.P to at most "
                f"{len(self.classes)}"
            )
        order = np.argsort(labels, kind="stable")
        # members[c]: indices of the images of class self.classes[c], in list order.
        self.members = np.split(order, np.cumsum(counts)[:-1])
        self.steps_per_round = math.ceil(len(self.classes) / self.P)

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def batch_classes(self, step: int) -> np.ndarray:
        """``(P,)`` positions into ``self.classes`` of the classes of batch ``step``."""
        round_, position = divmod(int(step), self.steps_per_round)
        rng = np.random.default_rng([self.seed, round_])
        permutation = rng.permutation(len(self.classes))
        chosen = permutation[position * self.P : (position + 1) * self.P]
        missing = self.P - len(chosen)
        if missing:
            # The round's last, short step: borrow distinct classes from earlier in the round.
            others = permutation[: position * self.P]
            chosen = np.concatenate([chosen, rng.choice(others, missing, replace=False)])
        return chosen

    def batch(self, step: int) -> np.ndarray:
        """``(P * K,)`` int64 image indices of batch ``step``: K consecutive per class."""
        rng = np.random.default_rng([self.seed, int(step), _IMAGE_STREAM])
        indices = np.empty(self.P * self.K, dtype=np.int64)
        for slot, c in enumerate(self.batch_classes(step)):
            members = self.members[c]
            indices[slot * self.K : (slot + 1) * self.K] = members[
                draw_without_repeats(rng, len(members), self.K)
            ]
        return indices


def draw_without_repeats(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``(k,)`` positions in ``range(n)``: distinct when k <= n, else every position
    floor(k / n) or ceil(k / n) times (in random order)."""
    repeats, extra = divmod(k, n)
    parts = [rng.permutation(n) for _ in range(repeats)]
    parts.append(rng.choice(n, extra, replace=False))
    return np.concatenate(parts)
