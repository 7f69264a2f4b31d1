"""semi_hard_triplet against tensorflow-addons' O(B^3) TripletSemiHardLoss, written out below as
addons computes it (tensorflow_addons/losses/triplet.py and metric_learning.py), and against
tiny cases computed by hand."""

import numpy as np
import pytest
import tensorflow as tf

import losses
from losses.triplet import SemiHardTripletLoss

ADDONS_METRIC = {"euclidean": "L2", "squared_euclidean": "squared-L2", "cosine": "angular"}


# --- tensorflow-addons, as written there (dtype generalised for float64 gradient checks) ------


def addons_pairwise_distance(feature, squared=False):
    dtype = feature.dtype
    pairwise_distances_squared = tf.math.add(
        tf.math.reduce_sum(tf.math.square(feature), axis=[1], keepdims=True),
        tf.math.reduce_sum(tf.math.square(tf.transpose(feature)), axis=[0], keepdims=True),
    ) - 2.0 * tf.matmul(feature, tf.transpose(feature))
    pairwise_distances_squared = tf.math.maximum(pairwise_distances_squared, 0.0)
    error_mask = tf.math.less_equal(pairwise_distances_squared, 0.0)
    if squared:
        pairwise_distances = pairwise_distances_squared
    else:
        pairwise_distances = tf.math.sqrt(
            pairwise_distances_squared + tf.cast(error_mask, dtype) * 1e-16
        )
    pairwise_distances = tf.math.multiply(
        pairwise_distances, tf.cast(tf.math.logical_not(error_mask), dtype)
    )
    num_data = tf.shape(feature)[0]
    mask_offdiagonals = tf.ones_like(pairwise_distances) - tf.linalg.diag(
        tf.ones([num_data], dtype)
    )
    return tf.math.multiply(pairwise_distances, mask_offdiagonals)


def addons_angular_distance(feature):
    feature = tf.math.l2_normalize(feature, axis=1)
    angular_distances = 1 - tf.matmul(feature, feature, transpose_b=True)
    angular_distances = tf.maximum(angular_distances, 0.0)
    mask_offdiagonals = tf.ones_like(angular_distances) - tf.linalg.diag(
        tf.ones([tf.shape(angular_distances)[0]], feature.dtype)
    )
    return tf.math.multiply(angular_distances, mask_offdiagonals)


def _masked_maximum(data, mask, dim=1):
    axis_minimums = tf.math.reduce_min(data, dim, keepdims=True)
    return (
        tf.math.reduce_max(tf.math.multiply(data - axis_minimums, mask), dim, keepdims=True)
        + axis_minimums
    )


def _masked_minimum(data, mask, dim=1):
    axis_maximums = tf.math.reduce_max(data, dim, keepdims=True)
    return (
        tf.math.reduce_min(tf.math.multiply(data - axis_maximums, mask), dim, keepdims=True)
        + axis_maximums
    )


def addons_triplet_semihard_loss(labels, embeddings, margin=1.0, distance_metric="L2"):
    lshape = tf.shape(labels)
    labels = tf.reshape(labels, [lshape[0], 1])
    if distance_metric == "L2":
        pdist_matrix = addons_pairwise_distance(embeddings, squared=False)
    elif distance_metric == "squared-L2":
        pdist_matrix = addons_pairwise_distance(embeddings, squared=True)
    else:
        pdist_matrix = addons_angular_distance(embeddings)
    dtype = pdist_matrix.dtype
    adjacency = tf.math.equal(labels, tf.transpose(labels))
    adjacency_not = tf.math.logical_not(adjacency)
    batch_size = tf.size(labels)
    # The O(B^3) part: a (B*B, B) tile, row (i, j) holding anchor j's distances.
    pdist_matrix_tile = tf.tile(pdist_matrix, [batch_size, 1])
    mask = tf.math.logical_and(
        tf.tile(adjacency_not, [batch_size, 1]),
        tf.math.greater(pdist_matrix_tile, tf.reshape(tf.transpose(pdist_matrix), [-1, 1])),
    )
    mask_final = tf.reshape(
        tf.math.greater(tf.math.reduce_sum(tf.cast(mask, dtype), 1, keepdims=True), 0.0),
        [batch_size, batch_size],
    )
    mask_final = tf.transpose(mask_final)
    adjacency_not = tf.cast(adjacency_not, dtype)
    mask = tf.cast(mask, dtype)
    negatives_outside = tf.reshape(
        _masked_minimum(pdist_matrix_tile, mask), [batch_size, batch_size]
    )
    negatives_outside = tf.transpose(negatives_outside)
    negatives_inside = tf.tile(_masked_maximum(pdist_matrix, adjacency_not), [1, batch_size])
    semi_hard_negatives = tf.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = tf.math.add(tf.constant(margin, dtype), pdist_matrix - semi_hard_negatives)
    mask_positives = tf.cast(adjacency, dtype) - tf.linalg.diag(tf.ones([batch_size], dtype))
    num_positives = tf.math.reduce_sum(mask_positives)
    return tf.math.truediv(
        tf.math.reduce_sum(tf.math.maximum(tf.math.multiply(loss_mat, mask_positives), 0.0)),
        num_positives,
    )


# --- helpers ----------------------------------------------------------------------------------


def value_and_gradient(fn, labels, embeddings):
    x = tf.constant(embeddings)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = fn(tf.constant(labels), x)
    return value.numpy(), tape.gradient(value, x).numpy()


def batch(P, K, D, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(rng.choice(1000, P, replace=False), K))
    return labels.astype(np.int32), rng.normal(size=(P * K, D)).astype(dtype)


# --- against addons ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize(
    ("P", "K", "D", "margin"),
    [
        (2, 2, 3, 1.0),
        (4, 3, 2, 0.5),
        (8, 4, 16, 1.0),
        (5, 5, 64, 0.2),
        (16, 2, 8, 2.0),
        (3, 7, 1, 0.1),
    ],
)
def test_values_and_gradients_match_addons(metric, P, K, D, margin):
    loss = SemiHardTripletLoss(margin=margin, metric=metric)
    for seed in range(2):
        labels, x = batch(P, K, D, seed)
        value, grad = value_and_gradient(loss, labels, x)
        ref_value, ref_grad = value_and_gradient(
            lambda y, e: addons_triplet_semihard_loss(y, e, margin, ADDONS_METRIC[metric]),
            labels,
            x,
        )
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)
        # float64: the gradients agree to rounding.
        value64, grad64 = value_and_gradient(loss, labels, x.astype(np.float64))
        ref64, ref_grad64 = value_and_gradient(
            lambda y, e: addons_triplet_semihard_loss(y, e, margin, ADDONS_METRIC[metric]),
            labels,
            x.astype(np.float64),
        )
        np.testing.assert_allclose(value64, ref64, rtol=1e-10)
        np.testing.assert_allclose(grad64, ref_grad64, rtol=1e-8, atol=1e-10)


def test_batches_with_unequal_classes_and_singletons_match_addons():
    rng = np.random.default_rng(7)
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5], np.int32)  # singletons 1, 3, 5
    x = rng.normal(size=(12, 6)).astype(np.float32)
    for metric in ADDONS_METRIC:
        value, grad = value_and_gradient(SemiHardTripletLoss(0.3, metric), labels, x)
        ref, ref_grad = value_and_gradient(
            lambda y, e, m=metric: addons_triplet_semihard_loss(y, e, 0.3, ADDONS_METRIC[m]),
            labels,
            x,
        )
        np.testing.assert_allclose(value, ref, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_same_graph_with_unknown_batch_size():
    loss = SemiHardTripletLoss(margin=0.5)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)]
    )
    def step(labels, embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            value = loss(labels, embeddings)
        return value, tape.gradient(value, embeddings)

    for P, K in [(3, 2), (6, 4)]:
        labels, x = batch(P, K, 5, P)
        value, grad = step(tf.constant(labels), tf.constant(x))
        ref, ref_grad = value_and_gradient(
            lambda y, e: addons_triplet_semihard_loss(y, e, 0.5), labels, x
        )
        np.testing.assert_allclose(value.numpy(), ref, rtol=1e-5)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-4, atol=1e-6)


# --- by hand ----------------------------------------------------------------------------------


def semi_hard(labels, points, margin=1.0, metric="euclidean"):
    x = np.asarray(points, np.float32).reshape(len(labels), -1)
    return float(SemiHardTripletLoss(margin, metric)(np.array(labels), x))


def test_by_hand_semi_hard_negative_exists():
    # 1-D: a0 = 0, p1 = 1 (class 0), n = 3. Pair (0, 1): d_ap 1, first negative beyond it 3:
    # max(2 + 1 - 3, 0) = 0. Pair (1, 0): d_ap 1, negative at distance 2: 2 + 1 - 2 = 1.
    assert semi_hard([0, 0, 1], [0, 1, 3], margin=2.0) == pytest.approx(0.5)


def test_by_hand_no_semi_hard_negative_takes_the_farthest():
    # Class 0 at 0 and 3, class 1 at 1. Pair (0, 1): d_ap 3, the only negative is at 1 < 3:
    # fallback 1, 1 + 3 - 1 = 3. Pair (1, 0): d_ap 3, negative at 2: 1 + 3 - 2 = 2. Mean 2.5.
    assert semi_hard([0, 0, 1], [0, 3, 1]) == pytest.approx(2.5)
    # Two negatives, both closer than the positive: the farther one (2) is used for anchor 0.
    # Anchor 0 (at 0), p at 5, negatives at 1 and 2: 1 + 5 - 2 = 4.
    # Anchor 5: d_ap 5, negatives at distance 4 and 3, both closer: farthest 4: 1 + 5 - 4 = 2.
    assert semi_hard([0, 0, 1, 1], [0, 5, 1, 2]) == pytest.approx((4 + 2 + 0 + 0) / 4)


def test_by_hand_tie_is_not_semi_hard():
    # Anchor 0 with positive 2 and negative -2: d_an == d_ap is not "farther" (strict), so the
    # fallback is the farthest negative, the same one: loss = margin = 1. Anchor 2 (positive 0):
    # negative at 4 > 2: 1 + 2 - 4 < 0 -> 0. Mean 0.5.
    assert semi_hard([0, 0, 1], [0, 2, -2]) == pytest.approx(0.5)
    # Anchor 0 (at 0), positive at 1: two negatives tie at distance 3 beyond it: 1 + 1 - 3 < 0.
    # Anchor 1: negatives at distance 2 and 4, 2 is beyond d_ap = 1: 1 + 1 - 2 = 0 (exactly at
    # the margin). Anchors 3 and -3 (d_ap 6): negatives at 3, 2 and 3, 4, none beyond 6: the
    # farthest, 1 + 6 - 3 = 4 and 1 + 6 - 4 = 3. Mean 7 / 4.
    labels, points = [0, 0, 1, 1], [0, 1, 3, -3]
    assert semi_hard(labels, points) == pytest.approx(1.75)
    ref = addons_triplet_semihard_loss(
        tf.constant(labels), tf.constant(np.float32(points)[:, None])
    )
    assert float(ref) == pytest.approx(1.75)


def test_by_hand_one_class_only_uses_the_row_minimum():
    # No negatives: addons' masked maximum over nothing is the row minimum, 0 (the anchor
    # itself), so each pair costs margin + d_ap. Pairs: 1, 3, 1, 2, 3, 2 -> (12 + 6) / 6 = 3.
    labels, points = [0, 0, 0], [0, 1, 3]
    assert semi_hard(labels, points) == pytest.approx(3.0)
    ref = addons_triplet_semihard_loss(
        tf.constant(labels), tf.constant(np.float32(points)[:, None])
    )
    assert float(ref) == pytest.approx(3.0)


def test_by_hand_no_positive_pair_is_zero_not_nan():
    x = np.float32([[0.0], [1.0], [3.0]])
    assert semi_hard([0, 1, 2], x) == 0.0
    assert np.isnan(float(addons_triplet_semihard_loss(tf.constant([0, 1, 2]), tf.constant(x))))
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = SemiHardTripletLoss()(tf.constant([0, 1, 2]), x)
    assert np.all(tape.gradient(value, x).numpy() == 0.0)


def test_by_hand_2d_squared_and_cosine():
    # (0,0), (0,2) class 0; (1,0) class 1. Squared: d_ap = 4, d(a0, n) = 1, d(a1, n) = 5.
    # Pair (0, 1): no negative beyond 4: fallback 1 -> 1 + 4 - 1 = 4. Pair (1, 0): 5 > 4 -> 0.
    points = [[0, 0], [0, 2], [1, 0]]
    assert semi_hard([0, 0, 1], points, 1.0, "squared_euclidean") == pytest.approx(2.0)
    # Cosine: (1,0), (0,1) class 0; (1,1) class 1. d_ap = 1, d(a, n) = 1 - 1/sqrt(2) for both
    # anchors: no semi-hard, fallback 1 - 1/sqrt(2): 0.5 + 1 - 0.29289 = 1.20711 for each pair.
    points = [[1, 0], [0, 1], [1, 1]]
    assert semi_hard([0, 0, 1], points, 0.5, "cosine") == pytest.approx(
        0.5 + 1 / np.sqrt(2), rel=1e-6
    )


def test_half_precision_is_computed_in_float32():
    labels, x = batch(4, 3, 8, 3)
    for dtype in (tf.float16, tf.bfloat16):
        low = tf.cast(tf.constant(x), dtype)
        value = SemiHardTripletLoss()(labels, low)
        assert value.dtype == tf.float32
        expected = addons_triplet_semihard_loss(labels, tf.cast(low, tf.float32))
        np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-5)


def test_get_builds_it_from_params():
    loss = losses.get({"name": "semi_hard_triplet", "margin": 0.2, "metric": "cosine"})
    assert isinstance(loss, SemiHardTripletLoss)
    assert (loss.margin, loss.metric) == (0.2, "cosine")
