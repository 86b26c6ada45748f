"""The rounds' training transforms as configuration (medsmile.json's train_transforms and
consistency_strong_transforms): the default lists reproduce the runs of before byte for byte."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import run_medsmile

# sha256 of a tiny one-round run's round-1 label files and of its model's tensors, recorded with the code before the
# training transforms became configuration (the 'augmentation' string picked them in Python): the default lists and
# the 'strong' preset must keep the same random draws, so the same labels and weights.
PINNED = {
    "consistency": (
        "5adc0f4d8b2361e33282e3a2d8779cf1afa8d9c4750776f7fa7f9c06a99ee0cf",
        "c8f730cdddb1ebb0cd8434060bf19fff8fd8b6e5bc45765dec200dd571430781",
    ),
    "pseudo_labels": (
        "ea490970ed654f75cba73397e1da97cd9dc831a16a096c01bd23847106263d4a",
        "cca7668f093fb7fc1bb3d0d005dd6c38993f2153bcae02159bb10f9e68951b3b",
    ),
    "strong": (
        "073664f597b89dccb8e49ec9a8fcb3460719cd1923b334b539971051eee11334",
        "5f6efd420164ed67c8acc4dbf5e7eb00cdfca743d34133458c91c0f3c8b97389",
    ),
}


def _digests(out) -> tuple[str, str]:
    labels = hashlib.sha256()  # the label files and each image's mean pixel entropy (uncertainty.csv, as repr)
    for path in [*sorted((out / "run" / "round_1" / "labels").iterdir()), out / "run" / "round_1" / "uncertainty.csv"]:
        labels.update(path.name.encode() + path.read_bytes())
    weights = hashlib.sha256()
    for name, tensor in sorted(torch.load(out / "models" / "model.pt", weights_only=True).items()):
        weights.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return labels.hexdigest(), weights.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(PINNED))
def test_default_lists_give_the_labels_and_model_of_before(tiny_encoder, png_dataset, tmp_path, mode):
    options = {"round_training": "consistency"}
    if mode != "consistency":
        options = {"round_training": "pseudo_labels", "augmentation": "strong" if mode == "strong" else "flips"}
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=1, export_torchscript=False, **options)
    assert _digests(tmp_path) == PINNED[mode]
