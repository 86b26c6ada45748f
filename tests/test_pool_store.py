"""The disk-backed pool store reads and writes rows like a tensor, and the pipeline gives the same pseudo-labels
whether the pool lives in RAM or streams from disk."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import run_medsmile

from scripts.pool_store import ArrayStore, DiskArray, RowItems


def test_disk_array_indexes_like_a_tensor(tmp_path):
    ref = torch.arange(7 * 2 * 3, dtype=torch.float32).reshape(7, 2, 3)
    array = DiskArray.create(str(tmp_path / "a.bin"), ref.shape, torch.float32)
    assert array.shape == (7, 2, 3) and array[3].abs().sum() == 0  # zero-filled
    array[:] = ref
    for key in (2, -1, slice(1, 5), slice(None), [6, 0, 1, 2, 4], np.array([3, 3]), torch.tensor([5, 4])):
        torch.testing.assert_close(array[key], ref[key], rtol=0, atol=0)
    array[torch.tensor([1, 2, 5])] = torch.full((3, 2, 3), -1.0)
    ref[torch.tensor([1, 2, 5])] = -1.0
    array[0] = 9
    ref[0] = 9
    torch.testing.assert_close(array[:], ref, rtol=0, atol=0)
    with pytest.raises(IndexError):
        array[7]
    # a pickled copy (a DataLoader worker, another rank) reads the same file
    torch.testing.assert_close(pickle.loads(pickle.dumps(array))[:], ref, rtol=0, atol=0)


def test_growing_array_and_row_items(tmp_path):
    store = ArrayStore("disk", str(tmp_path / "cache"))
    store.reset()
    rows = store.growing("images", (3, 4, 4), torch.uint8)
    images = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    for image in images:
        rows.append(image)
    on_disk = rows.finish()
    assert isinstance(on_disk, DiskArray) and len(on_disk) == 5
    labels = store.create("labels", (5, 4, 4), torch.uint8)
    labels[:] = images[:, 0] % 2
    items = RowItems(on_disk, labels)
    items.append({"image": images[0], "label": labels[0][None], "index": -1})
    assert len(items) == 6 and items[5]["index"] == -1 and items[-1]["index"] == -1
    assert torch.equal(items[2]["image"], images[2]) and torch.equal(items[2]["label"], (images[2, :1] % 2))
    subset = RowItems(on_disk, labels, indices=[4, 1])
    assert len(subset) == 2 and subset[0]["index"] == 4 and torch.equal(subset[1]["image"], images[1])
    store.remove_all()
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="pool_store must be one of"):
        ArrayStore("ram", str(tmp_path))


@pytest.mark.slow
def test_memory_and_disk_pools_give_the_same_pseudo_labels(tiny_encoder, png_dataset, tmp_path):
    runs = {}
    for kind in ("memory", "disk"):
        run_medsmile(tiny_encoder, tmp_path / kind, **png_dataset["inputs"], pool_store=kind, export_torchscript=False)
        runs[kind] = tmp_path / kind / "run"
    assert not (runs["disk"] / ".cache").exists(), "the streamed arrays are deleted at the end of the run"
    for r in range(3):
        labels = sorted((runs["memory"] / f"round_{r}" / "labels").iterdir())
        assert len(labels) == 6
        for path in labels:
            assert path.read_bytes() == (runs["disk"] / f"round_{r}" / "labels" / path.name).read_bytes()
    for name in ("round_0/global_features.npy", "round_1/uncertainty.csv", "round_2/uncertainty.csv"):
        assert (runs["memory"] / name).read_bytes() == (runs["disk"] / name).read_bytes()
