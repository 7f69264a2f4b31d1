"""Where training runs: one device, or all local GPUs (mirrored).

P x K batches are split per replica into whole classes (replica r gets classes r*P/n ...), each
replica embeds its part, and the loss is computed on the whole batch: embeddings and labels are
all-gathered (differentiable), every replica computes the same loss scaled by 1/n, and the
optimiser's all-reduce sums the replicas' gradients into the gradient of the whole batch's loss.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from tfcbir import UserError

log = logging.getLogger("tfcbir")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """none: the default strategy; mirrored: every local GPU (without GPUs, the logical CPU
    devices if several are configured, else the CPU)."""
    if name == "none":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) == 1:
        log.warning(
            "train.distribute: mirrored found one device (%s); training on it alone", devices[0]
        )
    return tf.distribute.MirroredStrategy(devices)


def check_batch_split(P: int, replicas: int) -> None:
    if P % replicas:
        raise UserError(
            f"train.batch.P: {P} classes cannot be split evenly over {replicas} "
            f"replicas; give a multiple of {replicas} so each replica sees whole "
            "classes"
        )


def split_per_replica(strategy: tf.distribute.Strategy, *tensors):
    """Give replica r the r-th contiguous part of each batch (whole classes: K rows each)."""
    n = strategy.num_replicas_in_sync
    if n == 1:
        return tensors

    def part(context, tensor):
        size = tensor.shape[0] // n
        start = context.replica_id_in_sync_group * size
        return tensor[start : start + size]

    return tuple(
        strategy.experimental_distribute_values_from_function(lambda context, t=t: part(context, t))
        for t in tensors
    )


def gather(tensor):
    """The whole batch of a per-replica tensor, inside a replica (identity with one replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    return context.all_gather(tensor, axis=0)
