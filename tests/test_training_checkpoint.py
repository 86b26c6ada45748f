"""scripts.training.latest_checkpoint: the one newest-checkpoint lookup (round training; the encoder fine-tune too)."""

import os

import torch

from scripts.training import latest_checkpoint


def _save(path, epoch, mtime):
    torch.save({"epoch": torch.tensor(epoch)}, path)
    os.utime(path, (mtime, mtime))


def test_newest_epoch_by_number_and_a_truncated_one_is_removed(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    _save(tmp_path / "checkpoint_epoch=2.pt", 2, 2_000_000)
    _save(tmp_path / "checkpoint_epoch=10.pt", 10, 1_000_000)  # older mtime: the epoch number decides, not "2" > "1"
    truncated = tmp_path / "checkpoint_epoch=11.pt"
    _save(truncated, 11, 3_000_000)
    truncated.write_bytes(truncated.read_bytes()[:40])  # a crash during CheckpointSaver's in-place write
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=10.pt")
    assert not truncated.exists()


def test_prefix_picks_one_savers_files(tmp_path):
    _save(tmp_path / "moco_checkpoint_epoch=3.pt", 3, 1_000_000)
    _save(tmp_path / "other_checkpoint_epoch=9.pt", 9, 1_000_000)
    assert latest_checkpoint(str(tmp_path), prefix="moco") == str(tmp_path / "moco_checkpoint_epoch=3.pt")
    assert latest_checkpoint(str(tmp_path), prefix="none") is None
