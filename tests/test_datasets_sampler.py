"""datasets.sampler: P x K batches, balanced and a pure function of (seed, step)."""

import numpy as np
import pytest

from datasets.sampler import PKSampler
from tfcbir import UserError

# Labels 0..6 with 9, 8, 7, 6, 5, 2 and 1 images (classes 5 and 6 have fewer than K = 3),
# shuffled so class members are not contiguous.
SIZES = [9, 8, 7, 6, 5, 2, 1]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(7), SIZES)).astype(np.int32)


def test_batches_hold_p_distinct_classes_of_k_images():
    sampler = PKSampler(LABELS, P=3, K=3, seed=5)
    assert sampler.steps_per_round == 3  # ceil(7 / 3)
    for step in range(12):
        indices = sampler.batch(step)
        assert indices.dtype == np.int64 and indices.shape == (9,)
        groups = LABELS[indices].reshape(3, 3)
        assert np.all(groups == groups[:, :1])  # K consecutive images of one class
        assert len(set(groups[:, 0])) == 3  # P distinct classes
        for group in indices.reshape(3, 3):
            size = SIZES[LABELS[group[0]]]
            if size >= 3:  # without replacement when the class is large enough
                assert len(set(group)) == 3
            else:  # a small class repeats its images, as evenly as it can
                counts = np.unique(group, return_counts=True)[1]
                assert len(counts) == size and counts.max() - counts.min() <= 1


def test_every_class_appears_in_every_round():
    sampler = PKSampler(LABELS, P=3, K=2, seed=1)
    for round_ in range(4):
        steps = range(round_ * 3, (round_ + 1) * 3)
        seen = np.concatenate([LABELS[sampler.batch(s)] for s in steps])
        assert set(seen) == set(range(7))
        # 7 classes in 3 steps of 3: two classes are borrowed twice to fill the last step.
        assert sorted(np.bincount(seen, minlength=7) // 2) == [1, 1, 1, 1, 1, 2, 2]


def test_batches_are_a_pure_function_of_seed_and_step():
    first = PKSampler(LABELS, P=4, K=2, seed=9)
    second = PKSampler(LABELS, P=4, K=2, seed=9)
    forward = [first.batch(s) for s in range(10)]
    backward = [second.batch(s) for s in reversed(range(10))][::-1]  # resumed, any order
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    other = PKSampler(LABELS, P=4, K=2, seed=10)
    assert any(not np.array_equal(first.batch(s), other.batch(s)) for s in range(10))
    assert len({tuple(first.batch_classes(r * 2)) for r in range(10)}) > 1  # rounds reshuffle


def test_images_are_drawn_evenly_over_many_steps():
    labels = np.repeat([0, 1], [4, 50])
    sampler = PKSampler(labels, P=2, K=4, seed=0)
    drawn = np.concatenate([sampler.batch(s) for s in range(400)])
    small = np.bincount(drawn[labels[drawn] == 0], minlength=4)[:4]
    assert np.all(small == 400)  # K = 4 of a 4-image class: each image once per batch
    large = np.bincount(drawn[labels[drawn] == 1], minlength=54)[4:]
    assert large.min() > 10 and large.max() < 60  # about 400 * 4 / 50 = 32 each


def test_more_classes_per_batch_than_exist_is_a_user_error():
    with pytest.raises(UserError, match=r"train.batch.P: 8 is more than the 7 classes.*at most 7"):
        PKSampler(LABELS, P=8, K=2, seed=0)
