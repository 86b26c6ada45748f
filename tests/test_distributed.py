"""A 2-process torchrun (gloo on CPU) of the tiny pipeline with configs/multi_gpu.json, against the 1-process run.

Round 0 must be identical: each image's features do not depend on which rank computes them. Rounds >= 1 may
differ, and by how much is bounded here: DDP draws the training batches with a DistributedSampler and each rank its
own flips, so a round sees the same images per epoch and as many optimizer steps of the same global batch, but in
another order, like a run with another seed (measured on a longer run in benchmarks/results_distributed.md).
Rank 0 alone may write: an audit hook (sys.addaudithook, installed in each worker through sitecustomize) records
every file-system write under the run's folders, per rank.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_OVERRIDES, run_medsmile
from PIL import Image

TIMEOUT_S = 180

AUDIT = '''
import os, sys
_root, _log = os.environ["AUDIT_ROOT"], os.path.join(os.environ["AUDIT_LOG_DIR"], f"rank{os.environ.get('RANK')}.log")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree", "shutil.copyfile",
           "os.symlink", "os.link", "os.chmod", "os.utime"}
_busy, _patched = [], []

def _record(event, paths):
    paths = [os.path.abspath(os.fsdecode(p)) for p in paths]
    if any(p.startswith(_root) for p in paths):
        _busy.append(1)
        try:
            with open(_log, "a") as f:
                f.write(f"{event} {' '.join(paths)}\\n")
        finally:
            _busy.pop()

def _patch_torch_save():
    """torch.save(obj, path) writes through C++ (no audit event): wrap it once torch is imported."""
    serialization = sys.modules.get("torch.serialization")
    torch = sys.modules.get("torch")
    if _patched or serialization is None or torch is None or not hasattr(torch, "save"):
        return
    _patched.append(1)
    original = serialization.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, bytes, os.PathLike)):
            _record("torch.save", [f])
        return original(obj, f, *args, **kwargs)

    serialization.save = torch.save = save

def _hook(event, args):
    if _busy:
        return
    _patch_torch_save()
    if not (event == "open" or event in _EVENTS):
        return
    if event == "open":
        path, mode, flags = args
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE):
            return
        paths = [path] if isinstance(path, (str, bytes, os.PathLike)) else []
    else:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
    _record(event, paths)

if "RANK" in os.environ:
    sys.addaudithook(_hook)
'''


def medsmile_args(tiny_encoder: str, out, overrides: dict) -> dict:
    """The tiny pipeline's arguments writing under ``out``, as run_medsmile passes them in-process."""
    return {
        **TINY_OVERRIDES,
        **overrides,
        "encoder_weights": tiny_encoder,
        "output_dir": str(out / "run"),
        "model_path": str(out / "models" / "model.pt"),
    }


def torchrun(args: dict, nproc: int, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", "['configs/medsmile.json','configs/multi_gpu.json']"]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    return subprocess.run(cmd, check=False, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def label(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def uncertainties(run_dir, r) -> dict[str, float]:
    with open(run_dir / f"round_{r}" / "uncertainty.csv") as f:
        return {row["image"]: float(row["mean_pixel_entropy"]) for row in csv.DictReader(f)}


@pytest.mark.slow
def test_two_processes_match_one_and_only_rank_0_writes(tiny_encoder, png_dataset, tmp_path):
    common = {**png_dataset["inputs"], "export_torchscript": False}
    one = tmp_path / "one"
    run_medsmile(tiny_encoder, one, **common)

    two = tmp_path / "two"
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")]),
        "AUDIT_ROOT": str(two),
        "AUDIT_LOG_DIR": str(audit),
        "OMP_NUM_THREADS": "1",
    }
    proc = torchrun(medsmile_args(tiny_encoder, two, common), 2, env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # only rank 0 wrote, and it wrote the whole run (the hook works); rank 1 touched nothing under the run's folders
    rank0 = (audit / "rank0.log").read_text().splitlines()
    assert any("round_2" in line for line in rank0) and any("model.pt" in line for line in rank0)
    assert not (audit / "rank1.log").exists(), (audit / "rank1.log").read_text()[:2000]
    assert (proc.stdout + proc.stderr).count("MedSMILE finished") == 1

    # the same files, nothing partial or left over
    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(two) == files(one)
    assert not any(name.endswith((".partial", ".tmp")) or ".cache" in name for name in files(two))
    summary = json.loads((two / "run" / "summary.json").read_text())
    single = json.loads((one / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and single["processes"] == 1
    # the global batch is batch_size on any number of processes: as many optimizer steps per round
    assert [r.get("training", {}).get("iterations") for r in summary["rounds"]] == [
        r.get("training", {}).get("iterations") for r in single["rounds"]
    ]

    # round 0: identical pseudo-labels and global features
    for path in sorted((one / "run" / "round_0" / "labels").iterdir()):
        assert path.read_bytes() == (two / "run" / "round_0" / "labels" / path.name).read_bytes(), path.name
    np.testing.assert_array_equal(
        np.load(one / "run" / "round_0" / "global_features.npy"),
        np.load(two / "run" / "round_0" / "global_features.npy"),
    )
    # rounds 1-2: another sample order and other flips, so not bitwise equal; bounded
    for r in (1, 2):
        for path in sorted((one / "run" / f"round_{r}" / "labels").iterdir()):
            agreement = (label(path) == label(two / "run" / f"round_{r}" / "labels" / path.name)).mean()
            assert agreement >= 0.9, f"round {r} {path.name}: pixel agreement {agreement:.3f}"
        u1, u2 = uncertainties(one / "run", r), uncertainties(two / "run", r)
        assert u1.keys() == u2.keys()
        assert max(abs(u1[k] - u2[k]) for k in u1) < 0.01


@pytest.mark.slow
def test_linear_probe_round0_is_the_same_on_two_processes(tiny_encoder, png_dataset, tmp_path):
    """The probe's pool cells are drawn per image and ordered by image, so the sharding (and the padding repeat of
    an odd pool on 2 ranks) changes neither the refitted probe nor round 0's labels."""
    common = {
        **png_dataset["inputs"],
        "export_torchscript": False,
        "num_rounds": 0,
        "round0_classifier": "linear_probe",
    }
    (tmp_path / "images" / "img_5.png").unlink()  # 5 images: rank 1's share repeats image 0
    one = tmp_path / "one"
    run_medsmile(tiny_encoder, one, **common)
    two = tmp_path / "two"
    proc = torchrun(medsmile_args(tiny_encoder, two, common), 2, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    probes = [torch.load(d / "run" / "round_0" / "linear_probe.pt", weights_only=True) for d in (one, two)]
    for key in ("weight", "bias"):
        torch.testing.assert_close(probes[1][key], probes[0][key], rtol=0, atol=1e-6)
    assert len(list((one / "run" / "round_0" / "labels").iterdir())) == 5
    for path in sorted((one / "run" / "round_0" / "labels").iterdir()):
        assert path.read_bytes() == (two / "run" / "round_0" / "labels" / path.name).read_bytes(), path.name


def test_torchrun_without_the_multi_gpu_override_is_refused(monkeypatch, tmp_path):
    """Without a process group each torchrun worker would run the whole pipeline and write the same files."""
    from scripts.pipeline import MedSMILEPipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="configs/multi_gpu.json"):
        MedSMILEPipeline(output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "model.pt")).run()
    assert not (tmp_path / "run").exists()
