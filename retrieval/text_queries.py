"""Text queries: a dual encoder's galleries searched with words, and how well that works.

- :func:`open_text_gallery`: a gallery refused unless the dual encoder in use embedded it (its
  model identity and model hash cover both towers; its ``extra`` records the towers' names, as
  information only).
- :func:`class_prompts_of`: each class's prompt(s) from ``data.captions.templates`` (default
  ``["a photo of a {class}."]``); several templates are averaged, as CLIP's prompt ensembles.
- :func:`evaluate_text`: ``evaluation.py --text-queries``: the class prompts against the
  evaluated images (mAP@r, Recall@1/5/10, each class's images relevant) and, where the
  evaluated images have captions in the captions file, caption-to-image and image-to-caption
  Recall@1/5/10 (the Flickr30k / COCO protocol: a caption's image, an image's captions), each
  beside its chance level.

The evaluated images are those the evaluation protocol queries with (the test split), never
the training images unless the data set has no test split (then ``on_training_images``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import numpy as np

import config as cfg
from datasets.captions import class_prompts, image_captions, load_caption_table
from datasets.lists import ImageList
from retrieval import sets
from retrieval.evaluate import open_gallery
from retrieval.gallery import Gallery
from retrieval.metrics import evaluate, map_key
from retrieval.search import unit_rows
from runs.folder import RunFolder
from tfcbir import UserError
from tfcbir.files import write_json

DEFAULT_TEMPLATES = ["a photo of a {class}."]
TEXT_KS = (1, 5, 10)


def open_text_gallery(
    config: dict, name: str, encoder, config_path=None, checkpoint=None, made=None
) -> Gallery:
    """The gallery of set ``name``, refused unless ``encoder``'s model (both towers) embedded it
    and its dimension is the text tower's. Both towers are checked by the gallery's identity:
    ``encoder.model_id`` (the weights of both) and ``config.model_hash`` (both towers'
    architecture, a local preset folder by its contents); the tower names the gallery records
    are information only. checkpoint: the weights in use when not the run's best (named in the
    advice to re-embed); made: the data set's split if the caller has read it."""
    gallery = open_gallery(config, name, config_path, encoder.model_id, checkpoint, made)
    if gallery.dim != encoder.dim:
        raise UserError(
            f"{gallery.path} holds {gallery.dim}-d embeddings, the text tower gives "
            f"{encoder.dim}-d ones; re-embed it: python embed.py -c {config_path or '<config>'}"
        )
    return gallery


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a text query: ``"A red bag!"`` -> ``"a-red-bag"``."""
    words = re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")
    return (words[:limit].rstrip("-") or "text") if words else "text"


def templates_of(config: dict) -> list[str]:
    return config["data"]["captions"]["templates"] or DEFAULT_TEMPLATES


def class_prompts_of(config: dict, classes: list[str]) -> list[list[str]]:
    """(C, T) prompts: each class's caption from each template (see the module docstring)."""
    return class_prompts(classes, templates_of(config))


def prompt_embeddings(encoder, prompts: list[list[str]]) -> np.ndarray:
    """(C, D) unit vectors: the mean of each class's prompt embeddings, normalised again."""
    flat = [text for row in prompts for text in row]
    per_prompt = encoder.embed(flat).reshape(len(prompts), len(prompts[0]), -1)
    return unit_rows(per_prompt.mean(axis=1))


def chance_recall(n_gallery: int, n_relevant: np.ndarray, k: int) -> float:
    """Mean over queries of the probability that a random ranking of ``n_gallery`` items puts
    one of a query's ``n_relevant`` items in its top k: 1 - C(N - G, k) / C(N, k)."""
    n_relevant = np.asarray(n_relevant)
    misses = np.ones(len(n_relevant))
    for i in range(min(k, n_gallery)):
        misses *= np.clip((n_gallery - n_relevant - i) / (n_gallery - i), 0.0, 1.0)
    return float(np.mean(1.0 - misses))


def evaluate_text(
    config: dict, encoder, *, r: int, config_path=None, checkpoint=None, save: bool = True
) -> dict:
    """``evaluation.py --text-queries`` (see the module docstring); returns the result, saved
    as JSON under ``<run>/evaluation/`` (``saved``) when ``save``. checkpoint: the weights in
    use when not the run's best."""
    if r < 1:
        raise UserError(f"-r {r}: give a number of answers >= 1")
    protocol = sets.protocol(config)
    name = protocol.queries
    gallery = open_text_gallery(config, name, encoder, config_path, checkpoint)
    result: dict = {
        "set": name,
        "on_training_images": name == "train",
        "gallery": str(gallery.path),
        "gallery_size": len(gallery),
        "model_step": encoder.model_step,
        "text_tower": encoder.towers["text_tower"],
        "r": r,
    }
    result["prompts"] = _prompt_scores(config, encoder, gallery, r)
    captions = _caption_scores(config, encoder, gallery)
    if captions is not None:
        result["captions"] = captions
    result["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    if save:
        out = RunFolder.of(config).evaluation / f"text-{name}-r{r}.json"
        write_json(out, result)
        result["saved"] = str(out)
    return result


def _prompt_scores(config: dict, encoder, gallery: Gallery, r: int) -> dict:
    """Each class present in the gallery's prompt against it: a class's images are relevant."""
    present = np.unique(gallery.labels)
    prompts = class_prompts_of(config, [gallery.classes[c] for c in present])
    ks = tuple(k for k in TEXT_KS if k <= len(gallery))
    metrics = evaluate(
        prompt_embeddings(encoder, prompts),
        present.astype(np.int64),
        gallery.embeddings,
        gallery.labels,
        normalized=True,
        r=min(r, len(gallery)),
        ks=ks,
        nmi=False,
    )
    values = metrics.as_dict()
    counts = np.bincount(gallery.labels, minlength=len(gallery.classes))[present]
    unknown = [encoder.unknown_words(text) for row in prompts for text in row]
    scores = {
        map_key(min(r, len(gallery))): values["mAP"],
        **{f"recall@{k}": values[f"recall@{k}"] for k in ks},
        "queries": len(present),
        "templates": templates_of(config),
        "unknown_words": sorted({word for words in unknown for word in words}),
    }
    scores["chance"] = {f"recall@{k}": chance_recall(len(gallery), counts, k) for k in ks}
    return scores


def _caption_scores(config: dict, encoder, gallery: Gallery) -> dict | None:
    """Caption-to-image and image-to-caption Recall@k over the gallery images that have rows
    in the captions file (templates are not captions); None when none has."""
    table = load_caption_table(cfg.data_root(config), config["data"]["captions"]["file"])
    if not table:
        return None
    images = ImageList(gallery.data_root, gallery.paths, gallery.labels, gallery.classes)
    captions = image_captions(images, table, None)
    if len(captions) == 0:
        return None
    captioned = captions.captioned_images()
    texts = encoder.embed(captions.texts)
    image_ids = np.arange(len(gallery), dtype=np.int64)
    n_images = len(captioned)
    ks = tuple(k for k in TEXT_KS if k <= n_images)
    # A caption's relevant item is its own image, among the captioned images.
    to_image = evaluate(
        texts,
        captions.image,
        gallery.embeddings[captioned],
        image_ids[captioned],
        normalized=True,
        ks=ks,
        nmi=False,
    )
    # An image's relevant items are its captions, among all the captions.
    ks_text = tuple(k for k in TEXT_KS if k <= len(captions))
    to_text = evaluate(
        gallery.embeddings[captioned],
        image_ids[captioned],
        texts,
        captions.image,
        normalized=True,
        ks=ks_text,
        nmi=False,
    )
    per_image = np.bincount(captions.image, minlength=len(gallery))[captioned]
    return {
        "images": int(n_images),
        "captions": len(captions),
        "text_to_image": {
            **{f"recall@{k}": to_image.recall_at_k[k] for k in ks},
            "chance": {
                f"recall@{k}": chance_recall(n_images, np.ones(len(captions)), k) for k in ks
            },
        },
        "image_to_text": {
            **{f"recall@{k}": to_text.recall_at_k[k] for k in ks_text},
            "chance": {f"recall@{k}": chance_recall(len(captions), per_image, k) for k in ks_text},
        },
    }


def report(result: dict) -> str:
    """The text scores as lines for the terminal."""
    lines = [
        f"text queries against the {result['set']} set ({result['gallery_size']} images, model "
        f"at step {result['model_step']}, text tower {result['text_tower']})"
    ]
    if result["on_training_images"]:
        lines.append(
            "warning: the data set has no test split, so these images are training images: the "
            "numbers are optimistic"
        )
    prompts = result["prompts"]
    lines.append(f"class prompts ({prompts['queries']} classes, templates {prompts['templates']}):")
    if prompts["unknown_words"]:
        lines.append(
            f"  warning: the text tower reads {', '.join(map(repr, prompts['unknown_words']))} "
            "as unknown; write data.captions.templates in the words of the training captions"
        )
    lines += _score_lines(prompts)
    if "captions" in result:
        captions = result["captions"]
        lines.append(f"captions ({captions['captions']} captions of {captions['images']} images):")
        lines.append("  caption -> image")
        lines += _score_lines(captions["text_to_image"], indent=4)
        lines.append("  image -> caption")
        lines += _score_lines(captions["image_to_text"], indent=4)
    if "saved" in result:
        lines.append(f"saved to {result['saved']}")
    return "\n".join(lines)


def _score_lines(scores: dict, indent: int = 2) -> list[str]:
    keys = [k for k in scores if k.startswith(("mAP@", "recall@"))]
    chance = scores.get("chance", {})
    return [
        " " * indent
        + f"{key:<10} {scores[key]:.4f}"
        + (f"   (chance {chance[key]:.4f})" if key in chance else "")
        for key in keys
    ]
