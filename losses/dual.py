"""A dual encoder's whole loss: an image-text loss plus, optionally, a weighted image loss.

``DualEncoderLoss(pair, image=None, image_weight=1.0)`` is called as
``loss(image_embeddings (B, D), text_embeddings (B, D), groups (B,), labels (B,))`` and returns
``(total, parts)``: ``total = pair(images, texts, groups) + image_weight * image(labels,
images)``, and ``parts`` the two terms (``{"pair": ..., "image": ...}``, the second only with an
image loss), so the trainer can log them apart.
"""

from __future__ import annotations


class DualEncoderLoss:
    """The image-text loss ``pair`` (losses.base.ImageTextLoss), plus ``image_weight`` times the
    image loss ``image`` (a MetricLoss or ClassVectorLoss) on the image embeddings and labels."""

    def __init__(self, pair, image=None, image_weight: float = 1.0):
        self.pair = pair
        self.image = image
        self.image_weight = float(image_weight)

    def __call__(self, image_embeddings, text_embeddings, groups, labels):
        value = self.pair(image_embeddings, text_embeddings, groups)
        parts = {"pair": value}
        if self.image is not None:
            parts["image"] = self.image(labels, image_embeddings)
            value = value + self.image_weight * parts["image"]
        return value, parts

    @property
    def pair_variables(self) -> list:
        """The image-text loss's trainable weights (temperature, bias)."""
        return list(self.pair.trainable_variables)

    @property
    def image_variables(self) -> list:
        """The image loss's trainable weights (proxies, class weights), created by its first
        call; [] for a loss without."""
        return list(getattr(self.image, "trainable_variables", []))

    @property
    def weights(self) -> list:
        """Every variable to checkpoint: the pair loss's, then the image loss's."""
        return list(self.pair.weights) + list(getattr(self.image, "weights", []))
