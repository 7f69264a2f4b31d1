"""A run's model exported for serving without tfcbir: a SavedModel, and TFLite for the image tower.

The SavedModel's ``serving_default`` signature (also named ``embed_images``) takes a batch of
encoded images (``tf.string`` ``(B,)``, JPEG/PNG/GIF/BMP) and returns ``{"embeddings": (B, D)
float32}``, unit rows when the run searches by cosine (``config.normalized_embeddings``). The
preprocessing embed.py applies is inside: decode to RGB, resize to ``data.resize`` (or straight
to ``data.image_size``) with an antialiased bilinear filter rounded to uint8, as PIL's bilinear
resize does, then the centre crop to ``data.image_size``; the model's own scaling layer is part
of the Keras model. A dual encoder gets a second signature, ``embed_texts``: a batch of strings
-> unit embeddings, the scratch tower's word tokenizer (:class:`datasets.tokenizer.WordTokenizer`)
written in TF ops; a hub text tower's signature takes its token ids ``(B, L)`` instead.

Differences from embed.py's pixels (PIL): TF's decoder ignores the EXIF orientation and drops an
alpha channel instead of compositing on white, JPEGs are decoded at full scale (PIL decodes a
much larger JPEG at a reduced scale), and the two resizers round differently (PIL rounds between
its horizontal and vertical passes): a pixel may differ by a few levels.

Everything is written to a temporary folder beside the destination and renamed into place, with
``export.json`` (model_id, image size, dim, normalized, signatures) beside the model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datasets.tokenizer import END, START, UNK, WordTokenizer
from retrieval.embedder import Embedder, TextEncoder, load_embedder, load_text_encoder
from runs.weights import has_text_tower, model_source
from tfcbir import UserError

FORMATS = ("savedmodel", "tflite")
IMAGE_SIGNATURE = "embed_images"
TEXT_SIGNATURE = "embed_texts"
SAVED_MODEL = "saved_model"  # the SavedModel's folder inside the export folder
TFLITE_FLOAT = "image_tower.tflite"
TFLITE_QUANTIZED = "image_tower.dynamic_range.tflite"
# The words of WordTokenizer's split_words in RE2 syntax: runs of letters and digits, or any
# single character that is neither one nor white space (Python's [^\w\s] and _).
WORD_PATTERN = r"([\pL\pN]+|[^\pL\pN\s])"


@dataclass
class ExportInfo:
    """What ``export.json`` records about an exported model."""

    model_id: str
    model_step: int
    image_size: list[int]  # [h, w] of the model's input
    resize: list[int] | None  # [h, w] resized to before the centre crop
    dim: int
    normalized: bool
    format: str
    signatures: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    text_input: str | None = None  # "strings" or "token_ids" for a dual encoder
    tflite_quantized_cosine: float | None = None  # mean cosine of quantised vs float vectors


def export_model(
    config: dict,
    out: Path | None = None,
    *,
    checkpoint: Path | None = None,
    fmt: str = "savedmodel",
    sample_images: list[str] | None = None,
) -> tuple[Path, ExportInfo]:
    """Export ``config``'s run (its best weights, ``checkpoint``, or a zero-shot preset) into
    ``out`` (default ``<run>/export``), replacing it atomically; ``sample_images`` (files) measure
    the quantised TFLite model against the float one. The folder and what export.json says."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown; give one of {', '.join(FORMATS)}")
    source = model_source(config, checkpoint)
    if out is None:
        out = source.run.export
        out.parent.mkdir(parents=True, exist_ok=True)  # a zero-shot run may have no folder yet
    parent = _writable_parent(Path(out))
    embedder = load_embedder(config, checkpoint, source=source)
    text = load_text_encoder(config, checkpoint, source=source) if has_text_tower(config) else None
    info = ExportInfo(
        model_id=embedder.model_id,
        model_step=embedder.model_step,
        image_size=list(embedder.image_size),
        resize=list(embedder.resize) if embedder.resize else None,
        dim=embedder.dim,
        normalized=embedder.normalized,
        format=fmt,
    )
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        if fmt == "savedmodel":
            _write_saved_model(embedder, text, tmp / SAVED_MODEL, info)
        else:
            _write_tflite(embedder, tmp, info, sample_images or [])
        (tmp / "export.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, info


def _writable_parent(out: Path) -> Path:
    """The existing folder ``out`` is made in; UserError for a file in the way, a folder of
    other files (it would be replaced) or a parent that does not exist."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: a file is in the way; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").is_file():
        # Replacing is deleting: only an earlier export (or an empty folder) may go.
        raise UserError(
            f"-o {out}: the folder holds files that are not an export; give a new or empty "
            "folder (an earlier export there is replaced)"
        )
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"-o {out}: its parent folder {parent} does not exist; create it first")
    return parent


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an older export there goes only then."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def image_preprocessing(image_size, resize):
    """A TF function: one encoded image (scalar tf.string) -> ``(h, w, 3)`` uint8, the pixels
    embed.py's load_and_fit gives (antialiased bilinear resize, rounded, then centre crop)."""
    import tensorflow as tf

    target = tuple(resize) if resize else tuple(image_size)
    h, w = image_size

    def fit(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        # PIL's bilinear filter widens with the scale when shrinking: antialias=True is that
        # triangle; PIL rounds half up to uint8 (the closest of TF's methods, docs/export.md).
        resized = tf.image.resize(image, target, method="bilinear", antialias=True)
        resized = tf.cast(tf.clip_by_value(tf.floor(resized + 0.5), 0.0, 255.0), tf.uint8)
        top, left = (target[0] - h) // 2, (target[1] - w) // 2
        return resized[top : top + h, left : left + w, :]

    return fit


def word_ids(tokenizer: WordTokenizer):
    """A TF function: texts ``(B,)`` tf.string -> ``(B, max_length)`` int32 ids, what
    ``tokenizer.encode`` gives (words lower-cased and split in TF ops, looked up in its
    vocabulary, unknown ones as [unk], wrapped in [start] ... [end], padded with 0)."""
    import tensorflow as tf

    vocabulary = tokenizer.vocabulary
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(vocabulary), tf.range(len(vocabulary), dtype=tf.int32)
        ),
        default_value=vocabulary.index(UNK),
    )
    start, end = vocabulary.index(START), vocabulary.index(END)
    length = tokenizer.max_length

    def encode(texts):
        spaced = tf.strings.regex_replace(
            tf.strings.lower(texts, encoding="utf-8"), WORD_PATTERN, r" \1 "
        )
        words = tf.strings.split(spaced)[:, : length - 2]
        ids = table.lookup(words)
        rows = ids.nrows()
        ids = tf.concat([tf.fill([rows, 1], start), ids, tf.fill([rows, 1], end)], axis=1)
        return ids.to_tensor(default_value=0, shape=[None, length])

    return encode, table


def _write_saved_model(
    embedder: Embedder, text: TextEncoder | None, path: Path, info: ExportInfo
) -> None:
    """The SavedModel with the image signature (and the text one for a dual encoder)."""
    import tensorflow as tf

    module = tf.Module()
    module.image_model = embedder.model
    fit = image_preprocessing(embedder.image_size, embedder.resize)
    h, w = embedder.image_size
    input_dtype = embedder.model.inputs[0].dtype
    normalized = embedder.normalized

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def embed_images(images):
        pixels = tf.map_fn(fit, images, fn_output_signature=tf.TensorSpec([h, w, 3], tf.uint8))
        vectors = tf.cast(
            module.image_model(tf.cast(pixels, input_dtype), training=False), tf.float32
        )
        return {"embeddings": tf.math.l2_normalize(vectors, axis=1) if normalized else vectors}

    signatures = {"serving_default": embed_images, IMAGE_SIGNATURE: embed_images}
    info.signatures = ["serving_default", IMAGE_SIGNATURE]
    if text is not None:
        signatures[TEXT_SIGNATURE] = _text_signature(module, text, info)
        info.signatures.append(TEXT_SIGNATURE)
    tf.saved_model.save(module, str(path), signatures=signatures)
    info.files = [SAVED_MODEL]


def _text_signature(module, text: TextEncoder, info: ExportInfo):
    """``embed_texts``: strings (a scratch tower) or token ids (a hub tower) -> unit rows."""
    import tensorflow as tf

    module.text_model = text.tower.model
    if isinstance(text.tower.tokenizer, WordTokenizer):
        module.encode, module.table = word_ids(text.tower.tokenizer)
        info.text_input = "strings"

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
        def embed_texts(texts):
            vectors = module.text_model(module.encode(texts), training=False)
            return {"embeddings": tf.math.l2_normalize(tf.cast(vectors, tf.float32), axis=1)}

        return embed_texts
    info.text_input = "token_ids"
    spec = text.tower.model.inputs[0]

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name="token_ids")])
    def embed_token_ids(ids):
        vectors = module.text_model(ids, training=False)
        return {"embeddings": tf.math.l2_normalize(tf.cast(vectors, tf.float32), axis=1)}

    return embed_token_ids


def _write_tflite(embedder: Embedder, folder: Path, info: ExportInfo, samples: list[str]) -> None:
    """The image tower on pixels ``(1, h, w, 3)`` float32 (one image a call: a fixed shape
    keeps every TFLite delegate able to run it) as float32 TFLite and a dynamic-range quantised
    copy; the mean cosine between the two on ``samples`` goes to ``info``."""
    import tensorflow as tf

    h, w = embedder.image_size
    model = embedder.model
    input_dtype = model.inputs[0].dtype

    @tf.function(input_signature=[tf.TensorSpec([1, h, w, 3], tf.float32, name="pixels")])
    def tower(pixels):
        return tf.cast(model(tf.cast(pixels, input_dtype), training=False), tf.float32)

    # The converter leaves Keras 3's variables as READ_VARIABLE ops that nothing assigns (the
    # model then gives NaN): freeze them into constants first.
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(tower.get_concrete_function())
    try:
        for name, quantize in ((TFLITE_FLOAT, False), (TFLITE_QUANTIZED, True)):
            converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
            if quantize:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            (folder / name).write_bytes(converter.convert())
    except Exception as error:  # the converter raises many types for an op it lacks
        raise UserError(
            f"{embedder.towers.get('image_tower')}: this backbone does not convert to TFLite "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); export a SavedModel "
            "(--format savedmodel)"
        ) from None
    info.files = [TFLITE_FLOAT, TFLITE_QUANTIZED]
    info.signatures = ["serving_default"]
    pixels = _sample_pixels(embedder, samples)
    if len(pixels):
        float_rows = run_tflite(folder / TFLITE_FLOAT, pixels)
        quantized_rows = run_tflite(folder / TFLITE_QUANTIZED, pixels)
        info.tflite_quantized_cosine = float(np.mean(_cosines(float_rows, quantized_rows)))


def _sample_pixels(embedder: Embedder, paths: list[str]) -> np.ndarray:
    """``(n, h, w, 3)`` float32 pixels of the readable ``paths``, as embed.py prepares them."""
    from datasets.images import ImageError, load_and_fit

    pixels = []
    for path in paths:
        try:
            pixels.append(load_and_fit(path, embedder.image_size, embedder.resize))
        except ImageError:
            continue
    return np.asarray(pixels, np.float32)


def run_tflite(path: Path, pixels: np.ndarray) -> np.ndarray:
    """``(B, D)`` float32 rows of a TFLite image tower on ``pixels`` ``(B, h, w, 3)``, one image
    at a time (the model's input is a batch of one)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    entry = interpreter.get_input_details()[0]
    interpreter.allocate_tensors()
    output = interpreter.get_output_details()[0]["index"]
    rows = []
    for image in pixels:
        interpreter.set_tensor(entry["index"], image[None].astype(np.float32))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(output)[0].copy())
    return np.asarray(rows, np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two ``(B, D)`` arrays."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)
