"""The report's HTML page, rendered from the same numbers as ``report.json``.

One self-contained file: the style is inline and every picture is referenced by its file name
in the same folder, so the folder can be moved, zipped or served as it is. Models are shown in
columns, side by side, when there are two.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from report.clustering import METHODS
from tfcbir.files import atomic_output

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e3e3e3; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.side { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.side > div { flex: 1 1 600px; min-width: 0; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.notes { background: #f6f6f6; padding: 0.6em 1.2em; }
.meaning { color: #444; font-size: 0.92em; max-width: 70em; }
.better { color: #080; } .worse { color: #b00; }
"""

MEANING = {
    "clustering": (
        "Each method looks for groups without seeing the classes; the scores compare its groups "
        "with the classes. NMI (normalised mutual information, arithmetic mean) and ARI "
        "(adjusted Rand index) are 1 when groups and classes agree exactly and about 0 for "
        "chance (ARI can go below 0). Purity: the share of images whose group's most common "
        "class is their own (a method that makes many small groups scores high). Silhouette "
        "(-1..1): how much closer an image is to its own group than to the next one. k-means and "
        "agglomerative (Ward) are asked for as many groups as there are classes; DBSCAN and "
        "HDBSCAN choose their number and leave outliers as noise, which counts as one more "
        "group for NMI, ARI and purity. The class silhouette is the silhouette of the true "
        "classes: how well the embedding space separates them, whatever the method."
    ),
    "maps": (
        "Nearby points are images the model finds similar; t-SNE keeps neighbourhoods, not "
        "distances, so the size of a cluster and the gap between clusters mean little. Each "
        "colour (and marker shape, past 20 classes) is a class."
    ),
    "per_class": (
        "Each image of the set queries the rest of the set (leave-one-out). Recall@1: the share "
        "of a class's queries whose nearest other image is of the same class. MAP@R: mean "
        "average precision at R, R the number of other images of the class (1 when all of them "
        "come first). Queries whose class has no other image are left out."
    ),
    "confusion": (
        "Row: the class of the query; column: the class of its nearest other image; each row "
        "divided by its number of queries, so the diagonal is the class's Recall@1."
    ),
    "curves": (
        "From the run's metrics.csv: the training loss of each logged step (the black line is a "
        "moving average), the learning rate, and Recall@1 on the validation images at each "
        "validation."
    ),
}


def write_page(path: str | os.PathLike, report: dict) -> Path:
    """Write the page for ``report`` (the dict of ``report.json``) atomically; returns ``path``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(render(report), encoding="utf-8")
    return path


def render(report: dict) -> str:
    """The page as a string."""
    models = report["models"]
    title = f"Embedding analysis: {report['run']}, {report['split']} set"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<p>"
        + _e(
            f"{report['items']:,} images of {report['classes']} classes, "
            f"{report['dim']}-dimensional embeddings, from {report['gallery']}. "
            f"Seed {report['seed']}; made {report['created']}."
        )
        + "</p>",
        "<p>Models: "
        + "; ".join(f"<b>{_e(m['name'])}</b>: {_e(m['title'])}" for m in models)
        + "</p>",
    ]
    if report["notes"]:
        parts.append(
            '<div class="notes"><ul>'
            + "".join(f"<li>{_e(note)}</li>" for note in report["notes"])
            + "</ul></div>"
        )
    parts += _summary(models)
    parts += _clustering(models)
    parts += _pictures(models, "maps", "2-D maps", _map_files)
    parts += _pictures(models, "per_class", "Per-class retrieval", lambda m: _file(m, "per_class"))
    parts += _pictures(
        models, "confusion", "Nearest-neighbour class confusion", lambda m: _file(m, "confusion")
    )
    parts += _confused(models)
    parts += _pictures(models, "curves", "Training curves", lambda m: _file(m, "curves"))
    parts.append(
        f'<p>Numbers: <a href="{_e(report["files"]["json"])}">{_e(report["files"]["json"])}</a>'
        "</p></body></html>"
    )
    return "\n".join(parts) + "\n"


def _summary(models: list[dict]) -> list[str]:
    rows = [
        ("Recall@1", lambda m: m.get("retrieval", {}).get("recall@1")),
        ("MAP@R", lambda m: m.get("retrieval", {}).get("MAP@R")),
        ("class silhouette", lambda m: m["class_silhouette"]),
    ]
    for method in METHODS:
        rows.append((f"{method} NMI", lambda m, method=method: m["clustering"][method]["NMI"]))
    header = "".join(f"<th>{_e(m['name'])}</th>" for m in models)
    if len(models) == 2:
        header += f"<th>{_e(models[0]['name'])} - {_e(models[1]['name'])}</th>"
    lines = ["<h2>Summary</h2>", f"<table><tr><th></th>{header}</tr>"]
    for label, value in rows:
        values = [value(m) for m in models]
        cells = "".join(f"<td>{_number(v)}</td>" for v in values)
        if len(models) == 2:
            cells += _delta(values[0], values[1])
        lines.append(f"<tr><td>{_e(label)}</td>{cells}</tr>")
    lines.append("</table>")
    return lines


def _clustering(models: list[dict]) -> list[str]:
    lines = ["<h2>Clustering</h2>", f'<p class="meaning">{_e(MEANING["clustering"])}</p>']
    lines.append('<div class="side">')
    for model in models:
        lines.append(f"<div><h3>{_e(model['name'])}</h3><table>")
        lines.append(
            "<tr><th>method</th><th>images</th><th>clusters</th><th>noise</th><th>NMI</th>"
            "<th>ARI</th><th>purity</th><th>silhouette</th><th>parameters</th></tr>"
        )
        for method in METHODS:
            s = model["clustering"][method]
            parameters = ", ".join(f"{k} {_short(v)}" for k, v in s["parameters"].items())
            lines.append(
                f"<tr><td>{_e(method)}</td><td>{s['points']:,}</td><td>{s['clusters']}</td>"
                f"<td>{s['noise']:.1%}</td><td>{_number(s['NMI'])}</td>"
                f"<td>{_number(s['ARI'])}</td><td>{_number(s['purity'])}</td>"
                f"<td>{_number(s['silhouette'])}</td><td>{_e(parameters)}</td></tr>"
            )
        lines.append(
            f"<tr><td>classes</td><td></td><td></td><td></td><td></td><td></td><td></td>"
            f"<td>{_number(model['class_silhouette'])}</td><td>true classes</td></tr>"
        )
        lines.append("</table></div>")
    lines.append("</div>")
    return lines


def _pictures(models: list[dict], key: str, heading: str, files) -> list[str]:
    found = [(model, files(model)) for model in models]
    if not any(names for _, names in found):
        return []
    lines = [f"<h2>{_e(heading)}</h2>", f'<p class="meaning">{_e(MEANING[key])}</p>']
    lines.append('<div class="side">')
    for model, names in found:
        lines.append(f"<div><h3>{_e(model['name'])}</h3>")
        if not names:
            lines.append("<p>not available</p>")
        for name in names:
            lines.append(f'<a href="{_e(name)}"><img src="{_e(name)}" alt="{_e(name)}"></a>')
        lines.append("</div>")
    lines.append("</div>")
    return lines


def _confused(models: list[dict]) -> list[str]:
    if not any("confusion_csv" in m["files"] for m in models):
        return []
    lines = ['<div class="side">']
    for model in models:
        lines.append(f"<div><h3>Most confused classes: {_e(model['name'])}</h3>")
        pairs = model.get("most_confused", [])
        if pairs:
            lines.append(
                "<table><tr><th>query class</th><th>nearest image's class</th><th>queries</th>"
                "<th>share of the class</th></tr>"
            )
            for pair in pairs:
                lines.append(
                    f"<tr><td>{_e(pair['query_class'])}</td>"
                    f"<td>{_e(pair['neighbour_class'])}</td><td>{pair['count']}</td>"
                    f"<td>{pair['share']:.1%}</td></tr>"
                )
            lines.append("</table>")
        elif "confusion_csv" in model["files"]:
            lines.append("<p>None: every query's nearest other image is of its class.</p>")
        csv_file = model["files"].get("confusion_csv")
        if csv_file:
            lines.append(f'<p>Whole matrix: <a href="{_e(csv_file)}">{_e(csv_file)}</a></p>')
        lines.append("</div>")
    lines.append("</div>")
    return lines


def _map_files(model: dict) -> list[str]:
    names = [found["file"] for found in model["maps"].values()]
    return names + _file(model, "thumbnails")


def _file(model: dict, key: str) -> list[str]:
    name = model["files"].get(key)
    return [name] if name else []


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(a, b) -> str:
    if a is None or b is None:
        return "<td>-</td>"
    difference = a - b
    kind = "better" if difference > 0 else "worse" if difference < 0 else ""
    return f'<td class="{kind}">{difference:+.4f}</td>'


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _e(text) -> str:
    return html.escape(str(text), quote=True)
