"""``model.freeze_backbone`` and ``model.freeze_batchnorm``: which of a backbone's layers train.

A backbone is seen as a stem, then its blocks in forward order (transformer blocks; CNN stages),
then what follows the last block (a final norm, a pooling or projection layer). ``true`` freezes
the whole backbone; an integer n freezes the stem and all blocks but the last n, so the last n
blocks and everything after them train. Frozen layers are ``trainable = False``: their weights get
no gradient, and Keras runs a frozen BatchNormalization in inference mode (its moving statistics
are used and left unchanged), whatever the ``training`` flag of the call.
"""

from __future__ import annotations

import re

import keras

from tfcbir import UserError


def application_blocks(
    backbone: keras.Model, pattern: str
) -> tuple[list[keras.Layer], list[list[keras.Layer]]]:
    """The stem and the blocks of a functional backbone whose layer names tell their block.

    pattern: a regular expression; group 1 of a match with a layer's name is that layer's
    block. Layers before the first match are the stem; an unmatched layer after it belongs to
    the block before it (so the layers after the last block go with the last block).
    """
    stem: list[keras.Layer] = []
    blocks: list[list[keras.Layer]] = []
    current = None
    for layer in backbone.layers:
        match = re.match(pattern, layer.name)
        if match and match.group(1) != current:
            current = match.group(1)
            blocks.append([])
        (blocks[-1] if blocks else stem).append(layer)
    return stem, blocks


def freeze(
    backbone: keras.Model,
    how: bool | int,
    stem: list[keras.Layer],
    blocks: list[list[keras.Layer]],
    name: str,
) -> None:
    """Apply ``model.freeze_backbone`` = ``how`` to ``backbone`` (named ``name`` in errors).

    stem, blocks: the backbone's layers before its first block, and its blocks in forward
    order (each a list of layers). UserError when ``how`` asks for more blocks than there are.
    """
    if how is False:
        return
    if how is True:
        backbone.trainable = False
        return
    if how > len(blocks):
        raise UserError(
            f"model.freeze_backbone: {how} blocks to train, but {name} has {len(blocks)}; "
            f"give 1 to {len(blocks)}, true (all frozen) or false"
        )
    for layer in stem + [layer for block in blocks[: len(blocks) - how] for layer in block]:
        layer.trainable = False


def freeze_batchnorm(backbone: keras.Model) -> None:
    """``model.freeze_batchnorm``: every BatchNormalization layer of ``backbone`` (nested models
    included) is frozen: Keras then runs it in inference mode (moving statistics used, never
    updated) and its scale and offset get no gradient; every other layer is left as it is."""
    pending = list(backbone.layers)
    while pending:
        layer = pending.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif isinstance(layer, keras.Model):
            pending.extend(layer.layers)
