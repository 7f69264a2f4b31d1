"""``analysis.py``'s work: analyse a run's gallery of one set and write the report.

:func:`analyze` reads the gallery through :func:`retrieval.evaluate.open_gallery` (so a stale
gallery or one made by other weights is refused), analyses each model's embeddings of the same
images (the run's; with ``compare``, another run's; with ``baseline``, the untrained model's),
and writes ``index.html``, ``report.json`` and the PNG files into the report folder
(:func:`default_folder`). What each part means: the package docstring and docs/analysis.md.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import config as cfg
from datasets.images import ImageError, load_image
from report import baseline as untrained
from report import clustering, figures, maps, page
from report.per_class import DEFAULT_QUERIES, ClassRetrieval, class_retrieval
from retrieval import sets
from retrieval.evaluate import open_gallery
from retrieval.gallery import Gallery
from runs.folder import RunFolder
from tfcbir import UserError
from tfcbir.files import atomic_output, write_json
from tfcbir.progress import Progress

log = logging.getLogger("tfcbir")

PAGE = "index.html"
JSON = "report.json"


@dataclass(frozen=True)
class Limits:
    """Sample sizes that keep the report's time bounded on large sets (each sample is seeded)."""

    map_points: int = maps.DEFAULT_POINTS  # points on each 2-D map
    cluster_points: int = clustering.DEFAULT_SAMPLE  # agglomerative, DBSCAN, HDBSCAN, silhouette
    queries: int = DEFAULT_QUERIES  # leave-one-out queries for per-class retrieval; 0: all
    thumbnails: int = 400  # images drawn on the thumbnail map; 0: no thumbnail map
    dbscan_quantile: float = clustering.EPS_QUANTILE  # DBSCAN's eps: this k-distance quantile

    def check(self) -> None:
        for name, value in asdict(self).items():
            flag = "--" + name.replace("_", "-")
            if name == "dbscan_quantile":
                if not 0 < value <= 1:
                    raise UserError(f"{flag} {value}: give a share in (0, 1]")
                continue
            least = 0 if name in ("queries", "thumbnails") else 2
            if value < least:
                raise UserError(f"{flag} {value}: give a number >= {least}")


@dataclass
class Space:
    """One model's embeddings (N, D) of the analysed images, and where they came from."""

    slug: str  # file-name prefix of its pictures
    kind: str  # "trained", "compared" or "baseline"
    title: str
    embeddings: np.ndarray
    normalized: bool
    model: dict = field(default_factory=dict)  # model_id, model_step, gallery
    run: RunFolder | None = None  # for its training curves; None for the baseline


def default_folder(config: dict, split: str, other: str | None = None) -> Path:
    """``<run>/analysis/<split>``, or ``<split>-vs-<other>`` for a comparison (other: the
    compared run's name, or "baseline")."""
    name = split if other is None else f"{split}-vs-{_slug(other)}"
    return RunFolder.of(config).analysis(name)


def default_split(config: dict) -> str:
    """The set the evaluation protocol queries (e.g. test)."""
    return sets.protocol(config).queries


def analyze(
    config: dict,
    *,
    split: str | None = None,
    compare: dict | None = None,
    baseline: bool = False,
    out: Path | None = None,
    seed: int = 0,
    limits: Limits = Limits(),
    config_path: str | None = None,
    compare_path: str | None = None,
    show_progress: bool = True,
    checkpoint: Path | None = None,
) -> dict:
    """Analyse the run of ``config`` on set ``split`` (default :func:`default_split`), write the
    report and return its numbers (what ``report.json`` holds, plus ``page``: the HTML file).

    compare: another run's resolved config, analysed on the same images (refused when its
    gallery of ``split`` holds other items); baseline: also the untrained model. One at most.
    checkpoint: the weights ``config``'s gallery was embedded with (``embed.py --checkpoint``;
    default: the run's best); a compared run's gallery is always of its best weights.
    """
    if compare is not None and baseline:
        raise UserError("--compare and --baseline each add a second model; give one of them")
    limits.check()
    split = split or default_split(config)
    if split not in sets.SET_NAMES:
        raise UserError(f"--split {split}: unknown set; give one of {', '.join(sets.SET_NAMES)}")
    gallery = open_gallery(config, split, config_path, checkpoint=checkpoint)
    if len(gallery) < 2:
        raise UserError(f"{gallery.path} holds {len(gallery)} image; the report needs at least 2")
    other = None if compare is None else compare["name"]
    folder = (
        Path(out)
        if out is not None
        else default_folder(config, split, "baseline" if baseline else other)
    )
    run = RunFolder.of(config)
    spaces = [_trained_space(config, gallery, run, "trained")]
    if compare is not None:
        spaces.append(_compared_space(compare, compare_path, gallery, split))
    if baseline:
        spaces.append(_baseline_space(config, gallery, folder, show_progress))
    if len(spaces) == 2 and spaces[1].slug == spaces[0].slug:
        spaces[-1].slug += "-2"
    return Report(config, gallery, spaces, folder, seed, limits, show_progress).write(config_path)


# --- the models' embeddings ----------------------------------------------------------------------


def _trained_space(config: dict, gallery: Gallery, run: RunFolder, kind: str) -> Space:
    return Space(
        slug=_slug(config["name"]),
        kind=kind,
        title=f"{config['name']} (step {gallery.model_step})",
        embeddings=gallery.embeddings,
        normalized=gallery.normalized,
        model={
            "model_id": gallery.model_id,
            "model_step": gallery.model_step,
            "gallery": str(gallery.path),
        },
        run=run,
    )


def _compared_space(other: dict, other_path: str | None, gallery: Gallery, split: str) -> Space:
    found = open_gallery(other, split, other_path)
    reason = _items_differ(gallery, found)
    if reason:
        raise UserError(
            f"--compare {other_path or other['name']}: its {split} gallery {found.path} holds "
            f"other images than {gallery.path} ({reason}); compare runs on the same data set "
            "and split"
        )
    return _trained_space(other, found, RunFolder.of(other), "compared")


def _items_differ(a: Gallery, b: Gallery) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} images"
    if a.classes != b.classes:
        return "different class names"
    if a.paths != b.paths:
        first = next(i for i, (p, q) in enumerate(zip(a.paths, b.paths)) if p != q)
        return f"image {first} is {a.paths[first]} vs {b.paths[first]}"
    if not np.array_equal(a.labels, b.labels):
        return "different labels"
    return ""


def _baseline_space(config: dict, gallery: Gallery, folder: Path, show_progress: bool) -> Space:
    bar = Progress(len(gallery), unit="images") if show_progress else None
    embeddings = untrained.baseline_embeddings(
        config,
        gallery,
        folder,
        progress=None if bar is None else lambda done, total: bar.update(done, text="baseline"),
    )
    if bar is not None:
        bar.close()
    return Space(
        slug="baseline",
        kind="baseline",
        title=untrained.describe(config),
        embeddings=embeddings,
        normalized=cfg.normalized_embeddings(config),
        model={"model_id": untrained.identity(config), "model_step": 0},
    )


# --- the report ---------------------------------------------------------------------------------


class Report:
    """The report of one or two models' embeddings (``spaces``) of the images of ``gallery``,
    written into ``folder`` by :meth:`write`. ``config`` gives the run's name and the data root
    the thumbnails are read from when the gallery's recorded one is gone."""

    def __init__(
        self,
        config: dict,
        gallery: Gallery,
        spaces: list[Space],
        folder: Path,
        seed: int = 0,
        limits: Limits = Limits(),
        show_progress: bool = True,
    ):
        self.config, self.gallery, self.spaces = config, gallery, spaces
        self.folder, self.seed, self.limits = folder, seed, limits
        n = len(gallery)
        self.labels = gallery.labels
        # The classes present in the set (a class-disjoint test set holds only the test
        # classes), numbered 0..C-1 for the per-class numbers; maps keep the gallery's labels.
        present = np.unique(self.labels)
        self.n_classes = len(present)
        self.class_ids = np.searchsorted(present, self.labels)
        self.class_names = [gallery.classes[int(c)] for c in present]
        # One sample of each kind for every model: their numbers and maps cover the same images.
        self.cluster_sample = clustering.sample_indices(n, limits.cluster_points, seed)
        self.map_sample = clustering.sample_indices(n, limits.map_points, seed + 1)
        self.queries = clustering.sample_indices(n, limits.queries or n, seed + 2)
        self.thumbnails = self.map_sample[
            clustering.sample_indices(len(self.map_sample), limits.thumbnails, seed + 3)
        ]
        self.methods = maps.methods()
        self.notes: list[str] = []
        parts = ["reading images for the thumbnail map"] if limits.thumbnails else []
        for space in spaces:
            parts += [f"{space.slug}: {m}" for m in clustering.METHODS]
            parts += [f"{space.slug}: per-class retrieval"]
            parts += [f"{space.slug}: {m} map" for m in self.methods]
            parts += [f"{space.slug}: pictures"]
        self.parts = parts
        self.progress = Progress(len(parts), unit="parts", every_s=0) if show_progress else None
        self.done = 0
        self.seconds: dict[str, float] = {}  # each part's wall-clock time
        self.cpu_seconds: dict[str, float] = {}  # and its CPU time (all threads)
        self._current: tuple[str, float, float] | None = None

    def _part(self, text: str) -> None:
        """Start part ``text`` (the previous one ends)."""
        self._end_part()
        if self.progress is not None:
            self.progress.update(self.done, text=text + " ...")
        self.done += 1
        self._current = (text, time.monotonic(), time.process_time())

    def _end_part(self) -> None:
        if self._current is not None:
            text, start, cpu_start = self._current
            self.seconds[text] = round(time.monotonic() - start, 3)
            self.cpu_seconds[text] = round(time.process_time() - cpu_start, 3)
            self._current = None

    def write(self, config_path: str | None = None) -> dict:
        """Analyse every model, write the files; returns the numbers (``report.json``'s content
        and ``page``, the HTML file's path)."""
        self._say_samples()
        images = self._thumbnail_images() if self.limits.thumbnails else None
        models = [self._analyse(space, images) for space in self.spaces]
        self._end_part()
        if self.progress is not None:
            self.progress.update(self.done, text="done")
            self.progress.close()
        gallery = self.gallery
        result = {
            "run": self.config["name"],
            "config": config_path,
            "split": gallery.split,
            "gallery": str(gallery.path),
            "items": len(gallery),
            "dim": gallery.dim,
            "classes": self.n_classes,
            "seed": self.seed,
            "limits": asdict(self.limits),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "notes": self.notes,
            "models": models,
            "folder": str(self.folder),
            "files": {"page": PAGE, "json": JSON},
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }
        write_json(self.folder / JSON, result)
        page.write_page(self.folder / PAGE, result)
        return {**result, "page": str(self.folder / PAGE)}

    def _say_samples(self) -> None:
        n = len(self.gallery)
        geometry = {space.normalized for space in self.spaces}
        if geometry == {True}:
            self.notes.append(
                "Cosine geometry (the run's search): the embeddings are L2-normalised and "
                "clustered, mapped and searched as unit vectors (Euclidean distance between unit "
                "vectors orders pairs as the cosine does)."
            )
        elif geometry == {False}:
            self.notes.append(
                "Euclidean geometry (the run's search): the embeddings are clustered, mapped and "
                "searched as they are, by Euclidean distance."
            )
        else:
            self.notes.append(
                "The models differ in geometry: each is clustered, mapped and searched in its "
                "own (cosine: as unit vectors; Euclidean: as they are)."
            )
        if len(self.cluster_sample) < n:
            self.notes.append(
                f"Agglomerative, DBSCAN, HDBSCAN and every silhouette use a seeded sample of "
                f"{len(self.cluster_sample):,} of the {n:,} images; k-means clusters all of them."
            )
        if len(self.map_sample) < n:
            self.notes.append(
                f"The maps show a seeded sample of {len(self.map_sample):,} of the {n:,} images."
            )
        if len(self.queries) < n:
            self.notes.append(
                f"Per-class retrieval: a seeded sample of {len(self.queries):,} of the {n:,} "
                "images query the whole set."
            )
        if self.limits.thumbnails and len(self.thumbnails) < len(self.map_sample):
            self.notes.append(
                f"The thumbnail map draws {len(self.thumbnails):,} of the map's "
                f"{len(self.map_sample):,} images (a seeded sample)."
            )

    def _thumbnail_images(self) -> list[np.ndarray | None]:
        self._part("reading images for the thumbnail map")
        root = untrained.image_root(self.config, self.gallery)
        images, missing = [], 0
        for index in self.thumbnails:
            try:
                images.append(load_image(root / self.gallery.paths[index], (64, 64)))
            except ImageError:
                images.append(None)
                missing += 1
        if missing:
            self.notes.append(
                f"{missing} of the thumbnail map's images could not be read under {root} "
                "(grey squares)."
            )
        return images

    def _analyse(self, space: Space, images) -> dict:
        points = clustering.clustering_points(space.embeddings, space.normalized)
        labels = self.labels
        scores = {}
        for method in clustering.METHODS:
            self._part(f"{space.slug}: {method}")
            found = clustering.run_method(
                method,
                points,
                self.n_classes,
                self.cluster_sample,
                self.seed,
                eps_quantile=self.limits.dbscan_quantile,
            )
            scores[method] = clustering.score(found, labels, points, self.cluster_sample, self.seed)
        class_silhouette = clustering.silhouette(
            points[self.cluster_sample], labels[self.cluster_sample], seed=self.seed
        )
        self._part(f"{space.slug}: per-class retrieval")
        stats = class_retrieval(
            space.embeddings,
            self.class_ids,
            self.class_names,
            normalized=space.normalized,
            queries=self.queries,
        )
        coordinates = {}
        for method in self.methods:
            self._part(f"{space.slug}: {method} map")
            coordinates[method] = maps.embed_2d(method, points[self.map_sample], self.seed)
        self._part(f"{space.slug}: pictures")
        files = self._pictures(space, stats, coordinates, images)
        model = {
            "name": space.slug,
            "kind": space.kind,
            "title": space.title,
            **space.model,
            "geometry": "cosine" if space.normalized else "euclidean",
            "class_silhouette": class_silhouette,
            "clustering": scores,
            "maps": {
                method: {"points": len(self.map_sample), "file": files.pop(f"map {method}")}
                for method in self.methods
            },
            "files": files,
        }
        if stats is None:
            self.notes.append(
                f"{space.slug}: no class has two images among the queries, so there is no "
                "per-class retrieval."
            )
        else:
            model["retrieval"] = {
                "recall@1": stats.recall_at_1_overall,
                "MAP@R": stats.map_at_r_overall,
                "queries": stats.n_queries,
                "excluded_queries": stats.n_excluded,
            }
            model["per_class"] = stats.as_rows()
            model["most_confused"] = stats.most_confused()
        return model

    def _pictures(
        self,
        space: Space,
        stats: ClassRetrieval | None,
        coordinates: dict[str, np.ndarray],
        images,
    ) -> dict[str, str]:
        """The pictures of one space, saved in the report folder: ``{what: file name}`` (maps,
        thumbnails, per-class bars, confusion matrix and its CSV, training curves)."""
        files = self._map_pictures(space, coordinates)
        if images is not None:
            files["thumbnails"] = self._thumbnail_picture(space, coordinates, images)
        if stats is not None:
            files.update(self._class_pictures(space, stats))
        metrics = space.run.read_metrics() if space.run is not None else None
        if metrics is not None and len(metrics["step"]):
            name = f"{space.slug}-curves.png"
            figures.save_figure(
                figures.curves_figure(metrics, title=f"Training of {space.title}"),
                self.folder / name,
            )
            files["curves"] = name
        elif space.run is not None:
            self.notes.append(f"{space.slug}: no metrics.csv in {space.run.path}: no curves.")
        return files

    def _map_pictures(self, space: Space, coordinates: dict[str, np.ndarray]) -> dict[str, str]:
        """One map per method, of the map sample: ``{"map <method>": file name}``."""
        files: dict[str, str] = {}
        n, shown = len(self.gallery), len(self.map_sample)
        sample_note = f"a seeded sample of {shown:,} of {n:,} images" if shown < n else ""
        for method, coords in coordinates.items():
            name = f"{space.slug}-{_slug(method)}.png"
            figures.save_figure(
                figures.map_figure(
                    coords,
                    self.labels[self.map_sample],
                    self.gallery.classes,
                    title=f"{method} map of {space.title}, {self.gallery.split} set",
                    note=sample_note,
                ),
                self.folder / name,
            )
            files[f"map {method}"] = name
        return files

    def _thumbnail_picture(self, space: Space, coordinates: dict[str, np.ndarray], images) -> str:
        """The first method's map drawn with the thumbnails' images; its file name."""
        first = coordinates[self.methods[0]]
        where = np.searchsorted(self.map_sample, self.thumbnails)
        name = f"{space.slug}-thumbnails.png"
        picture = figures.thumbnail_map(
            first[where],
            images,
            self.labels[self.thumbnails],
            title=f"{self.methods[0]} map of {space.title}: {len(images):,} images, framed "
            "in their class colour",
            classes=self.gallery.classes,
        )
        figures.save_image(picture, self.folder / name)
        return name

    def _class_pictures(self, space: Space, stats: ClassRetrieval) -> dict[str, str]:
        """Per-class bars, the confusion matrix and its CSV: ``{what: file name}``."""
        classes = self.class_names
        files = {"per_class": f"{space.slug}-per-class.png"}
        figures.save_figure(
            figures.per_class_figure(
                classes,
                stats.recall_at_1,
                stats.map_at_r,
                stats.worst_first(),
                title=f"Per-class retrieval of {space.title}",
            ),
            self.folder / files["per_class"],
        )
        files["confusion"] = f"{space.slug}-confusion.png"
        figures.save_figure(
            figures.confusion_figure(
                stats.confusion,
                classes,
                title=f"Nearest-neighbour classes of {space.title}",
            ),
            self.folder / files["confusion"],
        )
        files["confusion_csv"] = f"{space.slug}-confusion.csv"
        _write_confusion(self.folder / files["confusion_csv"], stats.confusion, classes)
        return files


def _write_confusion(path: Path, confusion: np.ndarray, classes: list[str]) -> None:
    """The confusion matrix as CSV: a header of neighbour classes, one row per query class."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["query class \\ neighbour class", *classes])
    for name, row in zip(classes, confusion):
        writer.writerow([name, *row.tolist()])
    with atomic_output(path) as tmp:
        tmp.write_text(text.getvalue())


def _slug(name: str) -> str:
    """A file-name-safe form of a run or method name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "run"


def summary(result: dict) -> str:
    """A few lines for the terminal: each model's headline numbers and where the page is."""
    models = result["models"]
    lines = [
        f"{result['run']}, {result['split']} set: {result['items']:,} images, "
        f"{result['classes']} classes, {result['dim']}-d"
    ]
    rows = [("Recall@1", lambda m: m.get("retrieval", {}).get("recall@1"))]
    rows.append(("MAP@R", lambda m: m.get("retrieval", {}).get("MAP@R")))
    rows.append(("class silhouette", lambda m: m["class_silhouette"]))
    for method in clustering.METHODS:
        rows.append((f"{method} NMI", lambda m, method=method: m["clustering"][method]["NMI"]))
    width = max(len(label) for label, _ in rows)
    columns = [m["name"][:14] for m in models]
    lines.append(" " * (width + 2) + "".join(f"{c:>16}" for c in columns))
    for label, value in rows:
        cells = "".join(f"{_cell(value(m)):>16}" for m in models)
        lines.append(f"  {label:<{width}}{cells}")
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append(f"report: {result['page']}")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"
