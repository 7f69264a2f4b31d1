"""Cross-batch memory (losses/memory.py, train.memory): the loss against batch + memory equals a
NumPy reference, the queue is a FIFO ring, start_step is respected, the memory is checkpointed
and a resumed run with memory is exact."""

import numpy as np
import pytest
import tensorflow as tf

import config
import losses
from losses.catalog import LOSSES
from losses.memory import CrossBatchMemory
from runs import checkpoint
from tests.conftest import tiny_config
from tests.test_distribute import run_python
from tests.test_losses_reference import (
    ref_batch_all,
    ref_contrastive,
    ref_multi_similarity,
    ref_npair,
)
from tfcbir import UserError
from training.trainer import train

# --- NumPy references of the batch's anchors against references (no anchor is its own) -------


def cross_distances(x, refs):
    return np.sqrt(((x[:, None] - refs[None]) ** 2).sum(-1))


def ref_batch_all_cross(labels, x, ref_labels, refs, margin=0.2):
    d = cross_distances(x, refs)
    terms = [
        margin + d[a, p] - d[a, n]
        for a in range(len(x))
        for p in range(len(refs))
        if ref_labels[p] == labels[a]
        for n in range(len(refs))
        if ref_labels[n] != labels[a]
    ]
    violating = [t for t in terms if t > 0]
    return sum(violating) / len(violating) if violating else 0.0


def ref_contrastive_cross(labels, x, ref_labels, refs, pos_margin=0.0, neg_margin=1.0):
    d = cross_distances(x, refs)
    same = labels[:, None] == ref_labels[None]
    pos = [v for v in np.maximum(d - pos_margin, 0)[same] if v > 0]
    neg = [v for v in np.maximum(neg_margin - d, 0)[~same] if v > 0]
    return (np.mean(pos) if pos else 0.0) + (np.mean(neg) if neg else 0.0)


def ref_multi_similarity_cross(labels, x, ref_labels, refs, alpha=2.0, beta=50.0, base=0.5):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref_unit = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    s, total = unit @ ref_unit.T, 0.0
    for a in range(len(x)):
        pos = s[a][ref_labels == labels[a]]
        neg = s[a][ref_labels != labels[a]]
        if not len(pos) or not len(neg):
            continue
        kept_neg = neg[neg + 0.1 > pos.min()]
        kept_pos = pos[pos - 0.1 < neg.max()]
        if len(kept_neg) and len(kept_pos):
            total += np.log1p(np.exp(-alpha * (kept_pos - base)).sum()) / alpha
            total += np.log1p(np.exp(beta * (kept_neg - base)).sum()) / beta
    return total / len(x)


def ref_npair_cross(labels, x, ref_labels, refs):
    s = x @ refs.T
    terms = [
        np.log1p(np.exp(s[a][ref_labels != labels[a]] - s[a, p]).sum())
        for a in range(len(x))
        for p in range(len(refs))
        if ref_labels[p] == labels[a]
    ]
    return np.mean(terms) if terms else 0.0


CASES = [
    ("batch_all_triplet", ref_batch_all, ref_batch_all_cross),
    ("contrastive", ref_contrastive, ref_contrastive_cross),
    ("multi_similarity", ref_multi_similarity, ref_multi_similarity_cross),
    ("npair", ref_npair, ref_npair_cross),
]


@pytest.mark.parametrize(("name", "ref", "ref_cross"), CASES, ids=[c[0] for c in CASES])
def test_loss_with_memory_matches_numpy(name, ref, ref_cross):
    rng = np.random.default_rng(0)
    labels, x = np.array([0, 0, 1, 1, 2, 2]), rng.normal(size=(6, 3)) * 0.5
    loss = losses.get({"name": name})
    memory = CrossBatchMemory(size=8, dim=3, weight=0.5)
    assert float(memory.loss(loss, labels, tf.constant(x, tf.float32))) == pytest.approx(
        ref(labels, x), rel=1e-5
    )  # empty memory: the batch's loss alone
    old_labels = np.array([1, 3, 0, 2, 3, 1, 0, 2, 2, 1])
    old = rng.normal(size=(10, 3)).astype(np.float32) * 0.5
    memory.enqueue(old_labels[:6], old[:6])
    memory.enqueue(old_labels[6:], old[6:])  # 10 rows in 8: the first two are overwritten
    mem_labels = np.concatenate([old_labels[8:], old_labels[2:8]])
    mem = np.concatenate([old[8:], old[2:8]]).astype(np.float64)
    got = float(memory.loss(loss, labels, tf.constant(x, tf.float32)))
    expected = ref(labels, x) + 0.5 * ref_cross(labels, x, mem_labels, mem)
    assert got == pytest.approx(expected, rel=1e-5)


def test_the_queue_is_a_fifo_ring():
    memory = CrossBatchMemory(size=5, dim=2)
    assert memory.contents()[0].shape == (0,)
    for step in range(4):  # batches of 2: rows 2*step, 2*step + 1
        values = np.arange(2 * step, 2 * step + 2, dtype=np.float32)
        memory.enqueue(values.astype(np.int64), np.stack([values, -values], 1))
    labels, embeddings = (t.numpy() for t in memory.contents())
    # 8 rows written into 5: rows 3..7, row 5 at position 0 (5 % 5), oldest overwritten first.
    np.testing.assert_array_equal(labels, [5, 6, 7, 3, 4])
    np.testing.assert_array_equal(embeddings[:, 0], labels)
    np.testing.assert_array_equal(embeddings[:, 1], -labels)
    assert int(memory.pointer) == 3 and int(memory.filled) == 5


def test_start_step_is_respected():
    memory = CrossBatchMemory(size=4, dim=1, start_step=2)
    for step in range(4):
        memory.enqueue_at(tf.constant(step), [step], [[float(step)]])
    np.testing.assert_array_equal(memory.contents()[0].numpy(), [2, 3])


def test_memory_losses_are_the_ones_taking_references():
    """The catalog's takes_references fact matches the classes."""
    for name in LOSSES.names():
        entry = LOSSES.get(name)
        if entry.meta.get("kind") == "image_text" or entry.meta["uses_proxies"]:
            assert not entry.meta.get("takes_references"), name
            continue
        assert bool(entry.meta.get("takes_references")) == entry.builder.takes_references, name


@pytest.mark.parametrize(
    "name", ["lifted_structure", "ntxent", "angular", "proxy_anchor", "arcface", "clip", "siglip"]
)
def test_losses_without_references_refuse_memory(name):
    raw = tiny_config(train__memory={"size": 64})
    raw["loss"] = {"name": name}
    with pytest.raises(UserError, match=f"train.memory.size: {name} compares the batch"):
        config.resolve(raw)


def test_bad_memory_values_in_one_line():
    with pytest.raises(UserError, match="smaller than a batch of P x K = 16"):
        config.resolve(tiny_config(train__memory={"size": 8}))
    with pytest.raises(UserError, match="train.memory.start_step"):
        config.resolve(tiny_config(train__memory={"size": 16, "start_step": -1}))
    assert config.resolve(tiny_config())["train"]["memory"] == {
        "size": 0,
        "start_step": 0,
        "weight": 1.0,
    }


def memory_config(**overrides):
    keys = {
        "train__steps": 12,
        "train__checkpoint_every": 4,
        "train__validate_every": 0,
        "train__memory": {"size": 40, "start_step": 2},
    }
    return tiny_config(**{**keys, **overrides})


def test_memory_is_checkpointed_and_a_resumed_run_is_exact(data_dir):
    straight = train(config.resolve({**memory_config(), "name": "straight"}))
    final = checkpoint.latest(straight.run.checkpoints)
    embeddings, labels, pointer, filled = final.groups["memory"]
    # Steps 2..11 enqueued 10 batches of 16 into 40 rows.
    assert int(filled) == 40 and int(pointer) == (10 * 16) % 40
    assert embeddings.shape == (40, 16) and labels.shape == (40,)
    norms = np.linalg.norm(embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # the head's unit embeddings

    # The same run, stopped at step 6 and resumed: the same memory and weights at the end.
    half = train(config.resolve({**memory_config(train__steps=6), "name": "halves"}))
    assert half.step == 6
    resumed = train(config.resolve({**memory_config(), "name": "halves"}))
    assert resumed.step == 12
    again = checkpoint.latest(resumed.run.checkpoints)
    for group in ("model", "memory"):
        for a, b in zip(final.groups[group], again.groups[group]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_memory_without_effect_before_start_step(data_dir):
    """Until the memory holds a batch (step index start_step + 1) the losses are those of a run
    without memory; from then on they differ."""
    plain = train(
        config.resolve({**memory_config(train__steps=6, train__memory={"size": 0}), "name": "p"})
    )
    with_memory = train(config.resolve({**memory_config(train__steps=6), "name": "m"}))
    rows = [read_losses(result.run.metrics) for result in (plain, with_memory)]
    np.testing.assert_allclose(rows[0][:3], rows[1][:3], rtol=1e-6)
    assert not np.allclose(rows[0][3:], rows[1][3:], rtol=1e-4)


def read_losses(path):
    import csv

    with open(path, newline="") as handle:
        return np.array([float(row["loss"]) for row in csv.DictReader(handle)])


def test_mirrored_memory_holds_the_global_batch():
    """Two replicas: each step's loss, the memory and the weights equal one device's."""
    result = run_python("""
        import keras, numpy as np
        import losses
        from losses.memory import CrossBatchMemory
        from training import distribute
        from training.optim import VariableGroup, build_optimizer
        from training.image import make_step

        train_cfg = {
            "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": None,
                          "clipnorm": None},
            "lr_schedule": {"name": "constant", "decay_start": 0, "warmup_steps": 0,
                            "final_lr_fraction": 0.0},
            "steps": 10,
        }
        rng = np.random.default_rng(0)
        images = rng.normal(size=(3, 16, 6)).astype("float32")
        labels = (np.repeat(np.arange(4), 4)[None] + 4 * np.arange(3)[:, None]) % 6
        out = {}
        for name in ("none", "mirrored"):
            strategy = distribute.make_strategy(name)
            with strategy.scope():
                keras.utils.set_random_seed(0)
                model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
                loss_fn = losses.get({"name": "batch_all_triplet", "margin": 0.5})
                groups = [VariableGroup("all", model.weights)]
                optimizer = build_optimizer(train_cfg, groups)
                memory = CrossBatchMemory(24, 4, start_step=0)
            step = make_step(model, loss_fn, optimizer, groups, strategy, False, memory)
            values = []
            for i in range(3):
                x, y = distribute.split_per_replica(
                    strategy, tf.constant(images[i]), tf.constant(labels[i].astype("int32")))
                values.append(float(step(x, y)))
            out[name] = {"losses": values,
                         "memory": [np.asarray(v).tolist() for v in memory.variables],
                         "weights": [np.asarray(w).tolist() for w in model.weights]}
        print(json.dumps(out))
    """)
    single, mirrored = result["none"], result["mirrored"]
    np.testing.assert_allclose(mirrored["losses"], single["losses"], rtol=1e-5)
    assert single["memory"][3] == 24  # filled
    for a, b in zip(single["memory"] + single["weights"], mirrored["memory"] + mirrored["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
