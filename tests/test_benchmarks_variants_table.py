"""The variants table names each variant's options by config difference and averages seeds it shares with the
first variant, checked by hand."""

from __future__ import annotations

import json
import shlex

import pytest

from benchmarks import variants_table


def result(config: dict, seed_scores: dict) -> dict:
    runs = []
    for seed, (r0, final, pool) in seed_scores.items():
        test = [{"a": {"dice": 0.0}, "b": {"dice": 0.0}}] * (len(pool) - 2) + [{"a": {"dice": final[0]}, "b": {"dice": final[1]}}]  # fmt: skip
        runs.append({"seed": seed, "round0_test": {"a": {"dice": r0[0]}, "b": {"dice": r0[1]}}, "medsmile": {"test": test, "pool_dice": pool}})  # fmt: skip
    return {"test_subsets": ["a", "b"], "runs": runs, "config": config, "timing": {"train_s": 100.0}}


def test_rows_average_shared_seeds_and_name_changed_options(tmp_path):
    base = result({"num_rounds": 1, "seed": 0, "loss": "mask2former"}, {0: ((0.2, 0.4), (0.5, 0.7), [0.3, 0.6]), 1: ((0.1, 0.1), (0.3, 0.1), [0.2, 0.4])})  # fmt: skip
    more = result({"num_rounds": 2, "seed": 5, "loss": "mask2former"}, {1: ((0.1, 0.1), (0.5, 0.3), [0.2, 0.3, 0.5]), 7: ((0.0, 0.0), (0.0, 0.0), [0.0, 0.0, 0.0])})  # fmt: skip
    for name, res in (("base", base), ("more", more)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "polyp.json").write_text(json.dumps(res))
    out = tmp_path / "out"
    variants_table.main(["--dataset", "polyp", "--variant", f"defaults={tmp_path / 'base'}", "--variant", f"paper's two rounds={tmp_path / 'more'}", "--out", str(out)])  # fmt: skip
    recorded = json.loads((out / "polyp.json").read_text())["command"]
    assert shlex.split(recorded)[-2:] == ["--variant", f"paper's two rounds={tmp_path / 'more'}"]  # pastes into a shell
    rows = json.loads((out / "polyp.json").read_text())["rows"]
    assert rows[0]["options"] == "-" and rows[1]["options"] == "num_rounds=2"  # the seed key is not an option
    assert rows[0]["seeds"] == [0, 1] and rows[1]["seeds"] == [1]  # seed 7 has no baseline to compare with
    assert rows[0]["final_test"] == pytest.approx([0.6, 0.2]) and rows[0]["round0_test"] == pytest.approx([0.3, 0.1])
    assert rows[1]["pool"] == [[0.2], [0.3], [0.5]]
    assert rows[1]["delta_vs_first"] == pytest.approx([0.4 - 0.2])  # seed 1: (0.5 + 0.3) / 2 vs (0.3 + 0.1) / 2
    table = (out / "polyp.md").read_text()
    assert "| defaults | - | 0 1 | 0.250 ± 0.050 | 0.500 ± 0.100 |  | 0.200 ± 0.100 | 0.400 ± 0.200 | +0.000 |" in table
    assert "| paper's two rounds | num_rounds=2 | 1 | 0.200 | 0.300 | 0.500 | 0.100 | 0.400 | +0.200 | 100 |" in table


def test_a_missing_result_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmarks.paper result for busi"):
        variants_table.load_variant(str(tmp_path), "busi")


def test_variant_options_count_a_run_that_predates_an_option_at_its_old_value():
    from benchmarks.variants_table import changed_options

    base = {"epochs": 3, "head_learning_rate": 5e-4, "reference_repeats": 1, "augmentation": "flips"}
    # recorded before reference_repeats / augmentation / head_learning_rate existed: only the head rate differs
    assert changed_options({"epochs": 3}, base) == "head_learning_rate=null"
    assert changed_options({**base, "augmentation": "strong"}, {"epochs": 3, "head_learning_rate": 5e-4}) == (
        'augmentation="strong"'
    )
    assert changed_options(dict(base), base) == "-"
    # a training part one run predates (it trained with the default) is not a change; swapped in both, it is
    parts = {**base, "optimizer": {"_target_": "torch.optim.AdamW"}}
    assert changed_options(parts, base) == "-"
    assert changed_options(parts, {**base, "optimizer": {"_target_": "torch.optim.SGD"}}) == (
        'optimizer={"_target_": "torch.optim.AdamW"}'
    )
