"""Where a run keeps its per-image arrays (pool images, pseudo-labels, predictions): in RAM or streamed from disk.

``pool_store="memory"`` keeps them as torch tensors: fast, but a round's RSS grows with the pool (about 1 MB per
image at the default sizes). ``pool_store="disk"`` keeps each array as one raw file under ``output_dir/.cache`` that
is read and written row by row, so only the rows of the current batch are in RAM. The files are accessed with
``os.preadv``/``os.pwrite``, not ``np.memmap``: pages of a mapping a process has touched count in its RSS until they
are unmapped, page-cache pages behind a ``pread`` do not (measured in benchmarks/results_pool_memory.md).

Both kinds answer the same indexing (an int, a slice or an index array gives a tensor; assignment writes rows), so
the pipeline has one code path and, for the same inputs, the same pseudo-labels either way. In a torchrun job rank 0
alone writes; ``ArrayStore.sync`` makes its rows visible to the other ranks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import numpy as np
import torch

from . import distributed

KINDS = ("memory", "disk")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


class DiskArray:
    """A (N, *row_shape) array stored row-major in one raw file; indexing reads or writes whole rows.

    The length follows the file size, so rows can be appended while a pool is read. Picklable (it holds a path,
    the file is opened lazily per process), so DataLoader workers and other ranks can use it.
    """

    def __init__(self, path: str, row_shape: Sequence[int], dtype: torch.dtype):
        self.path = path
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = dtype
        self._np_dtype = _numpy_dtype(dtype)
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self._np_dtype.itemsize
        self._fd: int | None = None
        self._writable = False

    @classmethod
    def create(cls, path: str, shape: Sequence[int], dtype: torch.dtype) -> DiskArray:
        """A zero-filled array of ``shape`` (a sparse file: no disk space until rows are written)."""
        array = cls(path, shape[1:], dtype)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(int(shape[0]) * array._row_bytes)
        return array

    # -------------------------------------------------------------- file access
    def _file(self, write: bool = False) -> int:
        """The open file, read-only until the first write (a rank that only reads never opens it for writing)."""
        if self._fd is not None and write and not self._writable:
            self.close()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR if write else os.O_RDONLY)
            self._writable = write
        return self._fd

    def close(self, _close=os.close) -> None:  # os.close bound early: __del__ may run at interpreter exit
        if self._fd is not None:
            _close(self._fd)
            self._fd = None
            self._writable = False

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_writable": False}

    def flush(self) -> None:
        """Make written rows durable (and visible through a shared file system) before other ranks read them."""
        if self._fd is not None and self._writable:
            os.fsync(self._fd)

    def __len__(self) -> int:
        return os.path.getsize(self.path) // self._row_bytes if self._row_bytes else 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def __repr__(self) -> str:
        return f"DiskArray({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    # -------------------------------------------------------------- indexing
    def _indices(self, key) -> tuple[np.ndarray, bool]:
        n = len(self)
        if isinstance(key, torch.Tensor):
            key = key.item() if key.ndim == 0 else key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of range for {n} rows")
            return np.array([i], dtype=np.int64), True
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64), False
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices out of range for {n} rows")
        return idx, False

    @staticmethod
    def _runs(idx: np.ndarray):
        """(position in idx, first row, count) of each run of consecutive rows: one system call per run."""
        if not idx.size:
            return
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, idx.size], strict=True):
            yield int(lo), int(idx[lo]), int(hi - lo)

    def __getitem__(self, key) -> torch.Tensor:
        idx, scalar = self._indices(key)
        out = np.empty((idx.size, *self.row_shape), dtype=self._np_dtype)
        flat = out.reshape(idx.size, -1).view(np.uint8)
        fd = self._file()
        for pos, row, count in self._runs(idx):
            view = memoryview(flat[pos : pos + count]).cast("B")
            got = os.preadv(fd, [view], row * self._row_bytes)
            if got != view.nbytes:
                raise OSError(f"{self.path}: short read ({got} of {view.nbytes} bytes)")
        tensor = torch.from_numpy(out)
        return tensor[0] if scalar else tensor

    def __setitem__(self, key, value) -> None:
        idx, _ = self._indices(key)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        rows = np.ascontiguousarray(
            np.broadcast_to(np.asarray(value, dtype=self._np_dtype), (idx.size, *self.row_shape))
        )
        flat = rows.reshape(idx.size, -1).view(np.uint8)
        fd = self._file(write=True)
        for pos, row, count in self._runs(idx):
            self._write(fd, flat[pos : pos + count], row * self._row_bytes)

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        """Write rows (n, *row_shape) after the last one."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.ascontiguousarray(rows, dtype=self._np_dtype).reshape(-1, *self.row_shape)
        self._write(self._file(write=True), rows.reshape(len(rows), -1).view(np.uint8), len(self) * self._row_bytes)

    @staticmethod
    def _write(fd: int, data: np.ndarray, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written


class ArrayStore:
    """Creates the run's per-image arrays of one kind ("memory" or "disk", see the module docstring) and shares
    rank 0's writes with the other ranks of a torchrun job."""

    def __init__(self, kind: str, folder: str):
        if kind not in KINDS:
            raise ValueError(f"pool_store must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.folder = folder

    def reset(self) -> None:
        """Start from an empty cache folder (rank 0; a crashed run's leftovers are discarded)."""
        if self.kind == "disk" and distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
            os.makedirs(self.folder)
        distributed.barrier()

    def remove_all(self) -> None:
        """Delete the cache folder once every rank is done with it."""
        distributed.barrier()
        if self.kind == "disk" and distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)

    def create(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | DiskArray:
        """A zero-filled (N, ...) array. On disk, rank 0 creates the file; other ranks get a handle to read after
        ``sync``."""
        if self.kind == "memory":
            return torch.zeros(tuple(shape), dtype=dtype)
        path = os.path.join(self.folder, f"{name}.bin")
        if distributed.is_main():
            return DiskArray.create(path, shape, dtype)
        return DiskArray(path, shape[1:], dtype)

    def growing(self, name: str, row_shape: Sequence[int], dtype: torch.dtype) -> RowCollector:
        """An array built by appending rows while the pool is read (its length is not known in advance)."""
        if self.kind == "memory":
            return RowCollector(None)
        return RowCollector(DiskArray.create(os.path.join(self.folder, f"{name}.bin"), (0, *row_shape), dtype))

    @staticmethod
    def sync(array: torch.Tensor | DiskArray) -> torch.Tensor | DiskArray:
        """Every rank sees what rank 0 wrote into ``array``: a tensor is broadcast, a file is flushed (barrier)."""
        if distributed.world_size() == 1:
            return array
        if isinstance(array, torch.Tensor):
            return distributed.broadcast(array)
        if distributed.is_main():
            array.flush()
        distributed.barrier()
        return array


class RowCollector:
    """Appends rows to a DiskArray, or collects tensors to stack (memory)."""

    def __init__(self, array: DiskArray | None):
        self.array = array
        self.rows: list[torch.Tensor] = []

    def append(self, row: torch.Tensor) -> None:
        if self.array is None:
            self.rows.append(row)
        else:
            self.array.append(row[None])

    def finish(self) -> torch.Tensor | DiskArray:
        return torch.stack(self.rows) if self.array is None else self.array


class RowItems(Sequence):
    """Dataset items ``{"image", "label", "index"}`` read row by row from the pool arrays (tensor or DiskArray), for
    every row or only ``indices``, plus extra in-memory items (the references) after them. A MONAI Dataset reads it
    lazily, one item at a time."""

    def __init__(self, images, labels=None, indices=None, extra: list[dict] | None = None):
        self.images = images
        self.labels = labels
        self.rows = range(len(images)) if indices is None else [int(i) for i in indices]
        self.extra = list(extra or [])

    def __len__(self) -> int:
        return len(self.rows) + len(self.extra)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i >= len(self.rows):
            return self.extra[i - len(self.rows)]
        row = self.rows[i]
        item = {"image": self.images[row], "index": row}
        if self.labels is not None:
            item["label"] = self.labels[row][None]
        return item

    def append(self, item: dict) -> None:
        self.extra.append(item)
