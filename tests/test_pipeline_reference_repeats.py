"""``reference_repeats``: the references enter every round's training set that many times; bad values are refused."""

import json

import pytest
from conftest import TINY_OVERRIDES


@pytest.mark.slow
def test_round_trains_on_the_pool_plus_repeated_references(tiny_encoder, png_dataset, tmp_path):
    from scripts.pipeline import MedSMILEPipeline

    args = {**TINY_OVERRIDES, "num_rounds": 1, "reference_repeats": 3, "export_torchscript": False}
    args["round_training"] = "pseudo_labels"  # repeats are items of the paper's round (consistency: every batch)
    MedSMILEPipeline(
        output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "model.pt"), encoder_weights=tiny_encoder,
        **png_dataset["inputs"], **args,
    ).run()  # fmt: skip
    record = json.loads((tmp_path / "run" / "round_1" / "round.json").read_text())
    assert record["trained_on"] == record["images"] + 3  # one reference, three times


@pytest.mark.parametrize("value", [0, 2.5, True])
def test_reference_repeats_must_be_a_whole_number_of_at_least_one(value, tmp_path):
    from scripts.pipeline import MedSMILEPipeline

    with pytest.raises(ValueError, match=f"reference_repeats={value!r} must be a whole number >= 1"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path=str(tmp_path / "m.pt"), reference_repeats=value)
