"""Review list and HTML report of a finished MedSMILE run, read from its output folder alone.

``review.csv`` ranks the unlabelled images by the last round's uncertainty, so that a reviewer checks the least
trustworthy pseudo-labels first. ``report/index.html`` is a static page (relative links, no script, nothing fetched
from elsewhere): a per-round table, per-round figures as PNG (matplotlib, Agg canvas) and overlay thumbnails of the
most and least certain images. Only the images shown are read, so memory stays flat whatever the pool size.

The report depends on the files a run leaves (``run_config.json``, ``summary.json``, ``round_<r>/round.json``,
``round_<r>/uncertainty.csv``, ``round_<r>/labels``), never on the pipeline's objects, so it can be rebuilt for any
finished or interrupted run.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .atomic_files import atomic_path
from .image_io import case_name, label_slices, read_case, read_label, split_name
from .metrics import evaluate_rounds
from .pool import pool_sources

logger = logging.getLogger(__name__)

REVIEW_FILE = "review.csv"
REPORT_DIR = "report"
THUMBNAIL_SIZE = 192  # longest side in pixels
OVERLAY_ALPHA = 0.4
# colour of classes 1, 2, ... (class 0, background, is not drawn); repeats beyond seven classes
CLASS_COLOURS = np.array(
    [(255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0), (0, 96, 255), (255, 0, 0)],
    dtype=np.float32,
)


@dataclass(frozen=True)
class ScoredImage:
    """One row of a round's ``uncertainty.csv``."""

    image: str  # case name, or "case#slice" for a volume slice
    entropy: float
    refined: bool


def finished_rounds(output_dir: str) -> list[int]:
    """Round numbers with a ``round.json`` (a round folder appears only once complete), in order."""
    rounds = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        m = re.fullmatch(r"round_(\d+)", name)
        if m and os.path.isfile(os.path.join(output_dir, name, "round.json")):
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _round_record(output_dir: str, r: int) -> dict:
    return _read_json(os.path.join(output_dir, f"round_{r}", "round.json"))


def _scored_rounds(output_dir: str) -> list[int]:
    """Finished rounds that measured uncertainty (rounds >= 1; round 0's prototype labels have none on disk)."""
    return [
        r
        for r in finished_rounds(output_dir)
        if os.path.isfile(os.path.join(output_dir, f"round_{r}", "uncertainty.csv"))
    ]


def ranked_uncertainty(output_dir: str, r: int) -> list[ScoredImage]:
    """Round r's images, most uncertain first (ties by name, so the order is reproducible)."""
    with open(os.path.join(output_dir, f"round_{r}", "uncertainty.csv"), newline="", encoding="utf-8") as f:
        rows = [
            ScoredImage(row["image"], float(row["mean_pixel_entropy"]), row["refined"] == "1")
            for row in csv.DictReader(f)
        ]
    return sorted(rows, key=lambda s: (-s.entropy, s.image))


def _split_item(image: str, label_files: dict[str, str]) -> tuple[str, int]:
    """(case name, slice index) of a pool image name: ``case`` for a 2-D case, ``case#slice`` for a volume slice."""
    if image in label_files:
        return image, 0
    case, _, index = image.rpartition("#")
    if case not in label_files or not index.isdigit():
        raise ValueError(f"image {image!r} has no label file in round.json")
    return case, int(index)


def write_review_csv(output_dir: str) -> str | None:
    """``output_dir/review.csv``: the last scored round's images ranked most uncertain first, with their label file.

    Columns: rank, image, mean_pixel_entropy, refined_in_last_round, label_file (relative to ``output_dir``). A run
    with ``num_rounds=0`` has no uncertainty to rank by (round 0 keeps no per-image score), so no file is written,
    a stale one from an earlier run is removed, and None is returned.
    """
    path = os.path.join(output_dir, REVIEW_FILE)
    scored = _scored_rounds(output_dir)
    if not scored:
        logger.info("no round with uncertainty.csv in %s (num_rounds=0?): no review list", output_dir)
        if os.path.exists(path):
            os.remove(path)
        return None
    last = scored[-1]
    label_files = _round_record(output_dir, last)["label_files"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "image", "mean_pixel_entropy", "refined_in_last_round", "label_file"])
        for rank, item in enumerate(ranked_uncertainty(output_dir, last), start=1):
            case, _ = _split_item(item.image, label_files)
            label_file = f"round_{last}/{label_files[case]}".replace(os.sep, "/")
            writer.writerow([rank, item.image, f"{item.entropy:.6f}", int(item.refined), label_file])
    return path


# ----------------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: str) -> None:
    fig.savefig(path, format="png", dpi=100)


def _uncertainty_histogram(path: str, r: int, items: list[ScoredImage], bins: np.ndarray, threshold) -> None:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    kept = [s.entropy for s in items if not s.refined]
    refined = [s.entropy for s in items if s.refined]
    ax.hist([kept, refined], bins=bins, stacked=True, label=["kept", "refined (KNN)"], color=["#4477aa", "#ee6677"])
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4f}")
    ax.set(title=f"Round {r}: mean pixel entropy per image", xlabel="mean pixel entropy", ylabel="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    _save(fig, path)


def _refined_bars(path: str, rounds: list[int], counts: list[int]) -> None:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar([str(r) for r in rounds], counts, color="#ee6677")
    ax.bar_label(bars)
    ax.margins(y=0.15)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="Pseudo-labels refined by KNN per round", xlabel="round", ylabel="images refined")
    _save(fig, path)


def _dice_lines(path: str, quality: list[dict]) -> None:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    rounds = [q["round"] for q in quality]
    ax.plot(rounds, [q["mean_dice"] for q in quality], marker="o", label="mean Dice")
    ax.plot(rounds, [q["mean_iou"] for q in quality], marker="s", label="mean IoU")
    ax.set(title="Pseudo-labels against ground truth", xlabel="round", ylabel="score", ylim=(0, 1.02))
    ax.set_xticks(rounds)
    ax.legend(fontsize="small")
    _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# thumbnails
# ----------------------------------------------------------------------------------------------------------------------


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _source_paths(config: dict, cases: set[str]) -> dict[str, str]:
    """Case name -> input path for the given cases, by re-listing the run's pool (files are not read).

    Only inputs whose stem can give one of the names (``stem`` or ``stem_<suffix>``) have their name worked out.
    """
    leaves = {case.rsplit("/", 1)[-1] for case in cases}
    try:
        sources = pool_sources(
            config.get("dataset_dir"), config.get("datalist"), _as_list(config.get("reference_image"))
        )
    except ValueError as err:  # the dataset folder or datalist is gone: the report is still worth having
        logger.warning("no thumbnails: %s", err)
        return {}
    found = {}
    for source in sources:
        stem = split_name(source)[0]
        if any(leaf == stem or leaf.startswith(stem + "_") for leaf in leaves):
            name = case_name(source, config.get("dataset_dir"))
            if name in cases:
                found[name] = source
    return found


def overlay(image: np.ndarray, label: np.ndarray, size: int = THUMBNAIL_SIZE) -> Image.Image:
    """Thumbnail of a slice (3, X, Y) in [0, 1] with its label (X, Y): classes tinted, their outline drawn solid.

    Arrays are in MONAI spatial order; the thumbnail is shown like the input file (rows = Y)."""
    rgb = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(2, 1, 0))
    scale = size / max(rgb.size)
    shape = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    pixels = np.asarray(rgb.resize(shape, Image.Resampling.LANCZOS), dtype=np.float32)
    classes = np.asarray(Image.fromarray(label.T.astype(np.int32)).resize(shape, Image.Resampling.NEAREST))
    padded = np.pad(classes, 1, mode="edge")
    edge = (
        (padded[1:-1, 1:-1] != padded[:-2, 1:-1])
        | (padded[1:-1, 1:-1] != padded[2:, 1:-1])
        | (padded[1:-1, 1:-1] != padded[1:-1, :-2])
        | (padded[1:-1, 1:-1] != padded[1:-1, 2:])
    )
    for c in np.unique(classes[classes > 0]):
        colour = CLASS_COLOURS[(int(c) - 1) % len(CLASS_COLOURS)]
        inside = classes == c
        pixels[inside] = (1 - OVERLAY_ALPHA) * pixels[inside] + OVERLAY_ALPHA * colour
        pixels[inside & edge] = colour
    return Image.fromarray(pixels.round().astype(np.uint8))


@dataclass
class Thumbnail:
    """An image of the ranking as the page shows it: its overlay file, or why there is none."""

    item: ScoredImage
    rank: int
    file: str | None  # PNG in the report folder, None when the input could not be read
    note: str = ""


def _thumbnails(output_dir, report_dir, config, r, ranked, num_thumbnails) -> tuple[list[Thumbnail], list[Thumbnail]]:
    """Overlays of the most uncertain and the most certain images of round r (no image in both lists)."""
    n_most = min(num_thumbnails, (len(ranked) + 1) // 2)
    most = list(enumerate(ranked[:n_most], start=1))
    least = list(enumerate(ranked, start=1))[n_most:][::-1][:num_thumbnails]
    label_files = _round_record(output_dir, r)["label_files"]
    items = {item.image: _split_item(item.image, label_files) for _, item in most + least}
    sources = _source_paths(config, {case for case, _ in items.values()})

    def draw(rank: int, item: ScoredImage, prefix: str, index: int) -> Thumbnail:
        case_name, slice_index = items[item.image]
        if case_name not in sources:
            return Thumbnail(item, rank, None, "input image not found in the run's dataset")
        try:
            case, slices = read_case(sources[case_name], config.get("slice_axis", 2), config.get("dataset_dir"))
            label_path = os.path.join(output_dir, f"round_{r}", label_files[case_name])
            label = read_label(label_path, case.spatial_shape, config.get("num_classes", 2))
            label = label_slices(case, label)[slice_index]
        except ValueError as err:
            return Thumbnail(item, rank, None, f"could not read: {err}")
        file = f"{prefix}_{index:02d}.png"
        overlay(slices[slice_index], label).save(os.path.join(report_dir, file))
        return Thumbnail(item, rank, file)

    return (
        [draw(rank, item, "most_uncertain", i) for i, (rank, item) in enumerate(most, start=1)],
        [draw(rank, item, "most_certain", i) for i, (rank, item) in enumerate(least, start=1)],
    )


# ----------------------------------------------------------------------------------------------------------------------
# page
# ----------------------------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; max-width: 200px; overflow-wrap: anywhere; }
.refined { color: #b22; font-weight: bold; }
"""


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _thumbnail_html(t: Thumbnail) -> str:
    name = html.escape(t.item.image)
    caption = f"#{t.rank} {name}<br>entropy {t.item.entropy:.4f}"
    if t.item.refined:
        caption += ' <span class="refined">refined</span>'
    if t.file is None:
        return f"<figure><figcaption>{caption}<br>{html.escape(t.note)}</figcaption></figure>"
    return f'<figure><img src="{html.escape(t.file)}" alt="{name}"><figcaption>{caption}</figcaption></figure>'


def _page(output_dir, config, summary, records, quality, figures, thumbs, last_round, has_review) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>MedSMILE run report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>MedSMILE run report</h1>",
        f"<p>Run folder: <code>{esc(os.path.abspath(output_dir))}</code><br>",
        f"Finished rounds: {esc(', '.join(str(r) for r in records))} (configured: {esc(str(config.get('num_rounds')))})",
    ]
    pool = summary.get("pool", {})
    if pool:
        skipped = len(pool.get("skipped", []))
        parts.append(f"<br>Pool: {pool.get('images')} images from {pool.get('cases')} inputs, {skipped} skipped")
    if summary.get("wall_time_s") is not None:
        parts.append(f"<br>Wall time: {summary['wall_time_s']:.1f} s")
    if config.get("demo_note"):
        parts.append(f"<br>Data: {esc(str(config['demo_note']))}")
    parts.append("</p>")
    if has_review:
        parts.append(f'<p>Review list (most uncertain first): <a href="../{REVIEW_FILE}">{REVIEW_FILE}</a></p>')
    else:
        parts.append("<p>No self-training round finished (num_rounds=0?): no uncertainty, so no review list.</p>")

    header = ["round", "images", "mean uncertainty", "refinement threshold", "refined", "time (s)"]
    if quality is not None:
        header += ["mean Dice", "mean IoU", "images scored"]
    parts.append("<h2>Rounds</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>")
    for r, record in records.items():
        cells = [
            str(r),
            str(record.get("images", "-")),
            _number(record.get("mean_uncertainty")),
            _number(record.get("uncertainty_threshold")),
            str(len(record["refined"])) if "refined" in record else "-",
            _number(record.get("timings_s", {}).get("total"), 1),
        ]
        row = "".join(f"<td>{c}</td>" for c in cells)
        if quality is not None:
            q = quality.get(r, {})
            row += f'<td class="dice" data-round="{r}">{_number(q.get("mean_dice"))}</td>'
            row += f'<td class="iou" data-round="{r}">{_number(q.get("mean_iou"))}</td>'
            row += f"<td>{q.get('num_images', '-')}</td>"
        parts.append(f"<tr>{row}</tr>")
    parts.append("</table>")

    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [f'<figure><img src="{esc(file)}" alt="{esc(title)}"></figure>' for title, file in figures]

    if thumbs is not None:
        most, least = thumbs
        parts.append(f"<h2>Most uncertain images (round {last_round})</h2>")
        parts += [_thumbnail_html(t) for t in most]
        parts.append(f"<h2>Most certain images (round {last_round})</h2>")
        parts += [_thumbnail_html(t) for t in least]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(output_dir: str, ground_truth_dir: str | None = None, num_thumbnails: int = 6) -> str:
    """Write ``output_dir/report/index.html`` with its PNG figures and thumbnails; returns the page's path.

    Also (re)writes ``review.csv`` (see :func:`write_review_csv`), which the page links. With ``ground_truth_dir``
    each round's pseudo-labels are scored by :func:`scripts.metrics.evaluate_rounds` (files paired by name stem;
    it also writes ``output_dir/label_quality.json``). ``num_thumbnails`` overlays are drawn for each end of the
    last round's ranking. The folder is built beside the old one and swapped in, so no stale figure stays.
    """
    rounds = finished_rounds(output_dir)
    if not rounds:
        raise ValueError(f"no finished round (round_<r>/round.json) in {output_dir}")
    config = _read_json(os.path.join(output_dir, "run_config.json"))["config"]
    summary_path = os.path.join(output_dir, "summary.json")
    summary = _read_json(summary_path) if os.path.isfile(summary_path) else {}
    records = {r: _round_record(output_dir, r) for r in rounds}
    has_review = write_review_csv(output_dir) is not None

    final_dir = os.path.join(output_dir, REPORT_DIR)
    with atomic_path(final_dir) as report_dir:  # built beside the old one and swapped in: no stale figure stays
        os.makedirs(report_dir)

        figures: list[tuple[str, str]] = []
        quality = None
        if ground_truth_dir:
            quality = {
                q["round"]: q for q in evaluate_rounds(output_dir, ground_truth_dir, config.get("num_classes", 2))
            }
            _dice_lines(os.path.join(report_dir, "dice_per_round.png"), list(quality.values()))
            figures.append(("Dice and IoU of the pseudo-labels per round", "dice_per_round.png"))
        scored = _scored_rounds(output_dir)
        thumbs, last_round = None, None
        if scored:
            _refined_bars(
                os.path.join(report_dir, "refined_per_round.png"),
                scored,
                [len(records[r].get("refined", [])) for r in scored],
            )
            figures.append(("Images refined per round", "refined_per_round.png"))
            ranked = {r: ranked_uncertainty(output_dir, r) for r in scored}
            bins = np.histogram_bin_edges([s.entropy for items in ranked.values() for s in items], bins=20)
            for r in scored:
                file = f"uncertainty_round_{r}.png"
                _uncertainty_histogram(
                    os.path.join(report_dir, file), r, ranked[r], bins, records[r].get("uncertainty_threshold")
                )
                figures.append((f"Uncertainty histogram, round {r}", file))
            last_round = scored[-1]
            thumbs = _thumbnails(output_dir, report_dir, config, last_round, ranked[last_round], num_thumbnails)

        page = _page(output_dir, config, summary, records, quality, figures, thumbs, last_round, has_review)
        with open(os.path.join(report_dir, "index.html"), "w", encoding="utf-8") as f:
            f.write(page)
    logger.info("report: %s", os.path.join(final_dir, "index.html"))
    return os.path.join(final_dir, "index.html")
