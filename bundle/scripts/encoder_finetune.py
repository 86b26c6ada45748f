"""Optional step: self-supervised fine-tuning of the DINOv2 encoder on the unlabelled pool (MoCo-style).

For modalities DINOv2 never saw (ultrasound, ...), the encoder is adapted to the pool before round 0; the fine-tuned
student encoder then replaces the DINOv2 encoder everywhere downstream. Method (``docs/METHOD.md``, "Optional step"):

* **Student and teacher.** The student is the start ``Dinov2Model`` plus a fresh projection head
  (:class:`ProjectionHead`) on ``[CLS, mean(patch tokens)]``, so the patch tokens, which round 0 and the KNN
  refinement use, get a direct gradient. The teacher is Ignite's ``EMAHandler`` copy of the student (no gradients,
  eval mode), after every step ``teacher = m * teacher + (1 - m) * student`` with ``m = ema_momentum``.
* **Multi-crop** (:func:`multi_crop`, MONAI transforms): 2 global crops (area scale 0.4-1, resized to
  ``global_crop_size``) and ``num_local_crops`` local crops (0.05-0.4, resized to ``local_crop_size``) per image,
  each flipped left-right at random (never up-down: ultrasound/endoscopy images have a meaningful "up") and jittered
  in brightness and contrast. Crops and batches are re-seeded from ``(seed, epoch)`` every epoch, so a
  resumed run draws what an uninterrupted one does.
* **Loss** (:func:`moco_loss`): InfoNCE of each student view against the teacher global views of the batch (same
  image positive, other images negative), global view 1 against teacher view 2 and vice versa, a local view
  against both; the mean over the views.
* **Optimisation.** AdamW (no weight decay on biases, norms, layer scales, tokens and position embeddings), the head
  at 10x the encoder learning rate, per-iteration cosine schedule to 0, gradient norm clipped at 3.

The loop is a MONAI ``SupervisedTrainer`` whose ``iteration_update`` is :func:`_moco_iteration`; the EMA,
``LrScheduleHandler``, ``scripts.handlers.GradientClipHandler``, ``CheckpointSaver`` (every epoch) and
``CheckpointLoader`` (``weights_only=True``) are its handlers.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler, ProgressBar
from monai import transforms as mt
from monai.data import DataLoader, Dataset, get_track_meta, set_track_meta
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler, StatsHandler
from monai.utils import CommonKeys
from torch import nn
from transformers import Dinov2Model

from .atomic_files import atomic_path
from .handlers import GradientClipHandler
from .network import imagenet_normalize
from .training import latest_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "FINETUNE_KIND",
    "MoCoBranch",
    "ProjectionHead",
    "finetune_encoder",
    "info_nce",
    "load_image_folder",
    "moco_loss",
    "multi_crop",
]

FINETUNE_KIND = "moco-finetune"
PROVENANCE_FILE = "provenance.json"
RECIPE = 2  # in the checkpoint fingerprint: 2 = MONAI crops + SupervisedTrainer; checkpoints of recipe 1 are refused

GLOBAL_CROP_SCALE = (0.4, 1.0)  # area fraction of a crop; each side is drawn in [sqrt(lo), sqrt(hi)] of the image side
LOCAL_CROP_SCALE = (0.05, 0.4)
JITTER = 0.2  # brightness and contrast factors drawn uniformly in [1 - JITTER, 1 + JITTER]
HEAD_HIDDEN_MULTIPLIER = 4  # head hidden width = 4 x encoder width
HEAD_LR_MULTIPLIER = 10.0
GRAD_CLIP_NORM = 3.0
_CHECKPOINT_RE = re.compile(r"moco_checkpoint_(?:epoch=)?(\d+)\.pt")  # MONAI CheckpointSaver names


# ----------------------------------------------------------------------------------------------------------------------
# model and loss
# ----------------------------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """Shallow MLP projection head: ``Linear(in, hidden) - GELU - Linear(hidden, out)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MoCoBranch(nn.Module):
    """A DINOv2 encoder plus a projection head on ``[CLS, mean(patch tokens)]`` of its final (normed) tokens.

    ``forward`` takes ImageNet-normalised pixels (B, 3, H, W), H and W multiples of the patch size, and returns the
    (un-normalised) projections (B, projection_dim).
    """

    def __init__(self, encoder: Dinov2Model, projection_dim: int) -> None:
        super().__init__()
        width = encoder.config.hidden_size
        self.encoder = encoder
        self.head = ProjectionHead(2 * width, HEAD_HIDDEN_MULTIPLIER * width, projection_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(pixel_values=pixel_values).last_hidden_state
        skip = 1 + getattr(self.encoder.config, "num_register_tokens", 0)
        return self.head(torch.cat([tokens[:, 0], tokens[:, skip:].mean(dim=1)], dim=1))


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of ``query`` (B, P) against ``key`` (B, P): row i of ``key`` is the positive of row i of ``query``,
    the other rows are its negatives. Both are L2-normalised; logits are cosine similarities / ``temperature``;
    returns the mean cross-entropy over the batch. ``key`` is used as given (detach it for a teacher)."""
    if query.shape != key.shape or query.ndim != 2:
        raise ValueError(f"query and key must both be (B, P), got {tuple(query.shape)} and {tuple(key.shape)}")
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def moco_loss(
    student_global: Sequence[torch.Tensor],
    student_local: Sequence[torch.Tensor],
    teacher_global: Sequence[torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Multi-crop InfoNCE, averaged over views.

    Args:
        student_global: the student projections of the two global views, each (B, P).
        student_local: the student projections of the local views, each (B, P) (may be empty).
        teacher_global: the teacher projections of the two global views, each (B, P).

    Global view ``g`` is matched to the teacher's other global view ``1 - g``; a local view to both teacher global
    views (terms averaged). Returns the mean over the ``2 + len(student_local)`` views.
    """
    if len(student_global) != 2 or len(teacher_global) != 2:
        raise ValueError("moco_loss expects exactly two global views")
    terms = [info_nce(student_global[g], teacher_global[1 - g], temperature) for g in (0, 1)]
    for local in student_local:
        terms.append(
            0.5 * (info_nce(local, teacher_global[0], temperature) + info_nce(local, teacher_global[1], temperature))
        )
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------------------------------
# multi-crop
# ----------------------------------------------------------------------------------------------------------------------


def multi_crop(global_crop_size: int, local_crop_size: int, num_local_crops: int) -> mt.Compose:
    """MONAI transform: ``{"image": (3, X, Y) uint8}`` -> ``{"global0", "global1", "local0", ...}``, float views in
    [0, 1] of (3, size, size). Seed it with ``set_random_state``.

    Each view: ``RandScaleCropd`` (each side a uniform fraction of the image side, in ``sqrt`` of the area scale),
    ``Resized`` (bilinear, anti-aliased), a left-right flip with probability 1/2 (spatial axis 0 is X in MONAI order),
    brightness and contrast (about the mean) jitter, clipped to [0, 1]. No saturation jitter (MONAI has none; it is a
    no-op on the greyscale modalities this step is for).
    """
    views = {"global0": (global_crop_size, GLOBAL_CROP_SCALE), "global1": (global_crop_size, GLOBAL_CROP_SCALE)}
    views.update({f"local{i}": (local_crop_size, LOCAL_CROP_SCALE) for i in range(num_local_crops)})
    keys = list(views)
    transforms = [
        mt.ScaleIntensityRanged("image", a_min=0, a_max=255, b_min=0, b_max=1),
        mt.CopyItemsd("image", times=len(keys), names=keys),
        mt.DeleteItemsd("image"),
    ]
    for key, (size, (low, high)) in views.items():
        transforms += [
            mt.RandScaleCropd(key, roi_scale=math.sqrt(low), max_roi_scale=math.sqrt(high), random_size=True),
            mt.Resized(key, spatial_size=(size, size), mode="bilinear", anti_aliasing=True),
            mt.RandFlipd(key, prob=0.5, spatial_axis=0),
            mt.RandScaleIntensityd(key, factors=JITTER, prob=1.0),
            mt.RandScaleIntensityFixedMeand(key, factors=JITTER, fixed_mean=True, prob=1.0),
            mt.ScaleIntensityRanged(key, a_min=0, a_max=1, b_min=0, b_max=1, clip=True),  # clip to [0, 1]
        ]
    return mt.Compose([*transforms, mt.EnsureTyped(keys, track_meta=False)])


def _split_views(batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(global views, local views) of a collated batch of :func:`multi_crop` outputs."""
    return [batch["global0"], batch["global1"]], [v for k, v in batch.items() if k.startswith("local")]


class _EpochBatches:
    """Batch sampler: each epoch a permutation drawn from ``(seed, epoch)`` split into near-equal batches of at most
    ``batch_size`` (never a batch of 1, which has no negatives). :meth:`set_epoch` also re-seeds ``transform``."""

    def __init__(self, n: int, batch_size: int, seed: int, transform: mt.Compose) -> None:
        self.n, self.seed, self.transform, self.epoch = n, seed, transform, 0
        self.num_batches = max(1, math.ceil(n / batch_size))
        if n // self.num_batches < 2:
            self.num_batches = n // 2

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + epoch) % 2**32)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        return iter([batch.tolist() for batch in torch.tensor_split(perm, self.num_batches)])


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------


def _student(encoder: Dinov2Model, projection_dim: int, seed: int, device: torch.device) -> MoCoBranch:
    with torch.random.fork_rng(devices=[]):  # seeded head initialisation, global RNG left untouched
        torch.manual_seed(seed)
        return MoCoBranch(encoder, projection_dim).to(device).train()


def _ema_teacher(student: nn.Module, ema_momentum: float) -> EMAHandler:
    """The teacher ``EMAHandler`` (its ``ema_model``): Ignite's ``momentum`` weighs the student, so it is ``1 - m``."""
    return EMAHandler(student, momentum=1.0 - ema_momentum)


def _param_groups(student: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in student.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "position_embeddings", "register_tokens"))
        groups.setdefault((name.startswith("head."), not no_decay), []).append(p)
    return [
        {
            "params": params,
            "lr": lr * (HEAD_LR_MULTIPLIER if is_head else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (is_head, decay), params in sorted(groups.items())
    ]


def _views_loss(student: nn.Module, teacher: nn.Module, batch: dict, loss_function) -> torch.Tensor:
    """``loss_function(student global, student local, teacher global)`` on a batch of views (teacher without grad)."""
    device = next(student.parameters()).device
    glob, local = _split_views(batch)
    b = glob[0].shape[0]
    glob_px = imagenet_normalize(torch.cat(glob).to(device))
    with torch.no_grad():
        teacher_global = teacher(glob_px).split(b)
    student_global = student(glob_px).split(b)
    student_local = student(imagenet_normalize(torch.cat(local).to(device))).split(b) if local else []
    return loss_function(student_global, student_local, teacher_global)


def _moco_iteration(engine: SupervisedTrainer, batch: dict, teacher: nn.Module) -> dict:
    """``iteration_update`` of the trainer: one optimizer step; clipping, EMA and the schedule are handlers."""
    engine.network.train()
    loss = _views_loss(engine.network, teacher, batch, engine.loss_function)
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return {CommonKeys.LOSS: float(loss.detach())}


class _RunRecord:
    """Checkpointed bookkeeping and its handler: the run's fingerprint (checked on resume), the epoch the run resumed
    from, and the epoch mean losses (also ``engine.state.metrics["epoch_loss"]``, which StatsHandler logs)."""

    def __init__(self, fingerprint: dict) -> None:
        self.fingerprint = fingerprint
        self.epoch_losses: list[float] = []
        self.resumed_from_epoch = 0
        self.source = "the checkpoint"
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "resumed_from_epoch", e.state.epoch))
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._losses.clear())
        engine.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: self._losses.append(e.state.output[CommonKeys.LOSS])
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_completed(self, engine: Engine) -> None:
        self.epoch_losses.append(float(np.mean(self._losses)) if self._losses else float("nan"))
        engine.state.metrics["epoch_loss"] = self.epoch_losses[-1]

    def state_dict(self) -> dict:
        return {"fingerprint": dict(self.fingerprint), "epoch_losses": list(self.epoch_losses)}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved != self.fingerprint:
            diff = {k: (saved.get(k), self.fingerprint.get(k)) for k in set(saved) | set(self.fingerprint)}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise ValueError(
                f"{self.source} was written by a different fine-tuning run (checkpoint vs now: {diff}); "
                "use another checkpoint_dir or empty it"
            )
        self.epoch_losses = [float(x) for x in state.get("epoch_losses", [])]


def _checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of the epoch checkpoints :func:`finetune_encoder` wrote in ``checkpoint_dir``, newest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        m = _CHECKPOINT_RE.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(found, reverse=True)


def _images_sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(images.numpy()).tobytes()).hexdigest()


def _validate(images: torch.Tensor, patch: int, hp: dict) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, S, S) tensor, got {getattr(images, 'shape', type(images))}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.shape[0] < 2:
        raise ValueError(f"contrastive fine-tuning needs at least 2 images (negatives), got {images.shape[0]}")
    if hp["batch_size"] < 2:
        raise ValueError(f"batch_size must be >= 2 (the other images are the negatives), got {hp['batch_size']}")
    for name in ("global_crop_size", "local_crop_size"):
        if hp[name] <= 0 or hp[name] % patch:
            raise ValueError(f"{name}={hp[name]} must be a positive multiple of the encoder patch size {patch}")
    if hp["epochs"] < 1:
        raise ValueError(f"epochs must be >= 1, got {hp['epochs']}")
    if hp["num_local_crops"] < 0:
        raise ValueError(f"num_local_crops must be >= 0, got {hp['num_local_crops']}")
    if not hp["temperature"] > 0:
        raise ValueError(f"temperature must be > 0, got {hp['temperature']}")
    if not 0.0 < hp["ema_momentum"] < 1.0:  # Ignite's EMAHandler refuses a frozen teacher (1) and a copy (0)
        raise ValueError(f"ema_momentum must be in (0, 1), got {hp['ema_momentum']}")


def _make_trainer(
    student: MoCoBranch,
    loader,
    hp: dict,
    device: torch.device,
    record: _RunRecord,
    checkpoint_dir: str | None = None,
) -> tuple[SupervisedTrainer, nn.Module]:
    """The trainer over ``loader`` for ``hp["epochs"]`` epochs, and its EMA teacher.

    With ``checkpoint_dir``, a checkpoint is saved there after every epoch (the 2 newest are kept) and the run resumes
    from the newest readable one. A ``loader`` whose ``batch_sampler`` has ``set_epoch`` gets it at every epoch start.
    """
    optimizer = torch.optim.AdamW(
        _param_groups(student, hp["learning_rate"], hp["weight_decay"]), lr=hp["learning_rate"]
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["epochs"] * len(loader), eta_min=0.0)
    ema = _ema_teacher(student, hp["ema_momentum"])
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=hp["epochs"],
        train_data_loader=loader,
        network=student,
        optimizer=optimizer,
        loss_function=functools.partial(moco_loss, temperature=hp["temperature"]),
        iteration_update=functools.partial(_moco_iteration, teacher=ema.ema_model),
        decollate=False,
    )
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch))
    save_dict = {  # the record first, so that a checkpoint of another run is refused before anything is loaded
        "record": record,
        "student": student,
        "teacher": ema.ema_model,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "trainer": trainer,
    }
    newest = latest_checkpoint(checkpoint_dir, prefix="moco") if checkpoint_dir is not None else None
    if newest is not None:
        logger.info("resuming encoder fine-tuning from %s", newest)
        record.source = f"the checkpoint {newest}"
        CheckpointLoader(load_path=newest, load_dict=save_dict, map_location=device).attach(trainer)
    for handler in (
        record,  # after the loader: it reads the epoch the run resumes from
        GradientClipHandler(GRAD_CLIP_NORM),
        ema,  # on ITERATION_COMPLETED, after the optimizer step
        LrScheduleHandler(scheduler, print_lr=False, epoch_level=False),
        StatsHandler(tag_name="loss", iteration_log=False),  # the epoch mean loss through MONAI's logger
    ):
        handler.attach(trainer)
    ProgressBar(persist=False).attach(trainer, output_transform=lambda output: output)
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        # n_saved=None: Ignite never deletes; _prune (registered after the saver) keeps the 2 newest epochs, also
        # those left by an earlier, interrupted run that this saver does not know about
        CheckpointSaver(
            save_dir=checkpoint_dir, save_dict=save_dict, file_prefix="moco", epoch_level=True, save_interval=1
        ).attach(trainer)

        @trainer.on(Events.EPOCH_COMPLETED)
        def _prune(engine: Engine) -> None:
            for epoch, path in _checkpoints(checkpoint_dir):
                if epoch < engine.state.epoch - 1:
                    os.remove(path)

    return trainer, ema.ema_model


def finetune_encoder(
    encoder_dir: str,
    images: torch.Tensor,
    output_dir: str,
    epochs: int = 10,
    batch_size: int = 16,
    learning_rate: float = 1e-5,
    weight_decay: float = 0.05,
    temperature: float = 0.2,
    ema_momentum: float = 0.996,
    global_crop_size: int = 224,
    local_crop_size: int = 98,
    num_local_crops: int = 4,
    projection_dim: int = 256,
    seed: int = 0,
    device: str = "cpu",
    checkpoint_dir: str | None = None,
) -> str:
    """Fine-tune the DINOv2 encoder in ``encoder_dir`` on ``images`` (MoCo-style, see the module docstring).

    Args:
        encoder_dir: Hugging Face ``Dinov2Model`` folder with the start weights.
        images: (N, 3, S, S) uint8 unlabelled images, N >= 2.
        output_dir: where the fine-tuned student encoder is written as a Hugging Face folder (``save_pretrained``)
            plus ``provenance.json``; written into a temporary sibling folder and moved into place with
            ``os.replace``. If it already holds a finished fine-tune (``provenance.json`` of kind
            ``"moco-finetune"``), it is returned as is, without training.
        checkpoint_dir: if given, a checkpoint is saved there after every epoch (the 2 newest are kept) and
            training resumes from the newest readable one found there (it must come from the same images and
            hyperparameters, except ``epochs``).

    Returns:
        ``output_dir``.
    """
    output_dir = os.fspath(output_dir)
    existing = _read_json(os.path.join(output_dir, PROVENANCE_FILE))
    hyperparameters = {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "weight_decay": float(weight_decay),
        "temperature": float(temperature),
        "ema_momentum": float(ema_momentum),
        "global_crop_size": int(global_crop_size),
        "local_crop_size": int(local_crop_size),
        "num_local_crops": int(num_local_crops),
        "projection_dim": int(projection_dim),
        "seed": int(seed),
    }
    if existing is not None:
        if existing.get("kind") != FINETUNE_KIND:
            raise ValueError(
                f"output_dir {output_dir!r} holds a provenance.json of kind {existing.get('kind')!r}, not a "
                f"{FINETUNE_KIND!r} result; refusing to overwrite it"
            )
        saved = existing.get("hyperparameters", {})
        differ = {k: (saved.get(k), v) for k, v in hyperparameters.items() if saved.get(k) != v}
        if existing.get("images") != len(images):
            differ["images"] = (existing.get("images"), len(images))
        if differ:
            logger.warning(
                "%s already holds a finished fine-tune made with other settings (saved vs asked: %s); "
                "returning it without training",
                output_dir,
                differ,
            )
        else:
            logger.info("%s already holds a finished encoder fine-tune; not training again", output_dir)
        return output_dir

    start = time.perf_counter()
    encoder = Dinov2Model.from_pretrained(encoder_dir, dtype=torch.float32, local_files_only=True).float()
    patch = encoder.config.patch_size
    _validate(images, patch, hyperparameters)
    images = images.contiguous().cpu()
    images_sha256 = _images_sha256(images)
    dev = torch.device(device)
    student = _student(encoder, projection_dim, seed, dev)
    dataset = Dataset(
        [{"image": image} for image in images], multi_crop(global_crop_size, local_crop_size, num_local_crops)
    )
    sampler = _EpochBatches(len(images), batch_size, seed, dataset.transform)
    # a generator of its own: MONAI's DataLoader would otherwise draw from (and re-seed) the global RNG
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0, generator=torch.Generator().manual_seed(seed))
    fingerprint = {k: v for k, v in hyperparameters.items() if k != "epochs"}
    fingerprint.update(
        images=int(images.shape[0]),
        images_sha256=images_sha256,
        encoder_dir=os.path.abspath(encoder_dir),
        recipe=RECIPE,
    )
    record = _RunRecord(fingerprint)
    trainer, _ = _make_trainer(student, loader, hyperparameters, dev, record, checkpoint_dir)
    logger.info(
        "fine-tuning the encoder %s on %d images for %d epochs (%d iterations each) on %s",
        encoder_dir,
        images.shape[0],
        epochs,
        len(loader),
        dev,
    )
    train_start, track_meta = time.perf_counter(), get_track_meta()
    set_track_meta(False)  # plain tensors through the crops: no metadata is needed, and MONAI is 2x faster without
    try:
        trainer.run()
    finally:
        set_track_meta(track_meta)
    train_time = time.perf_counter() - train_start

    base = _read_json(os.path.join(encoder_dir, PROVENANCE_FILE))
    provenance = {
        "kind": FINETUNE_KIND,
        "base": base if base is not None else os.path.abspath(encoder_dir),
        "base_path": os.path.abspath(encoder_dir),
        "hyperparameters": {
            **hyperparameters,
            "head": (
                f"Linear(2*D, {HEAD_HIDDEN_MULTIPLIER}*D)-GELU-Linear(.., projection_dim) on [CLS, mean(patch tokens)]"
            ),
            "head_lr_multiplier": HEAD_LR_MULTIPLIER,
            "global_crop_scale": list(GLOBAL_CROP_SCALE),
            "local_crop_scale": list(LOCAL_CROP_SCALE),
            "crop": "MONAI RandScaleCropd, each side in sqrt(crop scale) of the image side, then Resized",
            "flip": "left-right (MONAI spatial axis 0), p=0.5",
            "jitter": f"brightness and contrast (about the mean), factors in [1 - {JITTER}, 1 + {JITTER}]",
            "grad_clip_norm": GRAD_CLIP_NORM,
            "lr_schedule": "cosine per iteration to 0, no warm-up",
            "saved": "student encoder",
        },
        "images": int(images.shape[0]),
        "images_shape": list(images.shape),
        "images_sha256": images_sha256,
        "iterations_per_epoch": len(loader),
        "resumed_from_epoch": record.resumed_from_epoch,
        "epochs_trained_this_run": int(epochs - record.resumed_from_epoch),
        "epoch_losses": record.epoch_losses,
        "final_loss": record.epoch_losses[-1] if record.epoch_losses else None,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "train_time_s": round(train_time, 3),
        "device": str(dev),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    _write_encoder(student.encoder, provenance, output_dir)
    logger.info("fine-tuned encoder written to %s (final loss %s)", output_dir, provenance["final_loss"])
    return output_dir


# ----------------------------------------------------------------------------------------------------------------------
# output and helpers
# ----------------------------------------------------------------------------------------------------------------------


def _write_encoder(encoder: Dinov2Model, provenance: dict, output_dir: str) -> None:
    """``save_pretrained`` + provenance.json into a temp sibling folder moved onto ``output_dir`` (which may hold an
    unfinished fine-tune) in one step (``atomic_files.atomic_path``)."""
    target = Path(output_dir).resolve()
    if target.exists():
        logger.warning("replacing the unfinished folder %s", target)
    with atomic_path(target) as tmp:
        tmp = Path(tmp)
        tmp.mkdir()
        encoder.cpu().save_pretrained(tmp)
        with open(tmp / PROVENANCE_FILE, "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2, sort_keys=True)
            f.write("\n")
        for child in tmp.iterdir():
            if child.is_file():
                child.chmod(0o644)
        tmp.chmod(0o755)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _versions() -> dict:
    import ignite
    import monai
    import transformers

    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "ignite": ignite.__version__,
        "transformers": transformers.__version__,
    }


def load_image_folder(dataset_dir: str, image_size: int = 224, max_images: int | None = None) -> torch.Tensor:
    """Every 2-D image (volume slices included) under ``dataset_dir`` as (N, 3, S, S) uint8, S = ``image_size``.

    Reading goes through ``scripts.image_io`` (``list_inputs``/``read_case``: MONAI readers, intensities scaled to
    [0, 1], 3 channels, MONAI spatial order), resizing through MONAI ``Resize`` (bilinear, anti-aliased), as for the
    pool of the main pipeline. ``max_images`` keeps the first ``max_images`` slices (sorted file order).
    """
    from monai.transforms import Resize

    from .image_io import list_inputs, read_case

    resize = Resize(spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True)
    out: list[torch.Tensor] = []
    for path in list_inputs(dataset_dir):
        _, slices = read_case(path, dataset_root=dataset_dir)
        for image in slices:
            resized = torch.as_tensor(resize(torch.as_tensor(image, dtype=torch.float32))).clamp(0, 1)
            out.append((resized * 255).round().to(torch.uint8))
            if max_images is not None and len(out) >= max_images:
                break
        if max_images is not None and len(out) >= max_images:
            break
    if not out:
        raise ValueError(f"no images found under {dataset_dir!r}")
    logger.info("read %d images from %s at %dx%d", len(out), dataset_dir, image_size, image_size)
    return torch.stack(out)
