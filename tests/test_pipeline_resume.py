"""A run killed (SIGKILL) in the middle of round 2 and restarted ends with the same pseudo-labels as an
uninterrupted run, without recomputing round 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import BUNDLE_ROOT, TINY_OVERRIDES

TIMEOUT_S = 240


def command(tiny_encoder, data, out):
    args = {
        **TINY_OVERRIDES,
        "num_rounds": 2,
        "epochs": 12,
        "dataset_dir": data["dataset_dir"],
        "reference_image": data["reference_image"],
        "reference_label": data["reference_label"],
        "encoder_weights": tiny_encoder,
        "output_dir": str(out / "run"),
        "model_path": str(out / "models" / "model.pt"),
        "export_torchscript": False,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/medsmile.json"]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def label_bytes(run_dir, r):
    labels = run_dir / f"round_{r}" / "labels"
    return {p.name: p.read_bytes() for p in sorted(labels.iterdir())}


@pytest.mark.slow
def test_sigkill_mid_round_2_then_resume_matches_uninterrupted(tiny_encoder, png_dataset, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(
        command(tiny_encoder, png_dataset, straight), cwd=BUNDLE_ROOT, env=env, check=True, capture_output=True
    )

    killed = tmp_path / "killed"
    run_dir = killed / "run"
    proc = subprocess.Popen(
        command(tiny_encoder, png_dataset, killed), cwd=BUNDLE_ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpt_dir = run_dir / ".checkpoints" / "round_2"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.suffix == ".pt" for p in ckpt_dir.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed in round 2"
    assert (run_dir / "round_1" / "round.json").is_file()
    assert not (run_dir / "round_2").exists(), "an unfinished round must not be visible"
    round1_mtime = os.stat(run_dir / "round_1" / "round.json").st_mtime_ns

    subprocess.run(
        command(tiny_encoder, png_dataset, killed), cwd=BUNDLE_ROOT, env=env, check=True, capture_output=True
    )
    assert os.stat(run_dir / "round_1" / "round.json").st_mtime_ns == round1_mtime, "round 1 was recomputed"
    for r in (0, 1, 2):
        assert label_bytes(run_dir, r) == label_bytes(straight / "run", r), f"round {r} differs after resume"
