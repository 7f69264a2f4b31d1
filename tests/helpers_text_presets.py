"""Tiny keras-hub CLIP presets with random weights, saved into a folder: text towers tested offline
(no download). A byte-pair vocabulary just large enough for a few words."""

from __future__ import annotations

from pathlib import Path

WORDS = ("a", "red", "blue", "green", "circle", "square", "cross", "ring", "star", "triangle")


def bpe_vocabulary(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """CLIP-style byte-pair vocabulary and merges spelling each of ``words`` (a word's last
    piece ends with ``</w>``); ids from 1 (0 pads), the end-of-text token last (CLIP pools at
    the largest id)."""
    chars = sorted({c for word in words for c in word})
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    return {t: i + 1 for i, t in enumerate(tokens)}, list(dict.fromkeys(merges))


def tiny_clip_preset(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    projection_dim: int = 8,
    sequence_length: int = 12,
) -> Path:
    """Save a tiny CLIPBackbone (random weights), its tokenizer, preprocessor and image
    converter into ``folder``; returns it."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocabulary, merges = bpe_vocabulary()
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(vocabulary) + 1,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=sequence_length,
    )
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=projection_dim)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(image_size, image_size), scale=1 / 255.0, offset=0.0
    )
    preprocessor = keras_hub.models.CLIPPreprocessor(
        tokenizer=tokenizer, image_converter=converter, sequence_length=sequence_length
    )
    folder = Path(folder)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return folder


def tiny_siglip_preset(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    projection_dim: int = 8,
    sequence_length: int = 10,
) -> Path:
    """Save a tiny SigLIPBackbone (random weights), its sentencepiece tokenizer (a word model of
    :data:`WORDS`), preprocessor and image converter into ``folder``; returns it."""
    import io

    import keras
    import keras_hub
    import sentencepiece

    keras.utils.set_random_seed(seed)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS)] * 4),
        model_writer=model,
        vocab_size=len(WORDS) + 4,
        model_type="WORD",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        unk_piece="<unk>",
        eos_piece="</s>",
        minloglevel=2,
    )
    tokenizer = keras_hub.models.SigLIPTokenizer(proto=model.getvalue())
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=len(WORDS) + 4,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=sequence_length,
        projection_dim=projection_dim,
    )
    backbone = keras_hub.models.SigLIPBackbone(vision, text)
    converter = keras_hub.layers.SigLIPImageConverter(
        image_size=(image_size, image_size), scale=1 / 127.5, offset=-1.0
    )
    preprocessor = keras_hub.models.SigLIPPreprocessor(
        tokenizer=tokenizer, image_converter=converter, sequence_length=sequence_length
    )
    folder = Path(folder)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return folder
