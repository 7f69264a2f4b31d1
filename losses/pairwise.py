"""The base of the losses built from parts: a distance, a miner and a formula on the (B, R) table
of the distance between anchors and references (:class:`losses.miners.PairwiseBatch`).

The parts come from the loss's parameters: ``metric`` names the distance
(:func:`losses.distances.distance`), ``miner`` the miner and its parameters
(:func:`losses.miners.miner`); a formula defined on one distance or without mining says so by
overriding :meth:`PairwiseLoss.make_distance` or leaving ``miner`` out of its catalog entry.
"""

from __future__ import annotations

from losses.base import MetricLoss
from losses.distances import Distance, distance
from losses.miners import Miner, PairwiseBatch, miner


class PairwiseLoss(MetricLoss):
    """A formula (:meth:`compute`) on a :class:`PairwiseBatch`, given ``self.distance`` (a
    :class:`~losses.distances.Distance`) and ``self.mining`` (a :class:`~losses.miners.Miner`,
    None for a formula without a ``miner`` key). Called as ``loss(labels (B,), embeddings (B, D))``
    or, against references, ``loss(labels, embeddings, ref_labels=(R,), ref_embeddings=(R, D))``.
    """

    takes_references = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.distance = self.make_distance()
        self.mining = self.make_miner()

    def make_distance(self) -> Distance:
        return distance(self.metric)

    def make_miner(self) -> Miner | None:
        if "miner" not in self.param_spec():
            return None
        return miner(self.miner, self.param_config())

    def seed_draws(self, seed: int, step) -> None:
        """Tie a drawing miner's draws to (seed, step()) (:meth:`losses.miners.Miner.seed_draws`)."""
        if self.mining is not None:
            self.mining.seed_draws(seed, step)

    def call(self, labels, embeddings, ref_labels=None, ref_embeddings=None):
        batch = PairwiseBatch.compare(self.distance, labels, embeddings, ref_labels, ref_embeddings)
        return self.compute(batch)

    def compute(self, batch: PairwiseBatch):
        """The loss of ``batch`` -> scalar."""
        raise NotImplementedError
