"""nets.text: the from-scratch text tower (masking, shapes, serialisation) and keras-hub CLIP text
towers from tiny presets saved locally (never downloaded)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from datasets.tokenizer import WordTokenizer
from nets.text import build_scratch_text_model, build_text_tower
from tfcbir import UserError

SCRATCH = {"tower": "scratch", "width": 32, "heads": 4, "layers": 2, "max_length": 8}


def scratch_model(**overrides):
    keras.utils.set_random_seed(0)
    params = dict(vocab_size=30, max_length=8, width=32, layers=2, heads=4, embedding_dim=6)
    return build_scratch_text_model(**{**params, **overrides})


def test_scratch_tower_reads_only_the_real_tokens():
    model = scratch_model()
    ids = np.array([[2, 5, 6, 3, 0, 0, 0, 0], [2, 5, 6, 3, 0, 0, 0, 0], [2, 6, 5, 3, 0, 0, 0, 0]])
    out = model(ids).numpy()
    assert out.shape == (3, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], out[1])
    assert np.abs(out[0] - out[2]).max() > 1e-4  # word order matters (position embeddings)
    # Padding is masked out of attention and pooling: what a padded slot's embedding holds
    # never matters, so changing the embedding of token 0 changes nothing.
    embedding = model.get_layer("embedding").tokens.embeddings
    changed = embedding.numpy()
    changed[0] += 5.0
    embedding.assign(changed)
    np.testing.assert_allclose(model(ids).numpy(), out, rtol=1e-5, atol=1e-6)
    # A longer caption is not its prefix.
    longer = ids.copy()
    longer[0, 3:5] = [7, 3]
    assert np.abs(model(longer).numpy()[0] - out[0]).max() > 1e-4


def test_scratch_tower_serialises_and_counts_its_parameters():
    model = scratch_model(layers=1)
    again = keras.models.model_from_json(model.to_json())
    again.set_weights(model.get_weights())
    ids = np.array([[2, 4, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(again(ids).numpy(), model(ids).numpy(), rtol=1e-6)
    width, vocab, length = 32, 30, 8
    block = 4 * (width * width + width) + 4 * width + (width * 4 * width + 4 * width)
    block += 4 * width * width + width
    expected = vocab * width + length * width + block + 2 * width + width * 6 + 6
    assert model.count_params() == expected


def test_build_text_tower_scratch_and_none():
    tokenizer = WordTokenizer.build(["a red circle", "a blue square"], vocab_size=50, max_length=8)
    tower = build_text_tower(SCRATCH, 6, tokenizer=tokenizer)
    assert tower.tower == "scratch" and tower.model.input_shape == (None, 8)
    embeddings = tower.embed(["a red circle", "a red circle", "a blue square"])
    assert embeddings.shape == (3, 6)
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    assert tower.embed([]).shape == (0, 6)
    with pytest.raises(UserError, match="model.text.tower: none: this model has no text tower"):
        build_text_tower({"tower": "none"}, 6)


# --- keras-hub presets -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_preset(tmp_path_factory):
    pytest.importorskip("keras_hub")
    from tests.helpers_text_presets import tiny_clip_preset

    return tiny_clip_preset(tmp_path_factory.mktemp("presets") / "tiny_clip")


def test_hub_tower_is_the_presets_own_text_path(clip_preset):
    import keras_hub

    reference = keras_hub.models.CLIPBackbone.from_preset(str(clip_preset))
    tower = build_text_tower({"tower": f"hub:{clip_preset}"}, None)
    ids = tower.tokenizer.encode(["a red circle", "a blue square"])
    assert ids.shape == (2, 12) and ids.dtype == np.int32
    start, end = ids[0, 0], ids[0, 4]
    assert end == ids.max() and (ids[0, 5:] == 0).all() and ids[1, 0] == start
    np.testing.assert_allclose(
        tower.embed(["a red circle", "a blue square"]),
        np.asarray(reference.get_text_embeddings(ids)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert tower.tokenizer.unknown_words("a purple hat") == []
    # Untrained (pretrained=False): the same architecture with other weights.
    fresh = build_text_tower({"tower": f"hub:{clip_preset}"}, None, pretrained=False)
    assert [w.shape for w in fresh.model.weights] == [w.shape for w in tower.model.weights]
    assert not np.allclose(fresh.embed(["a red circle"]), tower.embed(["a red circle"]))
    # A projecting head gets a new Dense layer to its dimension; max_length pads shorter.
    projected = build_text_tower({"tower": f"hub:{clip_preset}", "max_length": 6}, 5)
    assert projected.model.output_shape == (None, 5)
    assert projected.tokenizer.encode(["a red circle"]).shape == (1, 6)


def test_siglip_tower_is_the_presets_own_text_path(tmp_path):
    pytest.importorskip("keras_hub")
    import keras_hub

    from tests.helpers_text_presets import tiny_siglip_preset

    folder = tiny_siglip_preset(tmp_path / "tiny_siglip")
    reference = keras_hub.models.SigLIPBackbone.from_preset(str(folder))
    tower = build_text_tower({"tower": f"hub:{folder}"}, None)
    texts = ["a red circle", "a blue square"]
    ids = tower.tokenizer.encode(texts)
    # sentencepiece words, then the end token (2) padding to the preset's 10 positions: SigLIP
    # reads the last one.
    assert ids.shape == (2, 10) and (ids[:, 3:] == 2).all() and ids[0, 1] != ids[1, 1]
    np.testing.assert_allclose(
        tower.embed(texts), np.asarray(reference.get_text_embeddings(ids)), rtol=1e-5, atol=1e-6
    )
    assert tower.model.output_shape == (None, 8)


def test_frozen_hub_tower_trains_only_a_new_head(clip_preset):
    tower = build_text_tower({"tower": f"hub:{clip_preset}", "freeze": True}, None)
    assert tower.model.trainable_variables == [] and tower.model.weights
    headed = build_text_tower({"tower": f"hub:{clip_preset}", "freeze": True}, 5)
    assert [v.path for v in headed.model.trainable_variables] == [
        "text_head/kernel",
        "text_head/bias",
    ]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tower": "hub:{missing}"}, "model.text.tower: hub:{missing}: no such preset directory"),
        ({"tower": "hub:{empty}"}, "is not a keras-hub preset directory (no config.json)"),
        ({"tower": "hub:{clip}", "max_length": 40}, "model.text.max_length: 40 is more than"),
        (
            {"tower": "hub:clip_vit_base_patch3"},
            "model.text.tower: hub:clip_vit_base_patch3: 'clip_vit_base_patch3' is neither a "
            "keras-hub preset nor a preset directory (did you mean hub:clip_vit_base_patch32?); "
            "give a preset of clip, siglip",
        ),
    ],
)
def test_hub_tower_errors_are_one_line(clip_preset, tmp_path, params, message):
    (tmp_path / "empty").mkdir()
    folders = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "clip": clip_preset}
    params = {**params, "tower": params["tower"].format(**folders)}
    with pytest.raises(UserError) as raised:
        build_text_tower(params, None)
    assert message.format(**folders) in str(raised.value) and "\n" not in str(raised.value)
