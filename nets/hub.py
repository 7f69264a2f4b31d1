"""Foundation backbones from keras-hub presets: ``model.backbone: "hub:<preset>"``.

``<preset>`` is a keras-hub preset name (``clip_vit_base_patch32``, ``dinov2_small``, ...,
downloaded by keras-hub on first use), a handle (``kaggle://...``, ``hf://...``) or a local preset
directory written by keras-hub's ``save_to_preset`` (the way to use one offline).

The image tower of a preset, as :func:`image_tower` builds it, maps preprocessed images
``(B, H, W, 3)`` to pooled features ``(B, C)``:

=========  ===================================  ==========================================
family     keras-hub class                      pooled features
=========  ===================================  ==========================================
clip       CLIPBackbone                         the vision encoder's class token (after its
                                                final LayerNorm), through the vision
                                                projection: CLIP's image embedding
siglip     SigLIPBackbone (SigLIP and SigLIP2)  the vision encoder's attention-pooling
                                                head: SigLIP's image embedding
dinov2     DINOV2Backbone                       the class token after the final LayerNorm
dinov3     DINOV3Backbone                       the class token after the final LayerNorm
vit        ViTBackbone                          the class token after the final LayerNorm
                                                (the mean of the tokens without one)
=========  ===================================  ==========================================

Preprocessing is the preset's image converter's ``x * scale + offset``
(:func:`preprocessing`, applied by ``nets.layers.ImagePreprocessing`` in mode ``scale_offset``);
its resize is the data pipeline's (``data.resize``, then a crop of ``data.image_size``).

Image size: CLIP, SigLIP and ViT presets learned position embeddings for one size, the preset's
own; ``data.image_size`` must be that size. DINOv2 interpolates its position embeddings and
DINOv3 uses rotary ones, so they take any square size that is a multiple of the patch size.

keras-hub (and TensorFlow) are imported only when a hub backbone is built.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

import keras

from nets.catalog import hub_directory, hub_preset, missing_preset_message
from nets.layers import ClassToken
from tfcbir import UserError
from tfcbir.text import one_line

FAMILIES = ("clip", "siglip", "dinov2", "dinov3", "vit")
# Families whose position embeddings adapt to the image size (interpolated or rotary).
ANY_SIZE = ("dinov2", "dinov3")
_CLASSES = {
    "clip": "CLIPBackbone",
    "siglip": "SigLIPBackbone",
    "dinov2": "DINOV2Backbone",
    "dinov3": "DINOV3Backbone",
    "vit": "ViTBackbone",
}
SAVE_HINT = (
    "save the preset with keras-hub on a machine with internet and give its folder as "
    "hub:<folder> (docs/models.md: Foundation backbones)"
)


def import_keras_hub(key: str = "model.backbone"):
    """The keras_hub module; UserError naming ``key`` when it is not installed."""
    try:
        import keras_hub
    except ImportError as error:
        raise UserError(
            f"{key}: hub: presets need keras-hub, which is not installed; run `make venv`, or "
            "pip install -r requirements-hub.txt, then pip install --no-deps -r "
            "requirements-hub-nodeps.txt (docs/models.md: Foundation backbones)"
        ) from error
    return keras_hub


def preset_source(backbone: str, key: str = "model.backbone", families=FAMILIES) -> str:
    """What ``keras_hub ... from_preset`` is given for ``hub:<preset>``; UserError naming ``key``
    for a missing directory, a directory without a preset or an unknown name (with the closest
    preset of ``families``)."""
    preset = hub_preset(backbone)
    folder = hub_directory(preset)
    if folder is not None:
        if not os.path.isdir(folder):
            raise UserError(missing_preset_message(backbone, key))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(
                f"{key}: {backbone}: {folder} is not a keras-hub preset directory "
                f"(no config.json); {SAVE_HINT}"
            )
        return folder
    if "://" in preset:
        return preset
    if preset not in import_keras_hub(key).models.Backbone.presets:
        close = difflib.get_close_matches(preset, image_presets(families), n=1)
        hint = f" (did you mean hub:{close[0]}?)" if close else ""
        example = "hub:clip_vit_base_patch32" + (
            ", hub:dinov2_small" if "dinov2" in families else ""
        )
        raise UserError(
            f"{key}: {backbone}: {preset!r} is neither a keras-hub preset nor a preset "
            f"directory{hint}; give a preset of {', '.join(families)} (e.g. {example}) or a "
            "folder saved with save_to_preset"
        )
    return preset


def image_presets(families=FAMILIES) -> list[str]:
    """keras-hub's built-in presets of ``families`` (they need internet once)."""
    models = import_keras_hub().models
    names: list[str] = []
    for name in families:
        names += list(getattr(models, _CLASSES[name]).presets)
    return sorted(set(names))


def load_backbone(backbone: str, *, load_weights: bool = True, image_size=None):
    """The keras-hub backbone of ``hub:<preset>`` (the whole model: CLIP's and SigLIP's text
    tower included), its weights loaded unless ``load_weights`` is False.

    image_size: ``(height, width)`` the image tower will take, or None for the preset's own.
        A DINOv2/DINOv3 preset is built for it (its position embeddings interpolated); the
        other families must be given their own size (see :func:`check_image_size`).
    Raises UserError for a missing directory, an unknown preset, a failed download (with how
    to save the preset for offline use), a preset that is not of a supported family and an
    image size it cannot take.
    """
    source = preset_source(backbone)
    loaded = _from_preset(backbone, source, load_weights)
    if image_size is not None and tuple(image_size) != native_image_size(loaded):
        check_image_size(loaded, image_size, backbone)  # a size it can take, or UserError
        height, width = image_size
        loaded = _from_preset(backbone, source, load_weights, image_shape=(height, width, 3))
    return loaded


def _from_preset(backbone: str, source: str, load_weights: bool, **kwargs):
    keras_hub = import_keras_hub()
    try:
        loaded = keras_hub.models.Backbone.from_preset(source, load_weights=load_weights, **kwargs)
    except Exception as error:  # downloads and files fail in many ways; all are the user's
        where = "read" if os.path.isdir(source) else "download"
        raise UserError(
            f"model.backbone: {backbone}: could not {where} the keras-hub preset "
            f"({one_line(error)}); {SAVE_HINT}"
        ) from error
    family(loaded, backbone)  # a supported family, or UserError
    return loaded


def family(hub_backbone, backbone: str = "") -> str:
    """The :data:`FAMILIES` name of a loaded keras-hub backbone; UserError if unsupported."""
    models = import_keras_hub().models
    for name, class_name in _CLASSES.items():
        if isinstance(hub_backbone, getattr(models, class_name)):
            return name
    raise UserError(
        f"model.backbone: {backbone or 'hub:'}: a {type(hub_backbone).__name__} preset has no "
        f"image tower here; give a preset of {', '.join(_CLASSES.values())}"
    )


def native_image_size(hub_backbone) -> tuple[int, int]:
    """The ``(height, width)`` the preset's image tower was built for."""
    encoder = (
        hub_backbone.vision_encoder if family(hub_backbone) in ("clip", "siglip") else hub_backbone
    )
    shape = encoder.get_config()["image_shape"]
    return int(shape[0]), int(shape[1])


def patch_size(hub_backbone) -> int:
    encoder = (
        hub_backbone.vision_encoder if family(hub_backbone) in ("clip", "siglip") else hub_backbone
    )
    size = encoder.get_config()["patch_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def check_image_size(hub_backbone, image_size, backbone: str = "") -> None:
    """UserError unless the preset of ``hub_backbone`` can take ``(height, width)`` images:
    its own size, or for DINOv2 and DINOv3 any square size that is a multiple of the patch
    size. The message names the size to set."""
    height, width = (int(side) for side in image_size)
    native = native_image_size(hub_backbone)
    if (height, width) == native:
        return
    kind = family(hub_backbone, backbone)
    if kind not in ANY_SIZE:
        raise UserError(
            f"data.image_size: {[height, width]}, but {backbone or kind} takes "
            f"{native[0]}x{native[1]} images; set data.image_size to {list(native)} "
            "(and data.resize to at least that, or null)"
        )
    patch = patch_size(hub_backbone)
    if height != width or height % patch:
        side = max(patch, round(max(height, width) / patch) * patch)
        raise UserError(
            f"data.image_size: {[height, width]}, but {backbone or kind} takes square images "
            f"whose side is a multiple of its patch size {patch}; e.g. [{side}, {side}]"
        )


def preprocessing(backbone: str) -> dict:
    """The ``nets.layers.ImagePreprocessing`` arguments of ``hub:<preset>``: ``mode``
    ``scale_offset`` with the ``scale`` and ``offset`` of the preset's image converter.

    UserError if the preset has no image converter (a directory saved without one)."""
    source = preset_source(backbone)
    keras_hub = import_keras_hub()
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(source)
    except Exception as error:
        raise UserError(
            f"model.backbone: {backbone}: could not load the preset's image converter "
            f"({one_line(error)}); save it beside the backbone: keras_hub.layers."
            f"ImageConverter.from_preset(<name>).save_to_preset(<folder>)"
        ) from error
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    return {
        "mode": "scale_offset",
        "scale": [float(s) for s in scale] if isinstance(scale, (list, tuple)) else float(scale),
        "offset": (
            [float(o) for o in offset] if isinstance(offset, (list, tuple)) else float(offset)
        ),
    }


@dataclass
class Tower:
    """A preset's image tower and its parts, for ``model.freeze_backbone``."""

    model: keras.Model  # named "backbone": preprocessed (B, H, W, 3) -> (B, C)
    stem: list  # layers before the first transformer block
    blocks: list  # the transformer blocks, in forward order, each a list of layers
    family: str


def image_tower(hub_backbone, name: str = "backbone") -> Tower:
    """The image tower of a loaded keras-hub backbone (see the module docstring for what each
    family pools). Its layers are the preset's own (shared, not copied): for CLIP and SigLIP the
    text tower built from the same ``hub_backbone`` embeds into the same space."""
    kind = family(hub_backbone)
    height, width = native_image_size(hub_backbone)
    images = keras.Input(shape=(height, width, 3), name="images")
    if kind == "clip":
        encoder = hub_backbone.vision_encoder
        x = hub_backbone.vision_pooler(encoder({"images": images}))
        features = hub_backbone.vision_projection(x)
    elif kind == "siglip":
        features = hub_backbone.vision_encoder({"images": images})
    elif kind in ("dinov2", "dinov3"):
        key = next(iter(hub_backbone.input)) if isinstance(hub_backbone.input, dict) else None
        tokens = hub_backbone({key: images} if key else images)
        features = ClassToken(name="class_token")(tokens)
    else:  # vit
        tokens = hub_backbone(images)
        config = hub_backbone.get_config()
        if config.get("use_class_token", True):
            features = ClassToken(name="class_token")(tokens)
        else:
            features = keras.layers.GlobalAveragePooling1D(name="token_mean")(tokens)
    model = keras.Model(images, features, name=name)
    stem, blocks = tower_parts(model)
    return Tower(model, stem, blocks, kind)


def tower_parts(tower: keras.Model) -> tuple[list, list[list]]:
    """The stem (patch and position embeddings, CLIP's pre-norm) and the transformer blocks, in
    forward order and each a list of layers, of an image tower built by :func:`image_tower`;
    ``([], [])`` for a model that holds no keras-hub encoder (a registry backbone)."""
    models = import_keras_hub().models
    for layer in tower.layers:
        if isinstance(layer, models.CLIPVisionEncoder):
            stem, blocks = [layer.embedding, layer.pre_layer_norm], layer.encoder_layers
        elif isinstance(layer, models.SigLIPVisionEncoder):
            stem, blocks = [layer.embedding], layer.encoder_layers
        elif isinstance(layer, (models.DINOV2Backbone, models.DINOV3Backbone)):
            rope = [layer.rope_embedding] if isinstance(layer, models.DINOV3Backbone) else []
            stem, blocks = [layer.embeddings, *rope], layer.encoder.layers
        elif isinstance(layer, models.ViTBackbone):
            stem = [layer.get_layer("vit_patching_and_embedding")]
            blocks = layer.get_layer("vit_encoder").encoder_layers
        else:
            continue
        return list(stem), [[block] for block in blocks]
    return [], []
