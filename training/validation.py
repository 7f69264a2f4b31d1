"""Validation during training: leave-one-out Recall@1 on held-out images, decoded once."""

from __future__ import annotations

import numpy as np

from datasets.lists import ImageList
from datasets.pipeline import iter_eval_batches


class Validator:
    def __init__(self, images: ImageList, data: dict, max_images: int, seed: int):
        if len(images) > max_images:
            keep = np.sort(np.random.default_rng([seed, 11]).permutation(len(images))[:max_images])
            images = images.subset(keep)
        pixels, labels = [], []
        for indices, batch in iter_eval_batches(
            images.absolute_paths(),
            image_size=tuple(data["image_size"]),
            resize=tuple(data["resize"]) if data["resize"] else None,
            batch_size=64,
        ):
            pixels.append(batch)
            labels.append(images.labels[indices])
        self.pixels = np.concatenate(pixels)
        self.labels = np.concatenate(labels)

    def recall_at_1(self, model, batch_size: int = 128) -> float:
        embeddings = np.concatenate(
            [
                np.asarray(model(self.pixels[i : i + batch_size], training=False))
                for i in range(0, len(self.pixels), batch_size)
            ]
        )
        return recall_at_1(embeddings, self.labels)


def recall_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose nearest other item (Euclidean) has the same label. (N, D), (N,)."""
    squared = np.sum(embeddings**2, axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * embeddings @ embeddings.T
    np.fill_diagonal(distances, np.inf)
    return float(np.mean(labels[np.argmin(distances, axis=1)] == labels))
