"""Every loss but semi_hard_triplet against a plain NumPy loop over the paper's formula (values in
float32 and float64, gradients against finite differences of the loop), and tiny cases computed
by hand. semi_hard_triplet is checked against tensorflow-addons in test_losses_semi_hard.py."""

import math
from functools import partial

import numpy as np
import pytest
import tensorflow as tf

import losses

METRICS = ["euclidean", "squared_euclidean", "cosine"]

# --- the formulas, written as loops over pairs and triplets in float64 -----------------------


def distances(x, metric):
    diff = x[:, None, :] - x[None, :, :]
    if metric == "euclidean":
        return np.sqrt((diff**2).sum(-1))
    if metric == "squared_euclidean":
        return (diff**2).sum(-1)
    return 1.0 - cosines(x, x)


def cosines(x, y):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x @ y.T


def pairs(labels):
    """Ordered same-class pairs (a, p), a != p."""
    n = len(labels)
    return [(a, p) for a in range(n) for p in range(n) if a != p and labels[a] == labels[p]]


def others(labels, a):
    return [n for n in range(len(labels)) if labels[n] != labels[a]]


def ref_batch_hard(labels, x, margin=0.3, soft_margin=False, metric="euclidean"):
    d, per_anchor = distances(x, metric), []
    for a in range(len(labels)):
        pos = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in others(labels, a)]
        if pos and neg:
            gap = max(pos) - min(neg)
            per_anchor.append(np.log1p(np.exp(gap)) if soft_margin else max(margin + gap, 0.0))
    return np.mean(per_anchor) if per_anchor else 0.0


def ref_batch_all(labels, x, margin=0.2, metric="euclidean"):
    d = distances(x, metric)
    terms = [margin + d[a, p] - d[a, n] for a, p in pairs(labels) for n in others(labels, a)]
    violating = [t for t in terms if t > 0]
    return sum(violating) / len(violating) if violating else 0.0


def ref_contrastive(labels, x, pos_margin=0.0, neg_margin=1.0, metric="euclidean"):
    d, n = distances(x, metric), len(labels)

    def mean_nonzero(values):
        nonzero = [v for v in values if v > 0]
        return sum(nonzero) / len(nonzero) if nonzero else 0.0

    pos = [max(d[a, p] - pos_margin, 0.0) for a, p in pairs(labels)]
    neg = [
        max(neg_margin - d[i, j], 0.0) for i in range(n) for j in range(n) if labels[i] != labels[j]
    ]
    return mean_nonzero(pos) + mean_nonzero(neg)


def ref_lifted_structure(labels, x, margin=1.0, metric="euclidean"):
    d = distances(x, metric)
    unordered = [(i, j) for i, j in pairs(labels) if i < j]
    total = 0.0
    for i, j in unordered:
        inside = sum(np.exp(margin - d[i, k]) for k in others(labels, i))
        inside += sum(np.exp(margin - d[j, k]) for k in others(labels, j))
        if inside > 0:
            total += max(np.log(inside) + d[i, j], 0.0) ** 2
    return total / (2 * len(unordered)) if unordered else 0.0


def ref_npair(labels, x, l2_reg=0.002):
    terms = [
        np.log(1 + sum(np.exp(x[a] @ x[n] - x[a] @ x[p]) for n in others(labels, a)))
        for a, p in pairs(labels)
    ]
    return (np.mean(terms) if terms else 0.0) + 0.25 * l2_reg * 2 * np.mean((x**2).sum(1))


def ref_angular(labels, x, alpha=45.0, l2_reg=0.0):
    t = math.tan(math.radians(alpha)) ** 2
    terms = []
    for a, p in pairs(labels):
        f = [4 * t * (x[a] + x[p]) @ x[n] - 2 * (1 + t) * x[a] @ x[p] for n in others(labels, a)]
        terms.append(np.log(1 + sum(np.exp(v) for v in f)))
    return (np.mean(terms) if terms else 0.0) + 0.5 * l2_reg * np.mean((x**2).sum(1))


def ref_multi_similarity(labels, x, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    # As the authors' code (MalongTech/research-ms-loss), the self pair skipped by index.
    s, total = cosines(x, x), 0.0
    for i in range(len(labels)):
        pos_all = [s[i, j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg_all = [s[i, j] for j in others(labels, i)]
        if not pos_all or not neg_all:
            continue
        neg = [v for v in neg_all if v + epsilon > min(pos_all)]
        pos = [v for v in pos_all if v - epsilon < max(neg_all)]
        if not neg or not pos:
            continue
        total += np.log(1 + sum(np.exp(-alpha * (v - base)) for v in pos)) / alpha
        total += np.log(1 + sum(np.exp(beta * (v - base)) for v in neg)) / beta
    return total / len(labels)


def ref_ntxent(labels, x, temperature=0.07):
    s = cosines(x, x) / temperature
    terms = [
        -np.log(
            np.exp(s[a, p]) / (np.exp(s[a, p]) + sum(np.exp(s[a, n]) for n in others(labels, a)))
        )
        for a, p in pairs(labels)
    ]
    return np.mean(terms) if terms else 0.0


def ref_proxy_anchor(labels, x, vectors, alpha=32.0, margin=0.1):
    # The authors' Proxy_Anchor.forward, class by class.
    s = cosines(x, vectors)
    C = len(vectors)
    present = [c for c in range(C) if c in set(labels)]
    pos = sum(
        np.log(
            1
            + sum(np.exp(-alpha * (s[i, c] - margin)) for i in range(len(labels)) if labels[i] == c)
        )
        for c in present
    )
    neg = sum(
        np.log(
            1
            + sum(np.exp(alpha * (s[i, c] + margin)) for i in range(len(labels)) if labels[i] != c)
        )
        for c in range(C)
    )
    return (pos / len(present) if present else 0.0) + neg / C


def ref_arcface(labels, x, vectors, scale=64.0, margin=0.5):
    cos = np.clip(cosines(x, vectors), -1, 1)
    total = 0.0
    for i, y in enumerate(labels):
        logits = scale * cos[i].copy()
        theta = np.arccos(cos[i, y])
        if theta + margin <= np.pi:
            logits[y] = scale * np.cos(theta + margin)
        else:
            logits[y] = scale * (cos[i, y] - margin * np.sin(margin))
        top = logits.max()
        total += top + np.log(np.exp(logits - top).sum()) - logits[y]
    return total / len(labels)


# name -> (reference, parameter sets to try; metric added where the loss takes one)
REFERENCES = {
    "batch_hard_triplet": (ref_batch_hard, [{}, {"margin": 1.0}, {"soft_margin": True}]),
    "batch_all_triplet": (ref_batch_all, [{}, {"margin": 1.0}]),
    "contrastive": (ref_contrastive, [{}, {"pos_margin": 0.3, "neg_margin": 2.0}]),
    "lifted_structure": (ref_lifted_structure, [{}, {"margin": 0.5}]),
    "npair": (ref_npair, [{}, {"l2_reg": 0.1}]),
    "angular": (ref_angular, [{}, {"alpha": 36.0, "l2_reg": 0.01}]),
    "multi_similarity": (
        ref_multi_similarity,
        [{}, {"alpha": 1.0, "beta": 10.0, "base": 0.2, "epsilon": 0.3}],
    ),
    "ntxent": (ref_ntxent, [{}, {"temperature": 0.5}]),
}
WITH_METRIC = {"batch_hard_triplet", "batch_all_triplet", "contrastive", "lifted_structure"}
SHAPES = [(2, 2, 3), (4, 3, 5), (6, 4, 8), (3, 5, 2)]  # (P, K, D)


def batch(P, K, D, seed, normalise=False):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(rng.choice(100, P, replace=False), K)).astype(np.int32)
    x = rng.normal(size=(P * K, D))
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return labels, x


def cases(name):
    ref, settings = REFERENCES[name]
    for params in settings:
        for metric in METRICS if name in WITH_METRIC else [None]:
            full = {**params, **({"metric": metric} if metric else {})}
            yield ref, full


def value_and_gradient(loss, labels, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(tf.constant(labels), x)
    return value.numpy(), tape.gradient(value, x).numpy()


def numeric_gradient(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (f(up) - f(down)) / (2 * eps)
    return grad


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFERENCES))
def test_values_match_the_formula(name):
    for ref, params in cases(name):
        loss = losses.get({"name": name, **params})
        for seed, (P, K, D) in enumerate(SHAPES):
            # Dot-product losses get unit vectors in float32, as the default head gives them.
            labels, x = batch(P, K, D, seed, normalise=name in ("npair", "angular"))
            expected = ref(labels, x, **params)
            value32 = loss(labels, x.astype(np.float32))
            assert value32.dtype == tf.float32
            np.testing.assert_allclose(
                value32.numpy(),
                expected,
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{name} {params} {P}x{K}x{D} float32",
            )
            labels, x = batch(P, K, D, seed + 100)
            np.testing.assert_allclose(
                loss(labels, x).numpy(),
                ref(labels, x, **params),
                rtol=1e-9,
                atol=1e-12,
                err_msg=f"{name} {params} {P}x{K}x{D} float64",
            )


@pytest.mark.parametrize("name", list(REFERENCES))
def test_gradients_match_finite_differences(name):
    for ref, params in cases(name):
        loss = losses.get({"name": name, **params})
        for seed, (P, K, D) in enumerate([(3, 3, 2), (2, 4, 3)]):
            labels, x = batch(P, K, D, seed + 200)
            _, grad = value_and_gradient(loss, labels, x)
            expected = numeric_gradient(partial(ref, labels, **params), x)
            np.testing.assert_allclose(
                grad, expected, rtol=1e-5, atol=1e-7, err_msg=f"{name} {params} {P}x{K}x{D}"
            )


def test_batch_all_on_a_larger_batch():
    # The prefix-sum form against the triple loop where sums run long (B = 48).
    labels, x = batch(12, 4, 16, 5)
    for margin in (0.2, 5.0):
        loss = losses.get({"name": "batch_all_triplet", "margin": margin})
        np.testing.assert_allclose(
            loss(labels, x.astype(np.float32)).numpy(), ref_batch_all(labels, x, margin), rtol=1e-5
        )


@pytest.mark.parametrize("name", ["proxy_anchor", "arcface"])
def test_class_vector_losses_match_the_formula(name):
    ref = ref_proxy_anchor if name == "proxy_anchor" else ref_arcface
    settings = (
        [{}, {"alpha": 16.0, "margin": 0.2}]
        if name == "proxy_anchor"
        else [{}, {"scale": 8.0, "margin": 0.3}, {"scale": 4.0, "margin": 1.5}]
    )
    rng = np.random.default_rng(3)
    for params in settings:
        for C, (P, K, D) in [(7, (3, 2, 4)), (5, (5, 1, 3)), (10, (4, 3, 6))]:
            labels = rng.permutation(np.repeat(rng.choice(C, P, replace=False), K))
            x, vectors = rng.normal(size=(P * K, D)), rng.normal(size=(C, D))
            expected = ref(labels, x, vectors, **params)
            for dtype, rtol in (("float32", 1e-5), ("float64", 1e-9)):
                loss = losses.get({"name": name, **params}, num_classes=C)
                loss = type(loss).from_config({**loss.get_config(), "dtype": dtype})
                loss(labels[:1], x[:1].astype(dtype))  # builds the vectors
                loss.class_vectors.assign(vectors.astype(dtype))
                np.testing.assert_allclose(
                    loss(labels, x.astype(dtype)).numpy(),
                    expected,
                    rtol=rtol,
                    atol=1e-6,
                    err_msg=f"{name} {params}",
                )
            # float64 gradients, for the embeddings and the class vectors.
            x64 = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(x64)
                value = loss(labels, x64)
            grad_x, grad_vectors = tape.gradient(value, [x64, loss.class_vectors])
            np.testing.assert_allclose(
                grad_x.numpy(),
                numeric_gradient(partial(ref, labels, vectors=vectors, **params), x),
                rtol=1e-5,
                atol=1e-7,
            )
            np.testing.assert_allclose(
                grad_vectors.numpy(),
                numeric_gradient(partial(ref, labels, x, **params), vectors),
                rtol=1e-5,
                atol=1e-7,
            )


# --- tiny cases by hand -----------------------------------------------------------------------


def value(name, labels, points, num_classes=None, **params):
    x = np.asarray(points, np.float32).reshape(len(labels), -1)
    return float(losses.get({"name": name, **params}, num_classes=num_classes)(np.array(labels), x))


def test_by_hand_batch_hard():
    # 1-D, classes {0, 1} and {3, 5}. Anchor gaps (hardest positive - hardest negative):
    # 0: 1 - 3 = -2; 1: 1 - 2 = -1; 3: 2 - 2 = 0; 5: 2 - 4 = -2.
    labels, points = [0, 0, 1, 1], [0, 1, 3, 5]
    assert value("batch_hard_triplet", labels, points) == pytest.approx(0.3 / 4)
    soft = np.mean(np.log1p(np.exp([-2.0, -1.0, 0.0, -2.0])))
    assert value("batch_hard_triplet", labels, points, soft_margin=True) == pytest.approx(soft)


def test_by_hand_batch_all():
    # Same points: the only violating triplet is anchor 3, positive 5 (d 2), negative 1 (d 2):
    # 0.2 + 2 - 2 = 0.2, so the mean over non-zero triplets is 0.2.
    assert value("batch_all_triplet", [0, 0, 1, 1], [0, 1, 3, 5]) == pytest.approx(0.2)
    assert value("batch_all_triplet", [0, 0, 1, 1], [0, 1, 3, 5], margin=0.0) == 0.0


def test_by_hand_contrastive():
    # Positive pair at 0.5 (costs 0.5 both ways); negatives at 2 and 1.5 are beyond 1: free.
    assert value("contrastive", [0, 0, 1], [0, 0.5, 2]) == pytest.approx(0.5)
    # Negative pair (1, 2) at 0.7 costs 0.3; (0, 2) at 1.2 is free and is not averaged in.
    assert value("contrastive", [0, 0, 1], [0, 0.5, 1.2]) == pytest.approx(0.8)


def test_by_hand_lifted_structure():
    # One positive pair (0, 1), d = 1. Negatives of 0: the point at 2 (d 2): e^(1 - 2);
    # of 1: d 1: e^0. J = log(1 + e^-1) + 1, loss = J^2 / 2.
    expected = (np.log(1 + np.exp(-1)) + 1) ** 2 / 2
    assert value("lifted_structure", [0, 0, 1], [0, 1, 2]) == pytest.approx(expected)


def test_by_hand_npair_angular_ntxent():
    labels, points = [0, 0, 1], [[1, 0], [1, 0], [0, 1]]
    # Both pairs: s_ap = 1, s_an = 0: log(1 + e^-1), plus l2_reg / 2 * mean ||x||^2 = 0.001.
    assert value("npair", labels, points) == pytest.approx(np.log1p(np.exp(-1)) + 0.001)
    # alpha = 45 degrees, tan^2 = 1: f = 4 (x_a + x_p).x_n - 4 x_a.x_p = -4.
    assert value("angular", labels, points) == pytest.approx(np.log1p(np.exp(-4)))
    # temperature 0.5: -log(e^2 / (e^2 + e^0)).
    assert value("ntxent", labels, points, temperature=0.5) == pytest.approx(np.log1p(np.exp(-2)))


def test_by_hand_multi_similarity():
    # Unit vectors at 0, 60 and 90 degrees; labels 0, 0, 1. s01 = 0.5, s02 = 0, s12 = sin 60.
    # Anchor 0: its negative (0) is not within 0.1 of its positive (0.5): dropped, adds 0.
    # Anchor 1: keeps both: 1/2 log(1 + e^0) + 1/50 log(1 + e^(50 (sin 60 - 0.5))).
    # Anchor 2: no positive, adds 0. Mean over the 3 anchors.
    s12 = math.sin(math.radians(60))
    points = [[1, 0], [0.5, s12], [0, 1]]
    expected = (0.5 * math.log(2) + math.log1p(math.exp(50 * (s12 - 0.5))) / 50) / 3
    assert value("multi_similarity", [0, 0, 1], points) == pytest.approx(expected, rel=1e-6)


def test_by_hand_proxy_anchor():
    # Proxies (1, 0), (0, 1); each sample sits on its class's proxy, at 90 degrees from the other.
    loss = losses.get({"name": "proxy_anchor"}, num_classes=2)
    x = np.float32([[1, 0], [0, 1]])
    loss(np.array([0, 1]), x)
    loss.proxies.assign(np.float32([[1, 0], [0, 1]]))
    expected = np.log1p(np.exp(-32 * 0.9)) + np.log1p(np.exp(32 * 0.1))
    assert float(loss(np.array([0, 1]), x)) == pytest.approx(expected, rel=1e-6)
    # One sample of class 0 among 3 proxies, the third at (-1, 0): the positive term averages
    # over the 1 class present, the negative term over all 3 (class 0 has no negative: 0).
    loss = losses.get({"name": "proxy_anchor"}, num_classes=3)
    loss(np.array([0]), x[:1])
    loss.proxies.assign(np.float32([[1, 0], [0, 1], [-1, 0]]))
    expected = (
        np.log1p(np.exp(-32 * 0.9))
        + (0 + np.log1p(np.exp(32 * 0.1)) + np.log1p(np.exp(32 * -0.9))) / 3
    )
    assert float(loss(np.array([0]), x[:1])) == pytest.approx(expected, rel=1e-6)


def test_by_hand_arcface():
    loss = losses.get({"name": "arcface", "scale": 2.0, "margin": 0.5}, num_classes=2)
    loss(np.array([0]), np.float32([[1, 0]]))
    loss.class_weights.assign(np.float32([[1, 0], [0, 1]]))
    # On its class's weight: theta = 0, logits (2 cos 0.5, 0).
    assert float(loss(np.array([0]), np.float32([[1, 0]]))) == pytest.approx(
        np.log1p(np.exp(-2 * np.cos(0.5))), rel=1e-6
    )
    # Opposite its class's weight: theta + m > pi, so cos(theta) - m sin(m) = -1 - 0.5 sin 0.5.
    target = -1 - 0.5 * np.sin(0.5)
    assert float(loss(np.array([0]), np.float32([[-1, 0]]))) == pytest.approx(
        np.log1p(np.exp(2 * (0 - target))), rel=1e-6
    )
