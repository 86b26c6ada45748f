"""Reference suggestion: scoring math against hand computations, then the command's files on a tiny pool."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.suggest import (
    PREVIEW_FILE,
    RANKING_COLUMNS,
    SUGGESTIONS_DIR,
    cluster_histograms,
    preview_grid_size,
    rank_order,
    read_ranking,
    representativeness,
    strided_tokens,
    suggest_references,
)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_medoid_of_a_cluster_ranks_first_and_the_outlier_last():
    # three clustered points at 0, +20, -20 degrees and an outlier at 180 degrees
    g = np.array([unit(20), unit(180), unit(0), unit(-20)])
    flat = np.ones((4, 1))  # one cluster: every coverage is 1, only the medoid term varies
    s = representativeness(g, flat, coverage_weight=0.0)
    c20, c40, c160 = (math.cos(math.radians(a)) for a in (20, 40, 160))
    # mean cosine to the other three points
    expected = [(c20 + c40 + c160) / 3, (-1 - 2 * c20) / 3, (2 * c20 - 1) / 3, (c20 + c40 + c160) / 3]
    assert s["medoid_similarity"] == pytest.approx(expected)
    order = rank_order(s["score"])
    assert order[0] == 2 and order[-1] == 1  # the 0-degree point first, the outlier last
    assert list(order) == [2, 0, 3, 1]  # +20 and -20 tie exactly: pool order decides


def test_coverage_is_histogram_intersection_with_the_rest_of_the_pool():
    h = np.array([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    g = np.array([unit(0)] * 3)  # identical globals: the medoid term is the same for all
    s = representativeness(g, h, coverage_weight=1.0)
    # image 0 vs mean of images 1, 2 = (0.75, 0.25): min -> 0.5 + 0.25; image 1 vs (0.5, 0.5): 0.5 + 0; image 2 = image 0
    assert s["patch_coverage"] == pytest.approx([0.75, 0.5, 0.75])
    assert s["medoid_similarity"] == pytest.approx([1.0, 1.0, 1.0])
    assert list(rank_order(s["score"])) == [0, 2, 1]


def test_score_combines_standardised_components():
    g = np.array([unit(0), unit(10), unit(90)])
    h = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    s = representativeness(g, h, coverage_weight=0.25)
    z = lambda x: (x - x.mean()) / x.std()
    expected = 0.75 * z(s["medoid_similarity"]) + 0.25 * z(s["patch_coverage"])
    assert s["score"] == pytest.approx(expected)
    assert representativeness(g[:1], h[:1])["score"].tolist() == [0.0]  # one image: nothing to compare with
    with pytest.raises(ValueError, match="coverage_weight"):
        representativeness(g, h, coverage_weight=1.5)


def test_cluster_histograms_count_each_images_tokens_per_cluster():
    rng = np.random.default_rng(0)
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])

    def around(direction, n):
        x = direction + 0.01 * rng.standard_normal((n, 3))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    tokens = np.stack([around(a, 8), np.concatenate([around(a, 2), around(b, 6)]), around(b, 8)]).astype(np.float16)
    h = cluster_histograms(tokens, num_clusters=2, seed=0)
    assert h.shape == (3, 2) and h.sum(1) == pytest.approx([1, 1, 1])
    cluster_a = int(np.argmax(h[0]))
    assert h[:, cluster_a] == pytest.approx([1.0, 0.25, 0.0])
    assert np.array_equal(h, cluster_histograms(tokens, num_clusters=2, seed=0))
    # a training subsample smaller than the tokens still assigns every token
    assert cluster_histograms(tokens, num_clusters=2, max_cluster_points=6, seed=0).sum(1) == pytest.approx([1] * 3)


def test_strided_tokens_keep_every_other_row_and_column():
    grid = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tok = strided_tokens(grid, 2)
    assert tok.shape == (2, 4, 3)
    assert torch.equal(tok[1, 3], grid[1, :, 2, 2])


def test_command_writes_ranking_and_preview_deterministically(tiny_encoder, png_dataset, tmp_path):
    kwargs = {
        "dataset_dir": png_dataset["dataset_dir"],
        "encoder_weights": tiny_encoder,
        "feature_image_size": 56,
        "num_suggestions": 4,
        "num_clusters": 3,
        "preview_tile_size": 32,
    }
    path = suggest_references(output_dir=str(tmp_path / "a"), **kwargs)
    assert path == str(tmp_path / "a" / SUGGESTIONS_DIR / "ranking.csv")
    with open(path) as f:
        assert f.readline().strip() == ",".join(RANKING_COLUMNS)
    rows = read_ranking(path)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert sorted(r["image"] for r in rows) == sorted(png_dataset["sizes"])
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert all(os.path.isfile(r["source"]) and 0 <= r["patch_coverage"] <= 1 for r in rows)
    assert abs(sum(r["score"] for r in rows)) < 1e-4  # sum of standardised components is zero

    preview = Image.open(tmp_path / "a" / SUGGESTIONS_DIR / PREVIEW_FILE)
    assert preview.size == preview_grid_size(4, 32) == (4 * 32, 32 + 16)
    assert np.asarray(preview.convert("L")).std() > 0  # thumbnails, not a blank canvas

    again = read_ranking(suggest_references(output_dir=str(tmp_path / "b"), **kwargs))
    assert again == rows  # same scores, same order, same files


def test_demo_pool_is_ranked_when_no_dataset_is_given(tiny_encoder, tmp_path):
    path = suggest_references(
        output_dir=str(tmp_path), encoder_weights=tiny_encoder, feature_image_size=56, demo_images=5, num_clusters=2
    )
    rows = read_ranking(path)
    assert len(rows) == 5 and all(r["image"].startswith("demo_") for r in rows)
    assert os.path.isdir(tmp_path / "demo_data" / "images")  # the folder the pipeline's demo run would use
    advice = json.loads((tmp_path / "suggestions" / "summary.json").read_text())["advice"]
    assert "2%" in advice and "K-shot" in advice  # the measured reference size below which round 0 collapses


def test_empty_or_missing_dataset_names_the_folder(tiny_encoder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no images found in {empty}"):
        suggest_references(dataset_dir=str(empty), output_dir=str(tmp_path / "out"), encoder_weights=tiny_encoder)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=str(missing)):
        suggest_references(dataset_dir=str(missing), output_dir=str(tmp_path / "out"), encoder_weights=tiny_encoder)
    assert not (tmp_path / "out" / SUGGESTIONS_DIR).exists()


def test_round0_benchmark_runs_on_a_generated_data_root(tiny_encoder, tmp_path):
    from conftest import blob_image

    from benchmarks import suggest_round0

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "data" / "busi" / sub).mkdir(parents=True)
    stems = [f"case{i}" for i in range(7)]
    for k, stem in enumerate(stems):
        image, mask = blob_image(rng, 40, 48)
        mask = mask * 0 if k == 0 else mask  # a "normal" image: empty mask, never a reference
        Image.fromarray(image).save(tmp_path / "data" / "busi" / "images" / f"{stem}.png")
        Image.fromarray(mask * 255).save(tmp_path / "data" / "busi" / "masks" / f"{stem}.png")
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"busi": {"train": stems, "test": []}}))
    results = suggest_round0.main(
        [
            "--datasets", "busi", "--pool_size", "0", "--feature_size", "56", "--num_clusters", "2",
            "--random_refs", "3", "--encoder_weights", tiny_encoder, "--threads", "1",
            "--data_root", str(tmp_path / "data"), "--results_dir", str(tmp_path / "results"),
        ]
    )  # fmt: skip
    r = results["busi"]
    assert r["pool"] == 7 and r["candidates"] == 6 and "case0" not in r["per_reference_dice"]
    assert r["fast_dice_max_abs_deviation"] < 2e-3
    dice = np.array(list(r["per_reference_dice"].values()))
    assert r["all_references"]["mean"] == pytest.approx(dice.mean())
    top = r["suggestions"]["suggest"]["picks"][0]
    assert r["per_reference_dice"][top["image"]] == pytest.approx(top["dice"])
    assert 0 <= r["suggestions"]["suggest"]["percentile"] <= 100
    table = (tmp_path / "results" / "suggest_round0.md").read_text()
    assert "| busi | 7 / 6 |" in table and "Command: `" in table


def test_bf16_suggestion_scores_stay_close_to_float32_and_are_recorded(tiny_encoder, png_dataset, tmp_path):
    from scripts.network import bf16_supported

    kwargs = {"dataset_dir": png_dataset["dataset_dir"], "encoder_weights": tiny_encoder, "feature_image_size": 56}
    kwargs.update(num_suggestions=2, num_clusters=3, preview_tile_size=16)
    rankings = {}
    for bf16 in (False, True):
        path = suggest_references(output_dir=str(tmp_path / str(bf16)), backbone_bf16=bf16, **kwargs)
        rankings[bf16] = {r["image"]: r["score"] for r in read_ranking(path)}
        with open(tmp_path / str(bf16) / SUGGESTIONS_DIR / "summary.json") as f:
            active = json.load(f)["settings"]["backbone_bf16_active"]
        assert active == (bf16 and bf16_supported("cpu"))
    assert rankings[True].keys() == rankings[False].keys()
    assert max(abs(rankings[True][k] - rankings[False][k]) for k in rankings[True]) < 0.1
