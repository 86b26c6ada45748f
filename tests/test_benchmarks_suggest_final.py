"""The paired suggested-vs-random table pairs runs by seed and averages the splits and seeds by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import suggest_final


def result(seed_scores: dict, reference: str) -> dict:
    runs = []
    for seed, (r0, final, pool) in seed_scores.items():
        runs.append(
            {
                "seed": seed,
                "reference": f"{reference}{seed}",
                "round0_test": {"a": {"dice": r0[0]}, "b": {"dice": r0[1]}},
                "medsmile": {"test": [{"a": {"dice": 0.0}, "b": {"dice": 0.0}}, {"a": {"dice": final[0]}, "b": {"dice": final[1]}}], "pool_dice": pool},
            }
        )  # fmt: skip
    return {"test_subsets": ["a", "b"], "runs": runs}


def test_pairs_by_seed_and_means_over_splits_and_seeds(tmp_path):
    random = result({0: ((0.2, 0.4), (0.5, 0.7), [0.3, 0.6]), 1: ((0.1, 0.1), (0.3, 0.1), [0.2, 0.4]), 2: ((0.9, 0.9), (0.9, 0.9), [0.9, 0.9])}, "r")  # fmt: skip
    suggested = result({0: ((0.6, 0.8), (0.8, 1.0), [0.5, 0.7]), 1: ((0.3, 0.5), (0.4, 0.6), [0.4, 0.5])}, "s")  # fmt: skip
    for name, res in (("cpu-quick", random), ("cpu-quick_suggested", suggested)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "busi.json").write_text(json.dumps(res))
    suggest_final.main(["--datasets", "busi", "--results_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu-quick_suggested" / "paired.json").read_text())["busi"]
    assert [row["seed"] for row in rows] == [0, 1]  # seed 2 has no suggested run
    assert rows[0]["random"]["round0_test"] == pytest.approx(0.3) and rows[0]["suggested"][
        "final_test"
    ] == pytest.approx(0.9)
    assert rows[1]["random"]["final_pool"] == 0.4 and rows[1]["suggested"]["reference"] == "s1"
    table = (tmp_path / "cpu-quick_suggested" / "paired.md").read_text()
    # random means over seeds 0 and 1: round-0 pool (0.3 + 0.2) / 2, final test ((0.6) + (0.2)) / 2
    assert "| busi | mean of 2 | **random** | 0.250 | 0.500 | 0.200 | 0.400 |" in table
    assert "| busi | mean of 2 | **suggested** | 0.450 | 0.600 | 0.550 | 0.700 |" in table
