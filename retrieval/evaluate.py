"""evaluation.py's work: sample queries from a run's galleries, score them, save the result."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np

import config as cfg
from datasets.lists import Splits
from retrieval import sets
from retrieval.gallery import Gallery, GalleryIdentity, items_hash, read_gallery
from retrieval.lance_gallery import open_lance_gallery, uses_lancedb
from retrieval.metrics import clustering_nmi, evaluate, map_key
from retrieval.rerank import RerankSpec, evaluate_reranked
from retrieval.verification import DEFAULT_FALSE_MATCH_RATE, verify
from runs.folder import RunFolder
from runs.weights import expected_model_id
from tfcbir import UserError
from tfcbir.files import write_json

#: The report's metrics, in order; "mAP@<r>" stands for the key of the evaluation's cut-off
#: (:func:`retrieval.metrics.map_key`); "mAP" is kept beside it in JSON as an alias.
ORDER = [
    "mAP@<r>",
    "precision@1",
    "recall@1",
    "recall@2",
    "recall@4",
    "recall@8",
    "MAP@R",
    "R-precision",
    "NMI",
]


def expected_identity(
    config: dict,
    name: str,
    *,
    model_id: str | None = None,
    checkpoint=None,
    made: Splits | None = None,
) -> GalleryIdentity:
    """What the gallery of set ``name`` must be of: the weights in use (``model_id``, an
    Embedder's; else those of ``checkpoint``; else the run's best weights, refused when there
    are none), the config's model and the set's image list as the data set has it now (``made``:
    the data set's split already read by the caller, else read here)."""
    return _identity_of(config, sets.images(config, name, made), model_id, checkpoint)


def _identity_of(config: dict, images, model_id, checkpoint) -> GalleryIdentity:
    return GalleryIdentity(
        model_id=model_id or expected_model_id(config, checkpoint),
        config_hash=cfg.model_hash(config),
        items_hash=items_hash(images.paths, images.labels, images.classes),
    )


def open_gallery(
    config: dict,
    name: str,
    config_path=None,
    model_id: str | None = None,
    checkpoint=None,
    made: Splits | None = None,
) -> Gallery:
    """A run's gallery of set ``name``, refused (with the command that re-embeds it) unless it
    is of :func:`expected_identity`: other weights or config made it, or the set's images or
    lists changed since it was embedded. made: the data set's split if the caller has read it
    (:func:`retrieval.sets.needs_splits`). With ``index.backend: lancedb`` the gallery is
    read from its table (:mod:`retrieval.lance_gallery`), its vectors when first needed."""
    images = sets.images(config, name, made)
    expect = _identity_of(config, images, model_id, checkpoint)
    if uses_lancedb(config):
        return open_lance_gallery(
            config, name, expect=expect, order=images.paths, config_path=config_path
        )
    command = f"python embed.py -c {config_path or '<config>'} --split {name}"
    if checkpoint is not None:
        command += f" --checkpoint {checkpoint}"
    return read_gallery(
        RunFolder.of(config).gallery(name),
        expect=expect,
        config_path=config_path,
        advice=f"re-embed it: {command}",
    )


def evaluate_run(
    config: dict,
    *,
    queries: int,
    r: int,
    seed: int = 0,
    ap_denominator: str = "min_r_g",
    config_path=None,
    checkpoint=None,
    nmi: bool = True,
    rerank: RerankSpec | None = None,
) -> dict:
    """evaluation.py: ``queries`` sampled queries (seeded; 0: all) of the config's protocol, AP@r
    with cut-off ``r``, every metric of :func:`retrieval.metrics.evaluate`, saved as JSON under
    ``<run>/evaluation/``; returns the result (``saved``: where).

    Only the sampled queries are ranked. NMI is of k-means (seeded with ``seed``) over every
    embedding of the evaluated query set, not the sample, into as many clusters as the set has
    classes, so it does not change with ``queries``. ``on_training_images`` is true when the
    queries come from the training split (``data.split.by: none``: leave-one-out on the images
    the model was trained on, an optimistic number). checkpoint: the weights the galleries were
    embedded with (default: the run's best). nmi: False leaves NMI out (its k-means is the
    slowest part for many classes). rerank: the answers' re-ranking (default: ``eval.rerank``);
    NMI stays that of the embeddings.
    """
    if queries < 0:
        raise UserError(f"-t {queries}: give a number of queries >= 0 (0: all)")
    if r < 1:
        raise UserError(f"-r {r}: give a number of answers >= 1")
    made = sets.splits(config) if sets.needs_splits(config, "query", "gallery") else None
    protocol = sets.protocol(config, made)
    query_set, gallery = _open_protocol(config, protocol, config_path, checkpoint, made)
    available = len(query_set) - (1 if protocol.leave_one_out else 0)
    if r > available:
        raise UserError(
            f"-r {r} is larger than the gallery ({available} images to answer "
            f"from); give -r <= {available}"
        )
    picked = np.arange(len(query_set))
    if queries and queries < len(query_set):
        picked = np.sort(np.random.default_rng(seed).choice(len(query_set), queries, replace=False))
    rerank = rerank or RerankSpec.parse(config["eval"]["rerank"])
    values = _scores(
        query_set, gallery, picked, protocol, r=r, ap_denominator=ap_denominator, rerank=rerank
    )
    if nmi:
        values["NMI"] = clustering_nmi(query_set.embeddings, query_set.labels, seed=seed)
    result = {key: values[key] for key in report_keys(r) if key in values}
    result.update(
        mAP=values["mAP"],
        queries=int(len(picked)),
        excluded_queries=values["excluded_queries"],
        r=r,
        protocol=protocol.name,
        on_training_images=protocol.queries == "train",
        model_selected_on=model_selected_on(config),
        ap_denominator=ap_denominator,
        seed=seed,
        gallery=str(gallery.path),
        gallery_size=len(gallery),
        query_set_size=len(query_set),
        model_step=gallery.model_step,
        rerank=rerank.as_config(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    name = f"{protocol.name}-t{queries}-r{r}-seed{seed}"
    if ap_denominator != "min_r_g":
        name += f"-{ap_denominator}"
    if rerank.active:
        name += f"-{rerank.method}"
    out = RunFolder.of(config).evaluation / f"{name}.json"
    write_json(out, result)
    result["saved"] = str(out)
    return result


def _scores(
    query_set: Gallery,
    gallery: Gallery,
    picked: np.ndarray,
    protocol: sets.Protocol,
    *,
    r: int,
    ap_denominator: str,
    rerank: RerankSpec,
) -> dict:
    """The metrics of the ``picked`` queries (their indices in ``query_set``) against
    ``gallery``, each left out of its own answers for leave-one-out, their answers re-ranked by
    ``rerank``; NMI is not computed."""
    if rerank.active:
        own = picked if protocol.leave_one_out else None
        return evaluate_reranked(
            rerank,
            query_set.embeddings[picked],
            query_set.labels[picked],
            gallery.embeddings,
            gallery.labels,
            normalized=gallery.normalized,
            exclude=own,
            query_items=own,
            r=r,
            ap_denominator=ap_denominator,
        ).as_dict()
    return evaluate(
        query_set.embeddings[picked],
        query_set.labels[picked],
        gallery.embeddings,
        gallery.labels,
        normalized=gallery.normalized,
        exclude=picked if protocol.leave_one_out else None,
        r=r,
        ap_denominator=ap_denominator,
        nmi=False,
    ).as_dict()


def _open_protocol(
    config: dict, protocol: sets.Protocol, config_path, checkpoint, made: Splits | None
) -> tuple[Gallery, Gallery]:
    """The protocol's (query set, gallery), one gallery for leave-one-out; both must name the
    same classes."""
    gallery = open_gallery(config, protocol.gallery, config_path, checkpoint=checkpoint, made=made)
    if protocol.leave_one_out:
        return gallery, gallery
    query_set = open_gallery(
        config, protocol.queries, config_path, checkpoint=checkpoint, made=made
    )
    if query_set.classes != gallery.classes:
        raise UserError(
            f"{query_set.path} and {gallery.path} name different classes; re-embed "
            f"both: python embed.py -c {config_path or '<config>'}"
        )
    return query_set, gallery


VERIFICATION_FILE = "verification.json"  # in <run>/evaluation/: cbir.py --same-item reads it


def verify_run(
    config: dict,
    *,
    false_match_rate: float = DEFAULT_FALSE_MATCH_RATE,
    seed: int = 0,
    config_path=None,
    checkpoint=None,
) -> dict:
    """evaluation.py --verification: every (query, gallery item) pair of the config's protocol
    (each query left out of its own pairs for leave-one-out; a seeded sample past a million
    pairs of a kind) as same-class or different-class, their ROC AUC, equal error rate and the
    score threshold at ``false_match_rate`` (:func:`retrieval.verification.verify`), saved as
    ``<run>/evaluation/verification.json`` with the gallery's model and protocol; returns it
    (``saved``: where)."""
    made = sets.splits(config) if sets.needs_splits(config, "query", "gallery") else None
    protocol = sets.protocol(config, made)
    query_set, gallery = _open_protocol(config, protocol, config_path, checkpoint, made)
    result = verify(
        query_set.embeddings,
        query_set.labels,
        gallery.embeddings,
        gallery.labels,
        normalized=gallery.normalized,
        exclude=np.arange(len(query_set)) if protocol.leave_one_out else None,
        false_match_rate=false_match_rate,
        seed=seed,
    )
    result.update(
        protocol=protocol.name,
        gallery=str(gallery.path),
        model_id=gallery.model_id,
        model_step=gallery.model_step,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    out = RunFolder.of(config).evaluation / VERIFICATION_FILE
    write_json(out, result)
    result["saved"] = str(out)
    return result


def verification_report(result: dict) -> str:
    return "\n".join(
        [
            f"{result['protocol']}: same-class against different-class pairs "
            f"({result['same_class_pairs']:,} and {result['different_class_pairs']:,}; score: "
            f"{result['score']}; model at step {result['model_step']})",
            f"  ROC AUC          {result['roc_auc']:.4f}",
            f"  equal error rate {result['eer']:.4f} (threshold {result['eer_threshold']:.4f})",
            f"  at a false match rate of at most {result['false_match_rate_target']:g}: "
            f"threshold {result['threshold']:.4f}, true match rate "
            f"{result['true_match_rate']:.4f}",
            f"saved to {result['saved']}",
        ]
    )


def same_item_threshold(
    config: dict,
    model_id: str,
    *,
    needed_by: str = "--same-item",
    config_path=None,
    instead: str = "",
) -> float:
    """The threshold of the run's saved verification (``evaluation.py --verification``) for
    the model ``model_id``; UserError when there is none, or it is of other weights, naming
    the flag that ``needed_by`` it and ``instead``, another way to give one (e.g. "give
    --threshold, or ")."""
    path = RunFolder.of(config).evaluation / VERIFICATION_FILE
    measure = f"python evaluation.py -c {config_path or '<config>'} --verification"
    if not path.is_file():
        raise UserError(
            f"{needed_by} needs the run's verification threshold ({path} does not exist); "
            f"{instead}measure it first: {measure}"
        )
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("model_id") != model_id:
        raise UserError(
            f"{path} was measured with other weights than the gallery's; {instead}measure it "
            f"again: {measure}"
        )
    return float(saved["threshold"])


def model_selected_on(config: dict) -> str | None:
    """Where the run chose its model (its recorded ``train.validation.source``): holdout, test
    (the test metrics are then optimistic) or none; None when the run folder records none."""
    saved = RunFolder.of(config).saved_config() or {}
    return saved.get("train", {}).get("validation", {}).get("source")


def report_keys(r: int | None) -> list[str]:
    """The keys :func:`report` prints, in order, for an evaluation with cut-off ``r``."""
    return [map_key(r) if key == "mAP@<r>" else key for key in ORDER]


def report(result: dict) -> str:
    lines = [
        f"{result['protocol']}: {result['queries']} queries against "
        f"{result['gallery_size']} gallery images, r = {result['r']} "
        f"(model at step {result['model_step']})"
    ]
    rerank = result.get("rerank") or {"method": "none"}
    if rerank["method"] != "none":
        settings = ", ".join(f"{k}={v}" for k, v in rerank.items() if k != "method")
        lines.append(f"answers re-ranked by {rerank['method']} ({settings}); NMI is not re-ranked")
    if result.get("on_training_images"):
        lines.append(
            "warning: the data set has no test split, so these queries are training images "
            "(leave-one-out on what the model was trained on): the numbers are optimistic; "
            "split it (data.split.by: images or classes) to measure retrieval of new images"
        )
    if result.get("model_selected_on") == "test":
        lines.append(
            "warning: the run chose its model on the test split (train.validation.source: "
            "test), so these test numbers are optimistic; train with the default holdout "
            "validation for honest ones"
        )
    if result["excluded_queries"]:
        lines.append(
            f"{result['excluded_queries']} queries have no other image of their class "
            "in the gallery and are left out of the averages"
        )
    keys = [key for key in report_keys(result["r"]) if key in result]
    width = max(len(k) for k in keys)
    lines += [f"  {key:<{width}}  {result[key]:.4f}" for key in keys]
    lines.append(f"saved to {result['saved']}")
    return "\n".join(lines)
