"""Where training runs: one device, all local GPUs (mirrored) or several machines (multi_worker).

P x K batches are split per replica into whole classes (replica r gets classes r*P/n ...), each
replica embeds its part, and the loss is computed on the whole batch: embeddings and labels are
all-gathered (differentiable), every replica computes the same loss scaled by 1/n, and the
optimiser's all-reduce sums the replicas' gradients into the gradient of the whole batch's loss.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from tfcbir import UserError

log = logging.getLogger("tfcbir")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """none: the default strategy; mirrored: every local GPU (without GPUs, the logical CPU
    devices if several are configured, else the CPU); multi_worker: TF_CONFIG's cluster."""
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        try:
            json.loads(os.environ.get("TF_CONFIG") or "")
        except ValueError:
            raise UserError(
                "train.distribute: multi_worker needs TF_CONFIG, the cluster as JSON (see the "
                "docs/training.md: several GPUs or machines)"
            ) from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) == 1:
        log.warning(
            "train.distribute: mirrored found one device (%s); training on it alone", devices[0]
        )
    return tf.distribute.MirroredStrategy(devices)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (one of several workers does)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


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
    if tensor.dtype.is_integer:  # collectives across workers carry floats only (labels < 2**24)
        return tf.cast(context.all_gather(tf.cast(tensor, tf.float32), axis=0), tensor.dtype)
    return context.all_gather(tensor, axis=0)
