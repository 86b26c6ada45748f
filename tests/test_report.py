"""review.csv and the HTML report on a hand-built run folder: ranking, Dice, figures, escaping, headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run as bundle_run
from PIL import Image

from benchmarks.report_browser_check import check_report, find_chromium
from scripts import report
from scripts.image_io import list_inputs, read_case, write_label

ODD_NAME = "a&b<c>"  # a legal file name that must be escaped in HTML
# MONAI spatial shape (X, Y) of each 2-D case; "vol" is a (12, 10, 2) NIfTI volume cut into 2 slices
SHAPES = {ODD_NAME: (20, 16), "img_1": (18, 12), "img_2": (16, 16)}
VOLUME_SHAPE = (12, 10, 2)
# mean pixel entropy and refined flag per pool image, rounds 1 and 2 (written in reverse pool order, so that the
# ranking cannot lean on the row order)
UNCERTAINTY = {
    1: {ODD_NAME: (0.30, 0), "img_1": (0.10, 0), "img_2": (0.20, 0), "vol#0": (0.05, 0), "vol#1": (0.40, 1)},
    2: {ODD_NAME: (0.25, 0), "img_1": (0.25, 0), "img_2": (0.05, 0), "vol#0": (0.60, 1), "vol#1": (0.01, 0)},
}
# round 2 sorted by hand: entropy descending, the 0.25 tie by name
RANKED_ROUND_2 = ["vol#0", ODD_NAME, "img_1", "img_2", "vol#1"]


def box(shape, x0, x1, y0, y1) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[x0:x1, y0:y1] = 1
    return label


def truth_slices(case_name: str) -> list[np.ndarray]:
    if case_name == ODD_NAME:
        return [box(SHAPES[ODD_NAME], 2, 12, 2, 10)]
    if case_name == "img_1":
        return [box(SHAPES["img_1"], 0, 9, 0, 6)]
    if case_name == "img_2":
        return [np.zeros(SHAPES["img_2"], np.uint8)]
    return [box(VOLUME_SHAPE[:2], 2, 8, 2, 6), np.zeros(VOLUME_SHAPE[:2], np.uint8)]


def pseudo_label_slices(case_name: str, r: int) -> list[np.ndarray]:
    """Round r's labels: boxes that drift with r, and a false positive on the empty img_2 in round 1."""
    if case_name == ODD_NAME:
        return [box(SHAPES[ODD_NAME], 2 + r, 12, 2, 10 - r)]
    if case_name == "img_1":
        return [box(SHAPES["img_1"], 0, 9 + r, 0, 6)]
    if case_name == "img_2":
        return [box(SHAPES["img_2"], 4, 8, 4, 8) if r == 1 else np.zeros(SHAPES["img_2"], np.uint8)]
    return [box(VOLUME_SHAPE[:2], 2, 8 - r, 2, 6), np.zeros(VOLUME_SHAPE[:2], np.uint8)]


def hand_scores(r: int) -> tuple[float, float]:
    """Mean Dice and IoU over the 4 label files of round r (a volume is one file); empty vs empty scores 1."""
    dice, iou = [], []
    for name in [ODD_NAME, "img_1", "img_2", "vol"]:
        p = np.stack(pseudo_label_slices(name, r)).astype(bool)
        t = np.stack(truth_slices(name)).astype(bool)
        inter, total, union = (p & t).sum(), p.sum() + t.sum(), (p | t).sum()
        dice.append(1.0 if total == 0 else 2 * inter / total)
        iou.append(1.0 if union == 0 else inter / union)
    return float(np.mean(dice)), float(np.mean(iou))


def write_run(root, num_rounds: int = 2) -> dict:
    """A finished run folder as the pipeline leaves it, built with the bundle's own readers and writers."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for name, (x, y) in SHAPES.items():
        Image.fromarray(rng.integers(0, 255, (y, x, 3), dtype=np.uint8)).save(images / f"{name}.png")
    nib.save(nib.Nifti1Image(rng.normal(size=VOLUME_SHAPE).astype(np.float32), np.eye(4)), images / "vol.nii.gz")
    (root / "reference").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "reference" / "ref.png")
    out, truth = root / "run", root / "truth"
    cases = [read_case(source, 2, str(images))[0] for source in list_inputs(str(images))]
    for case in cases:
        write_label(case, truth_slices(case.name), truth)
    config = {
        "dataset_dir": str(images),
        "datalist": None,
        "reference_image": str(root / "reference" / "ref.png"),
        "num_classes": 2,
        "slice_axis": 2,
        "num_rounds": num_rounds,
    }
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"fingerprint": "0", "config": config}))
    (out / "summary.json").write_text(json.dumps({"pool": {"cases": 4, "images": 5, "skipped": []}, "wall_time_s": 9}))
    for r in range(num_rounds + 1):
        folder = out / f"round_{r}"
        files = {}
        for case in cases:
            path = write_label(case, pseudo_label_slices(case.name, r), folder / "labels")
            files[case.name] = os.path.relpath(path, folder)
        record = {"round": r, "images": 5, "timings_s": {"total": 1.5}, "label_files": files}
        if r >= 1:
            scores = UNCERTAINTY[r]
            record.update(
                mean_uncertainty=float(np.mean([e for e, _ in scores.values()])),
                uncertainty_threshold=0.3,
                refined=[name for name, (_, refined) in scores.items() if refined],
            )
            with open(folder / "uncertainty.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "mean_pixel_entropy", "refined"])
                writer.writerows([name, f"{e:.6f}", refined] for name, (e, refined) in reversed(scores.items()))
        (folder / "round.json").write_text(json.dumps(record))
    return {"output_dir": str(out), "truth": str(truth), "images": images}


@pytest.fixture
def run_folder(tmp_path) -> dict:
    return write_run(tmp_path)


class Links(HTMLParser):
    """Every src/href of a page, and the img sources apart."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href"):
                self.links.append(value)
                if tag == "img":
                    self.images.append(value)


def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8")


def parse_links(page: str) -> Links:
    links = Links()
    links.feed(page)
    return links


def test_review_csv_ranks_the_last_round_most_uncertain_first(run_folder):
    out = run_folder["output_dir"]
    path = report.write_review_csv(out)
    assert path == os.path.join(out, "review.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == RANKED_ROUND_2
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert [float(row["mean_pixel_entropy"]) for row in rows] == [UNCERTAINTY[2][n][0] for n in RANKED_ROUND_2]
    assert [row["refined_in_last_round"] for row in rows] == ["1", "0", "0", "0", "0"]
    labels = {row["image"]: row["label_file"] for row in rows}
    assert labels["vol#0"] == labels["vol#1"] == "round_2/labels/vol.nii.gz"  # a slice points to its volume's file
    assert labels[ODD_NAME] == f"round_2/labels/{ODD_NAME}.png"
    assert all(os.path.isfile(os.path.join(out, file)) for file in labels.values())


def test_report_figures_dice_thumbnails_and_escaping(run_folder, monkeypatch):
    out = run_folder["output_dir"]
    os.makedirs(os.path.join(out, "report"))
    with open(os.path.join(out, "report", "stale_round_9.png"), "wb") as f:
        f.write(b"left from an earlier run")
    reads = Counter()
    real_read_case = report.read_case

    def counting_read_case(source, *args, **kwargs):
        reads[os.path.basename(source)] += 1
        return real_read_case(source, *args, **kwargs)

    monkeypatch.setattr(report, "read_case", counting_read_case)
    index = report.write_report(out, run_folder["truth"], num_thumbnails=2)

    assert index == os.path.join(out, "report", "index.html")
    page = read_text(index)
    links = parse_links(page)
    # every link is relative and stays in the run folder: nothing is fetched from elsewhere
    assert all("://" not in link and not link.startswith(("/", "//")) for link in links.links)
    assert "../review.csv" in links.links and os.path.isfile(os.path.join(out, "review.csv"))
    # every listed image is a readable PNG in the report folder, and every PNG there is listed (the stale one is gone)
    report_dir = os.path.dirname(index)
    assert sorted(links.images) == sorted(f for f in os.listdir(report_dir) if f.endswith(".png"))
    for file in links.images:
        with Image.open(os.path.join(report_dir, file)) as image:
            assert image.format == "PNG"
            image.load()
    expected_figures = {
        "dice_per_round.png",
        "refined_per_round.png",
        "uncertainty_round_1.png",
        "uncertainty_round_2.png",
    }
    assert expected_figures <= set(links.images)

    # Dice and IoU per round, as printed, equal the hand computation
    printed_dice = {int(r): v for r, v in re.findall(r'<td class="dice" data-round="(\d+)">([\d.]+)</td>', page)}
    printed_iou = {int(r): v for r, v in re.findall(r'<td class="iou" data-round="(\d+)">([\d.]+)</td>', page)}
    assert set(printed_dice) == set(printed_iou) == {0, 1, 2}
    for r in range(3):
        dice, iou = hand_scores(r)
        assert printed_dice[r] == f"{dice:.4f}" and printed_iou[r] == f"{iou:.4f}"
    assert len({printed_dice[r] for r in range(3)}) == 3  # the rounds really differ

    # names are escaped wherever they appear
    assert ODD_NAME not in page
    assert f"#2 {'a&amp;b&lt;c&gt;'}<br>" in page and 'alt="a&amp;b&lt;c&gt;"' in page

    # thumbnails: 2 most uncertain (ranks 1, 2) then 2 most certain (ranks 5, 4); only their inputs were read
    captions = re.findall(r"<figcaption>#(\d+) ([^<]*)<br>", page)
    assert captions == [("1", "vol#0"), ("2", "a&amp;b&lt;c&gt;"), ("5", "vol#1"), ("4", "img_2")]
    assert reads == Counter({"vol.nii.gz": 2, f"{ODD_NAME}.png": 1, "img_2.png": 1})
    # shown like the input file: width = X, height = Y, longest side THUMBNAIL_SIZE
    with Image.open(os.path.join(report_dir, "most_uncertain_01.png")) as thumb:
        assert thumb.size == (192, 160)  # vol slice (X, Y) = (12, 10)
    with Image.open(os.path.join(report_dir, "most_uncertain_02.png")) as thumb:
        assert thumb.size == (192, round(192 * 16 / 20))


def test_overlay_tints_the_label_and_outlines_it():
    image = np.full((3, 8, 4), 0.5, dtype=np.float32)  # (3, X, Y): 8 wide, 4 high
    label = np.zeros((8, 4), dtype=np.int64)
    label[0:4, 0:2] = 1  # x 0..3, y 0..1: the top-left 4 x 2 pixels of the shown image
    pixels = np.asarray(report.overlay(image, label, size=8))
    assert pixels.shape == (4, 8, 3)
    yellow = report.CLASS_COLOURS[0]
    tint = np.round(0.6 * 128 + 0.4 * yellow).astype(np.uint8)
    for row, col in [(0, 0), (0, 1), (0, 2)]:  # inside, all neighbours class 1
        assert pixels[row, col].tolist() == tint.tolist()
    for row, col in [(1, 0), (1, 3), (0, 3)]:  # on the border of the region
        assert pixels[row, col].tolist() == yellow.astype(np.uint8).tolist()
    assert pixels[3, 7].tolist() == [128, 128, 128]  # background untouched


def test_run_without_self_training_rounds(tmp_path):
    """num_rounds=0: no uncertainty, so no review list (a stale one is removed) and no thumbnails; Dice still."""
    out = write_run(tmp_path, num_rounds=0)["output_dir"]
    stale = os.path.join(out, "review.csv")
    Path(stale).write_text("rank,image\n")
    assert report.write_review_csv(out) is None
    assert not os.path.exists(stale)
    index = report.write_report(out, str(tmp_path / "truth"))
    page = read_text(index)
    assert "no review list" in page and "review.csv" not in parse_links(page).links
    assert parse_links(page).images == ["dice_per_round.png"]
    assert re.findall(r'<td class="dice" data-round="0">([\d.]+)</td>', page) == [f"{hand_scores(0)[0]:.4f}"]


def test_missing_input_image_is_reported_not_fatal(run_folder):
    os.remove(run_folder["images"] / "img_2.png")  # the dataset changed after the run
    page = read_text(report.write_report(run_folder["output_dir"], num_thumbnails=2))
    assert "#4 img_2<br>entropy 0.0500<br>input image not found in the run&#x27;s dataset" in page
    assert "dice_per_round.png" not in page  # no ground truth given
    shutil.rmtree(run_folder["images"])  # the whole dataset is gone
    page = read_text(report.write_report(run_folder["output_dir"], num_thumbnails=2))
    assert page.count("input image not found") == 4 and "uncertainty_round_2.png" in page


@pytest.mark.slow
def test_bundle_config_expression_writes_the_report(run_folder, tmp_path):
    """The key the bundle config gets: ``python -m monai.bundle run report --config_file ...``."""
    config = {
        "imports": ["$import scripts", "$import scripts.report"],
        "output_dir": "unset",
        "ground_truth_dir": None,
        "report": "$scripts.report.write_report(@output_dir, @ground_truth_dir)",
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    out = run_folder["output_dir"]
    bundle_run("report", config_file=str(config_file), output_dir=out, ground_truth_dir=run_folder["truth"])
    assert "dice_per_round.png" in parse_links(read_text(os.path.join(out, "report", "index.html"))).images


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_report_loads_in_headless_chromium(run_folder):
    index = report.write_report(run_folder["output_dir"], run_folder["truth"], num_thumbnails=2)
    result = check_report(index)
    assert result["problems"] == []
    assert result["pass"]
    shown = [image["src"] for image in result["images"]]
    assert shown == parse_links(read_text(index)).images and len(shown) == 8
    assert all(image["width"] > 0 and image["height"] > 0 for image in result["images"])
