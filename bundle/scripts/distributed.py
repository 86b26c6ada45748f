"""Data-parallel runs on torch.distributed through Ignite's ``idist``, for a job launched by ``torchrun``.

torchrun starts one process per GPU (or CPU share) and sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT;
``configs/multi_gpu.json`` calls :func:`initialize` (NCCL on GPUs, gloo without) and :func:`finalize`. The pipeline then
asks this module who it is. Every helper is the plain single-process behaviour when no process group exists, so the
pipeline has one code path:

* training: DistributedDataParallel (``idist.auto_model``) fed by a DistributedSampler (``idist.auto_dataloader``);
  ``batch_size`` stays the global batch (each rank takes ``batch_size / world_size``);
* feature extraction and prediction: each rank takes its share of the pool (a DistributedSampler without shuffling)
  and the per-image results are all-gathered, so rank 0 holds everything it needs to rank, refine and write;
* rank 0 alone writes shared outputs (:func:`run_on_main`, ``pool_store.ArrayStore.sync``); the others wait.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from monai.data import DataLoader, list_data_collate
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize(backend: str | None = None, timeout_minutes: float = 120) -> None:
    """Join the process group torchrun describes (``idist.initialize``); nothing outside torchrun or when joined.

    ``timeout_minutes`` bounds a wait at a barrier: rank 0 writes a round's outputs while the others wait, which can
    take longer than torch's default (10 min for NCCL) on a large pool.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        logger.info("not launched by torchrun: running as a single process")
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    idist.initialize(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info("rank %d of %d (%s backend, local rank %d)", rank(), world_size(), backend, idist.get_local_rank())


def finalize() -> None:
    if dist.is_available() and dist.is_initialized():
        idist.finalize()


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def world_size() -> int:
    return idist.get_world_size()


def rank() -> int:
    return idist.get_rank()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        idist.barrier()


def run_on_main(fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 only (it may write files); every rank gets its result, or its exception."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 (re-raised on every rank below, so no rank waits forever)
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    ok, value = box[0]
    if not ok:
        raise value
    return value


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (same shape and dtype everywhere)."""
    return idist.broadcast(tensor, src=0) if world_size() > 1 else tensor


def gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over the ranks along dim 0 (``idist.all_gather``; equal shapes on every rank)."""
    if world_size() == 1:
        return tensors
    return tuple(idist.all_gather(t) for t in tensors)


def _collective_device() -> torch.device:
    return idist.device() if idist.backend() == "nccl" else torch.device("cpu")


def shard_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches in order over this rank's share of ``dataset``.

    Distributed: a DistributedSampler without shuffling gives rank r the items r, r + W, ... and pads the shares to
    equal length by repeating the first items, so every rank runs the same number of equally sized batches and the
    per-batch all-gathers line up (a repeated item is predicted twice, identically, and written once per copy).
    """
    sampler = DistributedSampler(dataset, shuffle=False) if world_size() > 1 else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


def train_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A shuffling loader over ``dataset``: MONAI's DataLoader alone, or ``idist.auto_dataloader`` with a
    DistributedSampler when distributed.

    ``batch_size`` is the global batch, so one optimizer step sees as many images as in a single-process run and an
    epoch has as many steps (the last incomplete batch is dropped in both): DistributedSampler(drop_last) trims the
    pool to a multiple of the world size and each rank takes ``batch_size // world_size`` images per step.
    """
    n = len(dataset)
    if world_size() == 1:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=n > batch_size
        )
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=n >= world_size())
    per_rank = batch_size // world_size() if batch_size >= world_size() else batch_size  # auto_dataloader's rule
    return idist.auto_dataloader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=len(sampler) > per_rank,
        collate_fn=list_data_collate,
    )


def wrap_model(network: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around ``network`` when distributed (``idist.auto_model``), else ``network`` itself.

    ``find_unused_parameters``: DINOv2's mask token (and any head a loss skips) gets no gradient, which plain DDP
    rejects.
    """
    if world_size() == 1:
        return network
    return idist.auto_model(network, find_unused_parameters=True)
