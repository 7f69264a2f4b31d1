"""What the losses share: their base classes and a few masked reductions.

Three kinds of loss:

- :class:`MetricLoss` (a ``keras.losses.Loss``): a function of the batch only.
- :class:`ClassVectorLoss` (a ``keras.layers.Layer``): learns one vector per class (proxies, class
  weights) that the trainer optimises with the model and saves in checkpoints. It creates them on
  its first call, from the embedding dimension.
- :class:`ImageTextLoss` (a ``keras.layers.Layer``): the dual encoders' losses.

Every loss class takes the parameters its catalog entry declares (:mod:`losses.catalog`), in
that order, with the entry's defaults (:class:`CatalogParams`): the catalog is the one place of a
default, and of the class's registry name.

Both are called as ``loss(labels, embeddings)``: labels (B,) integers (floats are accepted, as
Keras may send them), embeddings (B, D) of any float type, computed in float32 (float64 stays
float64, which the tests use for finite differences). The result is a scalar in that dtype.

Every reduction here is masked and guarded so that an empty set (no positive pair, no negative)
gives a defined value and finite gradients: ``tf.where`` is applied *before* ``exp``/``log``/
``sqrt`` so that the branch it drops never holds an inf whose zero gradient would become NaN.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.catalog import LOSSES, bind_params, registered_name


def prepare(labels, embeddings, dtype=None) -> tuple[tf.Tensor, tf.Tensor]:
    """Labels -> (B,) integers; embeddings -> (B, D) in ``dtype``.

    dtype: None picks float64 for float64 embeddings and float32 for all others (float16 and
    bfloat16 included: distances and exponentials need float32's range and precision).
    """
    embeddings = tf.convert_to_tensor(embeddings)
    if dtype is None:
        dtype = tf.float64 if embeddings.dtype == tf.float64 else tf.float32
    embeddings = tf.cast(embeddings, dtype)
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:  # Keras casts y_true to float
        labels = tf.cast(labels, tf.int64)
    labels = tf.reshape(labels, [-1])  # (B,) or (B, 1) -> (B,)
    tf.debugging.assert_equal(
        tf.shape(labels)[0],
        tf.shape(embeddings)[0],
        message="labels and embeddings differ in batch size",
    )
    return labels, embeddings


def class_masks(labels) -> tuple[tf.Tensor, tf.Tensor]:
    """(positives, negatives), both (B, B) bool: same class without the diagonal; other class."""
    same = tf.equal(labels[:, None], labels[None, :])
    index = tf.range(tf.shape(labels)[0])
    positives = tf.logical_and(same, index[:, None] != index[None, :])
    return positives, tf.logical_not(same)


def fill(value: float, like: tf.Tensor) -> tf.Tensor:
    """A scalar ``value`` in ``like``'s dtype (``tf.where`` does not convert Python floats)."""
    return tf.constant(value, like.dtype)


def masked_mean(values, mask) -> tf.Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty (instead of 0/0)."""
    total = tf.reduce_sum(tf.where(mask, values, tf.zeros_like(values)))
    count = tf.reduce_sum(tf.cast(mask, values.dtype))
    return tf.math.divide_no_nan(total, count)


def masked_logsumexp(values, mask, axis: int, add_one: bool = False) -> tf.Tensor:
    """log(sum of exp(values) where mask) along ``axis``; with ``add_one``, log(1 + sum).

    Stabilised by the masked maximum (a constant for the gradient). An empty set gives -inf
    (0 with ``add_one``) and zero gradients.
    """
    neg_inf = fill(-float("inf"), values)
    peak = tf.reduce_max(tf.where(mask, values, neg_inf), axis=axis, keepdims=True)
    if add_one:
        peak = tf.maximum(peak, 0.0)
    peak = tf.stop_gradient(tf.where(tf.math.is_finite(peak), peak, tf.zeros_like(peak)))
    total = tf.reduce_sum(tf.exp(tf.where(mask, values - peak, neg_inf)), axis=axis, keepdims=True)
    if add_one:
        total += tf.exp(-peak)
    nonempty = total > 0.0
    result = tf.where(
        nonempty, tf.math.log(tf.where(nonempty, total, tf.ones_like(total))) + peak, neg_inf
    )
    return tf.squeeze(result, axis)


def pair_softmax_loss(similarities, positives, negatives) -> tf.Tensor:
    """Mean over same-class pairs (a, p) of log(1 + sum_n exp(s_an - s_ap)), n of another class.

    The softmax cross-entropy of the positive against the anchor's negatives (N-pair, NT-Xent).
    similarities, positives, negatives: (B, B). Pairs whose anchor has no negative give 0.
    O(B^2): the sum over n depends on the anchor only, so it is one log-sum-exp per row.
    """
    negatives_lse = masked_logsumexp(similarities, negatives, axis=1)  # (B,), -inf if none
    per_pair = tf.nn.softplus(negatives_lse[:, None] - similarities)
    return masked_mean(per_pair, positives)


def l2_penalty(embeddings, l2_reg: float) -> tf.Tensor:
    """l2_reg / 2 * mean squared norm of (B, D) embeddings: tf.contrib npairs_loss's regulariser
    0.25 * reg_lambda * (mean ||anchor||^2 + mean ||positive||^2) over a whole batch."""
    return 0.5 * l2_reg * tf.reduce_mean(tf.reduce_sum(tf.square(embeddings), axis=1))


def sorted_negatives(distances, negatives) -> tuple[tf.Tensor, tf.Tensor]:
    """Each anchor's negative distances in ascending order, padded with +inf, and their count.

    distances, negatives: (B, B). Returns sorted (B, B) and count (B,) int32. The sorted values
    stay differentiable with respect to ``distances`` (top_k's gradient scatters them back).
    """
    count = tf.reduce_sum(tf.cast(negatives, tf.int32), axis=1)
    padded = tf.where(negatives, distances, fill(float("inf"), distances))
    descending, _ = tf.math.top_k(-padded, k=tf.shape(distances)[1])
    return -descending, count


class CatalogParams:
    """The parameters of the catalog entry that names the class: ``registry_name`` (the entry's
    name) and one attribute per parameter (``self.margin``), given in the entry's order or by
    name, the others at the entry's defaults (:meth:`split_params`, then :meth:`set_params` once
    Keras' ``__init__`` has run). ``param_config`` gives them back for ``get_config``.

    ``param_attributes`` renames a parameter's attribute (a name the class uses for a weight);
    ``skipped_params`` are entry keys that are not the class's (built by :func:`losses.get_dual`).
    """

    registry_name = ""
    param_attributes: dict[str, str] = {}
    skipped_params: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A subclass the catalog does not list (a user's variant) keeps its parent's entry.
        cls.registry_name = registered_name(LOSSES, cls) or cls.registry_name

    @classmethod
    def param_spec(cls) -> dict:
        """The entry's parameters this class takes, in order."""
        if not cls.registry_name:
            raise TypeError(
                f"{cls.__name__} is not in the loss catalog: build one of its registered "
                "subclasses (losses.get)"
            )
        spec = LOSSES.get(cls.registry_name).params
        return {k: p for k, p in spec.items() if k not in cls.skipped_params}

    def split_params(self, args: tuple, kwargs: dict) -> tuple[dict, dict]:
        """(the parameters from ``args`` and ``kwargs``, defaults filled; the other kwargs)."""
        return bind_params(self.param_spec(), args, kwargs, type(self).__name__)

    def set_params(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, self.param_attributes.get(key, key), value)

    def param_config(self) -> dict:
        return {k: getattr(self, self.param_attributes.get(k, k)) for k in self.param_spec()}


class MetricLoss(CatalogParams, keras.losses.Loss):
    """Base of the losses without weights: ``loss(labels (B,), embeddings (B, D))`` -> scalar.

    ``__call__`` skips Keras' per-sample machinery: it would cast the integer labels to float
    and reduce per-sample values, while these losses compare labels and return one value per
    batch. Subclasses implement ``call(labels, embeddings)``; the parameters are the catalog's.

    ``ref_labels`` (R,) and ``ref_embeddings`` (R, D): references other than the batch (a
    cross-batch memory), for the losses with ``takes_references``; None compares the batch with
    itself.
    """

    takes_references = False

    def __init__(self, *args, name=None, **kwargs):
        values, rest = self.split_params(args, kwargs)
        super().__init__(name=name or self.registry_name or None, **rest)
        self.set_params(values)

    def __call__(self, y_true, y_pred, sample_weight=None, ref_labels=None, ref_embeddings=None):
        if sample_weight is not None:
            raise ValueError(f"{self.name} is a batch loss; it takes no sample_weight")
        with tf.name_scope(self.name):
            labels, embeddings = prepare(y_true, y_pred)
            if ref_labels is None and ref_embeddings is None:
                return self.call(labels, embeddings)
            if not self.takes_references or ref_labels is None or ref_embeddings is None:
                raise ValueError(
                    f"{self.name} takes both ref_labels and ref_embeddings, or neither"
                    if self.takes_references
                    else f"{self.name} compares the batch with itself only (no references)"
                )
            ref_labels, ref_embeddings = prepare(ref_labels, ref_embeddings, embeddings.dtype)
            ref_labels = tf.cast(ref_labels, labels.dtype)  # int32 batch, int64 memory
            return self.call(labels, embeddings, ref_labels, ref_embeddings)

    def call(self, labels, embeddings):
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), **self.param_config()}


class ClassVectorLoss(CatalogParams, keras.layers.Layer):
    """Base of the losses that learn one vector per class: ``loss(labels, embeddings)``.

    The (num_classes, D) variable is created on the first call (or by ``build``) from the
    embedding dimension. It belongs to this layer, not to the embedding model: the trainer
    optimises ``trainable_variables`` alongside the model, with its learning rate multiplied by
    ``lr_multiplier``, and saves ``weights`` in checkpoints. Computes in float32 whatever the
    global mixed-precision policy (pass ``dtype="float64"`` for float64).
    """

    vector_name = "class_vectors"
    lr_multiplier = 1.0

    def __init__(self, num_classes: int, *args, name=None, dtype="float32", **kwargs):
        values, rest = self.split_params(args, kwargs)
        super().__init__(name=name or self.registry_name or None, dtype=dtype, **rest)
        self.set_params(values)
        self.num_classes = int(num_classes)
        self.class_vectors = None

    def initializer(self):
        raise NotImplementedError

    def build(self, labels_shape, embeddings_shape):
        dim = embeddings_shape[-1]
        if dim is None:
            raise ValueError(
                f"{self.name} needs the embedding dimension to build its {self.vector_name}"
            )
        self.class_vectors = self.add_weight(
            shape=(self.num_classes, int(dim)),
            initializer=self.initializer(),
            name=self.vector_name,
            trainable=True,
        )

    def call(self, labels, embeddings):
        labels, embeddings = prepare(labels, embeddings, self.compute_dtype)
        tf.debugging.assert_non_negative(labels, message=f"{self.name}: negative label")
        tf.debugging.assert_less(
            labels,
            tf.cast(self.num_classes, labels.dtype),
            message=f"{self.name}: a label is >= num_classes",
        )
        return self.compute(labels, embeddings, tf.cast(self.class_vectors, embeddings.dtype))

    def compute(self, labels, embeddings, class_vectors):
        """labels (B,), embeddings (B, D), class_vectors (C, D) -> scalar."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, **self.param_config()}


def constant(value: float):
    """An initializer filling a weight with ``value``, exact in float64 (keras' Constant
    initializer rounds through float32)."""

    def initializer(shape, dtype=None):
        return tf.fill(shape, tf.constant(value, dtype=dtype or "float32"))

    return initializer


class ImageTextLoss(CatalogParams, keras.layers.Layer):
    """Base of the dual-encoder losses: ``loss(image_embeddings, text_embeddings, groups)``.

    Pair i is image i with its caption i: image_embeddings and text_embeddings (B, D), any float
    type, L2-normalised here; groups (B,) integers, pairs of one group (the same image, the same
    caption, or the same class, see :func:`datasets.captions.pair_groups`) are not negatives of
    each other and are left out of the loss. The temperature (and bias) are trainable weights of
    this layer, created in ``__init__``; the trainer optimises them with the model and saves them
    in checkpoints. Computes in float32 whatever the mixed-precision policy (``dtype="float64"``
    for float64); returns a scalar.
    """

    lr_multiplier = 1.0
    skipped_params = ("image_loss",)  # losses.get_dual builds it

    def __init__(self, *args, name=None, dtype="float32", **kwargs):
        values, rest = self.split_params(args, kwargs)
        super().__init__(name=name or self.registry_name or None, dtype=dtype, **rest)
        self.set_params(values)

    def call(self, image_embeddings, text_embeddings, groups):
        # Unit rows, x / max(|x|, 1e-12) as torch.nn.functional.normalize (a zero row stays
        # zero, with finite gradients).
        images = tf.math.l2_normalize(
            tf.cast(image_embeddings, self.compute_dtype), axis=1, epsilon=1e-24
        )
        texts = tf.math.l2_normalize(
            tf.cast(text_embeddings, self.compute_dtype), axis=1, epsilon=1e-24
        )
        groups = tf.reshape(tf.convert_to_tensor(groups), [-1])
        tf.debugging.assert_equal(
            tf.shape(images), tf.shape(texts), message="image and text embeddings differ in shape"
        )
        tf.debugging.assert_equal(
            tf.shape(groups)[0], tf.shape(images)[0], message="groups and embeddings differ"
        )
        similarities = tf.matmul(images, texts, transpose_b=True)  # (B, B): image i, text j
        # Pairs of one group are neither positives nor negatives of each other: left out.
        left_out, _ = class_masks(groups)
        return self.compute(similarities, left_out)

    def compute(self, similarities, left_out):
        """similarities (B, B) cosines of image i and text j; left_out (B, B) bool -> scalar."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), **self.param_config()}
