"""The paper benchmark's code path on a generated stand-in for ../shared/data (the smoke profile, tiny encoder)."""

from __future__ import annotations

import json
import os

import numpy as np
from conftest import blob_image
from PIL import Image

from benchmarks import paper


def fake_data_root(root, n_train=6, n_test=2):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / "busi" / sub).mkdir(parents=True)
    stems = [f"case{i}" for i in range(n_train + n_test)]
    for stem in stems:
        image, mask = blob_image(rng, 40, 48)
        Image.fromarray(image).save(root / "busi" / "images" / f"{stem}.png")
        Image.fromarray(mask * 255).save(root / "busi" / "masks" / f"{stem}.png")
    (root / "splits.json").write_text(json.dumps({"busi": {"train": stems[:n_train], "test": stems[n_train:]}}))
    return root


def test_benchmark_smoke_profile_writes_its_table(tiny_encoder, tmp_path):
    data_root = fake_data_root(tmp_path / "data")
    results = tmp_path / "results"
    paper.main(
        [
            "--profile", "smoke", "--dataset", "busi", "--seeds", "0",
            "--data_root", str(data_root), "--results_dir", str(results),
            "--set", f'encoder_weights="{tiny_encoder}"',
        ]
    )  # fmt: skip
    out = results / f"smoke_encoder_weights-{os.path.basename(tiny_encoder)}"
    res = json.loads((out / "busi.json").read_text())
    run = res["runs"][0]
    assert len(run["medsmile"]["pool_dice"]) == 2 and len(run["no_knn"]["pool_dice"]) == 2  # rounds 0 and 1
    assert all(0.0 <= d <= 1.0 for d in run["medsmile"]["pool_dice"])
    assert set(run["medsmile"]["test"][0]) == {"busi"}
    assert 0.0 <= res["supervised"]["test"]["busi"]["dice"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| medsmile pool pseudo-label Dice | pool |" in table and "fully supervised" in table
