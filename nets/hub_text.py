"""A keras-hub CLIP or SigLIP preset's text tower and tokenizer: ``model.text.tower: hub:<preset>``.

``<preset>`` is a keras-hub preset name (``clip_vit_base_patch32``, ``siglip2_base_patch16_224``,
..., downloaded by keras-hub on first use), a handle (``kaggle://...``, ``hf://...``) or a local
preset folder written by keras-hub's ``save_to_preset`` (the way to use one offline: save the
backbone and its tokenizer, or its preprocessor, into one folder).

The tower is the preset's own text path, so a pretrained preset embeds text into its image
tower's space:

- CLIP: the text encoder, the embedding at the end-of-text token, the text projection;
- SigLIP: the text encoder, the last position's embedding, its head;

then, when ``embedding_dim`` is given (a head that projects the image features to
``model.embedding_dim``), a new Dense layer to that dimension.

Token ids come from the preset's preprocessor (its tokenizer, start and end tokens, padding to
``max_length``, default the preset's sequence length: 77 for CLIP, 64 for SigLIP; SigLIP reads
the last position, so keep its own length). keras-hub is imported only here.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from nets.hub import import_keras_hub, preset_source
from tfcbir import UserError
from tfcbir.text import one_line

FAMILIES = {
    "clip": ("CLIPBackbone", "CLIPPreprocessor"),
    "siglip": ("SigLIPBackbone", "SigLIPPreprocessor"),
}
KEY = "model.text.tower"


def source(preset: str) -> str:
    """What keras-hub's ``from_preset`` is given for ``hub:<preset>`` (:func:`nets.hub.preset_source`
    for a CLIP or SigLIP text tower)."""
    return preset_source(f"hub:{preset}", KEY, tuple(FAMILIES))


def load_backbone(preset: str, *, pretrained: bool, backbone=None):
    """The preset's keras-hub backbone (weights loaded when ``pretrained``; ``backbone``: one
    already loaded, shared with the image tower) and its family."""
    keras_hub = import_keras_hub(KEY)
    if backbone is None:
        where = source(preset)
        try:
            backbone = keras_hub.models.Backbone.from_preset(where, load_weights=pretrained)
        except Exception as error:  # downloads and files fail in many ways; all are the user's
            action = "read" if os.path.isdir(where) else "download"
            raise UserError(
                f"{KEY}: hub:{preset}: could not {action} the keras-hub preset "
                f"({one_line(error)}); save it with save_to_preset where there is internet and "
                "give its folder (docs/models.md: Foundation backbones)"
            ) from error
    for family, (backbone_class, _) in FAMILIES.items():
        if isinstance(backbone, getattr(keras_hub.models, backbone_class)):
            return backbone, family
    raise UserError(
        f"{KEY}: hub:{preset} is a {type(backbone).__name__}, which has no text tower; give a "
        "CLIP or SigLIP preset (e.g. hub:clip_vit_base_patch32)"
    )


class HubTokenizer:
    """Texts -> ``(B, max_length)`` int32 token ids with a preset's preprocessor (byte-pair or
    sentencepiece pieces: no word is ever unknown)."""

    def __init__(self, preprocessor, max_length: int):
        self.preprocessor = preprocessor
        self.max_length = int(max_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.max_length), np.int32)
        packed = self.preprocessor(
            {"prompts": list(texts), "images": None}, sequence_length=self.max_length
        )
        return np.asarray(keras.ops.convert_to_numpy(packed["token_ids"]), np.int32)

    def unknown_words(self, text: str) -> list[str]:
        return []


def load_tokenizer(preset: str, family: str, max_length: int | None) -> HubTokenizer:
    """The preset's preprocessor (its tokenizer, without its image converter) as a
    :class:`HubTokenizer` of ``max_length`` tokens (None: the preset's own length)."""
    keras_hub = import_keras_hub(KEY)
    preprocessor_class = getattr(keras_hub.models, FAMILIES[family][1])
    try:
        preprocessor = preprocessor_class.from_preset(source(preset), image_converter=None)
    except Exception as error:
        raise UserError(
            f"{KEY}: hub:{preset}: could not load the preset's tokenizer ({one_line(error)}); "
            "save it beside the backbone: keras_hub.models.<...>Preprocessor.from_preset(<name>)"
            ".save_to_preset(<folder>)"
        ) from error
    preprocessor.image_converter = None  # text only
    return HubTokenizer(preprocessor, max_length or preprocessor.sequence_length)


def build_hub_text_tower(
    preset: str,
    embedding_dim: int | None,
    *,
    max_length: int | None,
    pretrained: bool,
    hub_backbone=None,
) -> tuple[keras.Model, HubTokenizer]:
    """The text tower of ``hub:<preset>`` (see the module docstring), named "text_embedding":
    token ids ``(B, L)`` int32 -> ``(B, D)`` float32, and its tokenizer. hub_backbone: the
    preset's keras-hub backbone already loaded for the image tower (its text layers are used;
    they are not the image tower's), or None to load it."""
    backbone, family = load_backbone(preset, pretrained=pretrained, backbone=hub_backbone)
    tokenizer = load_tokenizer(preset, family, max_length)
    limit = int(backbone.text_encoder.get_config().get("max_sequence_length") or 0)
    if limit and tokenizer.max_length > limit:
        if max_length is not None:
            raise UserError(
                f"model.text.max_length: {max_length} is more than the {limit} positions of "
                f"hub:{preset}'s text encoder; give at most {limit}, or null"
            )
        tokenizer.max_length = limit  # a preset saved without its preprocessor's length
    token_ids = keras.Input(shape=(tokenizer.max_length,), dtype="int32", name="token_ids")
    x = backbone.get_text_embeddings(token_ids)
    if embedding_dim is not None:
        x = keras.layers.Dense(embedding_dim, dtype="float32", name="text_head")(x)
    else:
        x = keras.layers.Activation("linear", dtype="float32", name="text_output")(x)
    return keras.Model(token_ids, x, name="text_embedding"), tokenizer
