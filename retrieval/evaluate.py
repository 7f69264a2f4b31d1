"""evaluation.py's work: sample queries from a run's galleries, score them, save the result."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

import config as cfg
from retrieval import sets
from retrieval.embedder import expected_model_id
from retrieval.gallery import Gallery, read_gallery
from retrieval.metrics import evaluate
from tfcbir import UserError
from tfcbir.files import write_json

ORDER = [
    "mAP",
    "precision@1",
    "recall@1",
    "recall@2",
    "recall@4",
    "recall@8",
    "MAP@R",
    "R-precision",
    "NMI",
]


def open_gallery(config: dict, name: str, config_path=None, model_id: str | None = None) -> Gallery:
    """A run's gallery of set ``name``, refused if another model or config made it.

    model_id: the identity of the weights in use (an Embedder's), default the run's best."""
    return read_gallery(
        sets.gallery_file(config, name),
        expect_model_id=model_id or expected_model_id(config),
        expect_config_hash=cfg.model_hash(config),
        config_path=config_path,
    )


def evaluate_run(
    config: dict,
    *,
    queries: int,
    r: int,
    seed: int = 0,
    ap_denominator: str = "min_r_g",
    config_path=None,
) -> dict:
    if queries < 0:
        raise UserError(f"-t {queries}: give a number of queries >= 0 (0: all)")
    if r < 1:
        raise UserError(f"-r {r}: give a number of answers >= 1")
    protocol = sets.protocol(config)
    gallery = open_gallery(config, protocol.gallery, config_path)
    query_set = (
        gallery if protocol.leave_one_out else open_gallery(config, protocol.queries, config_path)
    )
    if query_set.classes != gallery.classes:
        raise UserError(
            f"{query_set.path} and {gallery.path} name different classes; re-embed "
            f"both: python embed.py -c {config_path or '<config>'}"
        )
    available = len(query_set) - (1 if protocol.leave_one_out else 0)
    if r > available:
        raise UserError(
            f"-r {r} is larger than the gallery ({available} images to answer "
            f"from); give -r <= {available}"
        )
    picked = np.arange(len(query_set))
    if queries and queries < len(query_set):
        picked = np.sort(np.random.default_rng(seed).choice(len(query_set), queries, replace=False))
    exclude = picked if protocol.leave_one_out else None
    metrics = evaluate(
        query_set.embeddings[picked],
        query_set.labels[picked],
        gallery.embeddings,
        gallery.labels,
        normalized=gallery.normalized,
        exclude=exclude,
        r=r,
        ap_denominator=ap_denominator,
        seed=seed,
    )
    values = metrics.as_dict()
    result = {key: values[key] for key in ORDER if key in values}
    result.update(
        {
            "queries": int(len(picked)),
            "excluded_queries": values["excluded_queries"],
            "r": r,
            "protocol": protocol.name,
            "ap_denominator": ap_denominator,
            "seed": seed,
            "gallery": str(gallery.path),
            "gallery_size": len(gallery),
            "model_step": gallery.model_step,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    out = (
        cfg.run_dir(config)
        / "evaluation"
        / (
            f"{protocol.name}-t{queries}-r{r}-seed{seed}"
            + ("" if ap_denominator == "min_r_g" else f"-{ap_denominator}")
            + ".json"
        )
    )
    write_json(out, result)
    result["saved"] = str(out)
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['protocol']}: {result['queries']} queries against "
        f"{result['gallery_size']} gallery images, r = {result['r']} "
        f"(model at step {result['model_step']})"
    ]
    if result["excluded_queries"]:
        lines.append(
            f"{result['excluded_queries']} queries have no other image of their class "
            "in the gallery and are left out of the averages"
        )
    width = max(len(k) for k in ORDER)
    lines += [f"  {key:<{width}}  {result[key]:.4f}" for key in ORDER if key in result]
    lines.append(f"saved to {result['saved']}")
    return "\n".join(lines)
