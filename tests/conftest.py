"""Shared fixtures: a tiny random-init DINOv2 encoder and tiny generated datasets (no real data, no hub)."""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import run

from benchmarks.tiny_bundle import TINY_OVERRIDES, blob_image, make_tiny_encoder, write_blob_dataset  # noqa: F401 (re-exported)

BUNDLE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
CONFIGS = os.path.join(BUNDLE_ROOT, "configs")


def chain(exc: BaseException) -> str:
    """Messages of an exception and its causes (monai.bundle.run wraps errors raised inside config expressions)."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def run_medsmile(tiny_encoder: str, out, **overrides) -> dict:
    """`monai.bundle run` of medsmile.json with the tiny encoder and sizes; output in out/run, model in out/models."""
    args = {
        "output_dir": str(out / "run"),
        "model_path": str(out / "models" / "model.pt"),
        "encoder_weights": tiny_encoder,
        **TINY_OVERRIDES,
        **overrides,
    }
    run(config_file=os.path.join(CONFIGS, "medsmile.json"), bundle_root=BUNDLE_ROOT, **args)
    return args


def augmentation_preset(name: str) -> list:
    """medsmile.json's train_transforms under ``--augmentation name`` (its augmentation_presets entry)."""
    from scripts.pipeline import default_parts

    return default_parts({"augmentation": name}, keys=("train_transforms",))["train_transforms"]


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A random-init DINOv2 (hidden 32, 2 layers) saved as a Hugging Face folder."""
    return make_tiny_encoder(str(tmp_path_factory.mktemp("tiny_dinov2")))


@pytest.fixture
def png_dataset(tmp_path) -> dict:
    """6 unlabelled PNGs of different sizes + a reference image and 0/255 mask, in separate folders."""
    sizes = [(40, 60), (50, 50), (64, 48), (30, 70), (56, 56), (45, 52)]
    inputs = write_blob_dataset(str(tmp_path), sizes)
    return {
        **inputs,
        "inputs": inputs,  # the pipeline arguments, to pass as **png_dataset["inputs"]
        "sizes": {f"img_{i}": s for i, s in enumerate(sizes)},
        "root": tmp_path,
    }


def fit_steps(net, loss_fn, x, label, steps: int, lr: float = 1e-3) -> list[float]:
    """``steps`` AdamW steps of ``net`` on one batch with the set loss; the loss of each step."""
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(net(x, with_queries=True), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
