"""Cross-batch memory (Wang, Zhang, Huang and Scott, "Cross-Batch Memory for Embedding
Learning", CVPR 2020): the embeddings of the last M training images, kept without gradient, as
extra references for a pair-based loss.

The loss of a step is the loss of the batch with itself plus ``weight`` times the loss of the
batch's anchors against the memory (the authors' ``loss = criterion(x, y, x, y) +
XBM.WEIGHT * criterion(x, y, mem_x, mem_y)``). The batch is enqueued after its loss, so the memory
holds the previous steps' embeddings; the authors enqueue first and so also compare the batch
with its own detached copy, where each anchor meets itself (they drop pairs of similarity
>= 1 - 1e-5 to skip it). Enqueueing starts at the step ``start_step`` (0-based; the memory stays
empty before it: early embeddings drift fast, the paper's reason for a start iteration); the
memory term is added once the memory holds something.

The queue is a ring: each step writes the batch's B rows at the pointer, modulo M (M >= B). Its
state (embeddings (M, D), labels (M,), the pointer and the filled count) is four non-trainable
variables, saved in checkpoints, so a resumed run continues with the memory it had.
"""

from __future__ import annotations

import tensorflow as tf


class CrossBatchMemory:
    """A FIFO of the last ``size`` embeddings (D-dimensional) and their labels.

    Create it inside the distribution strategy's scope: with several replicas its variables are
    mirrored, written from the first replica (every replica enqueues the same, all-gathered,
    global batch).
    """

    def __init__(self, size: int, dim: int, start_step: int = 0, weight: float = 1.0):
        self.size, self.start_step, self.weight = int(size), int(start_step), float(weight)
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA

        def variable(value, name):
            return tf.Variable(value, trainable=False, name=name, aggregation=first)

        self.embeddings = variable(tf.zeros([self.size, int(dim)], tf.float32), "memory_embeddings")
        self.labels = variable(tf.zeros([self.size], tf.int64), "memory_labels")
        self.pointer = variable(tf.constant(0, tf.int64), "memory_pointer")
        self.filled = variable(tf.constant(0, tf.int64), "memory_filled")

    @property
    def variables(self) -> list[tf.Variable]:
        """The checkpoint group "memory", in a fixed order."""
        return [self.embeddings, self.labels, self.pointer, self.filled]

    def contents(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(labels (F,), embeddings (F, D)): the filled rows (F = the filled count)."""
        filled = tf.cast(self.filled, tf.int32)
        return self.labels[:filled], self.embeddings[:filled]

    def enqueue(self, labels, embeddings, active=True) -> None:
        """Write labels (B,) and embeddings (B, D) (no gradient) over the oldest rows; nothing
        when ``active`` (a bool tensor) is false. Without a branch: assignments inside a
        ``tf.cond`` are not allowed in a replica of a MirroredStrategy."""
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        embeddings = tf.stop_gradient(tf.cast(embeddings, tf.float32))
        active = tf.convert_to_tensor(active)
        count = tf.shape(labels, out_type=tf.int64)[0]
        rows = ((self.pointer + tf.range(count)) % self.size)[:, None]
        written = tf.tensor_scatter_nd_update(self.embeddings, rows, embeddings)
        self.embeddings.assign(tf.where(active, written, self.embeddings))
        written = tf.tensor_scatter_nd_update(self.labels, rows, labels)
        self.labels.assign(tf.where(active, written, self.labels))
        count = tf.where(active, count, tf.zeros_like(count))
        self.pointer.assign((self.pointer + count) % self.size)
        self.filled.assign(tf.minimum(self.filled + count, self.size))

    def loss(self, loss_fn, labels, embeddings) -> tf.Tensor:
        """loss_fn(batch) + weight * loss_fn(batch against the memory) (the second term 0 while
        the memory is empty). labels (B,), embeddings (B, D) -> scalar."""
        batch_loss = loss_fn(labels, embeddings)

        def against_memory():
            ref_labels, ref_embeddings = self.contents()
            term = loss_fn(labels, embeddings, ref_labels=ref_labels, ref_embeddings=ref_embeddings)
            return tf.cast(term, batch_loss.dtype)

        memory_loss = tf.cond(
            self.filled > 0, against_memory, lambda: tf.zeros([], batch_loss.dtype)
        )
        return batch_loss + self.weight * memory_loss

    def enqueue_at(self, step, labels, embeddings) -> None:
        """Enqueue the batch of ``step`` (0-based) if it is ``start_step`` or later."""
        self.enqueue(labels, embeddings, tf.cast(step, tf.int64) >= self.start_step)
