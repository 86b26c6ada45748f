"""Optional step: self-supervised fine-tuning of the DINOv2 encoder on the unlabelled pool (MoCo-style).

For modalities DINOv2 never saw (ultrasound, ...), the encoder is adapted to the pool before round 0: the
fine-tuned student encoder then replaces the DINOv2 encoder everywhere downstream.

Method (see ``docs/METHOD.md``, "Optional step"):

* **Student and teacher.** Both are a copy of the start ``Dinov2Model`` followed by the same freshly initialised
  projection head (:class:`ProjectionHead`: ``Linear(2D, 4D) - GELU - Linear(4D, projection_dim)``). The head input
  is the concatenation of the class token and the mean of the patch tokens of ``last_hidden_state`` (after DINOv2's
  final layernorm), so the patch tokens, which round 0 and the KNN refinement use, receive a direct gradient too.
  The teacher (encoder *and* head) has ``requires_grad=False``, stays in eval mode and changes only through
  :func:`ema_update` after every optimizer step: ``teacher = m * teacher + (1 - m) * student``.
* **Multi-crop.** Per image: 2 global crops (random resized crop, area scale 0.4-1, aspect ratio 3/4-4/3, resized to
  ``global_crop_size``) and ``num_local_crops`` local crops (scale 0.05-0.4, resized to ``local_crop_size``), each
  with a random horizontal flip (no vertical flip: ultrasound/endoscopy images have a meaningful "up") and light
  brightness/contrast/saturation jitter (factors 0.8-1.2). Plain torch on tensors (no torchvision); all randomness
  comes from a ``torch.Generator`` re-seeded from ``(seed, epoch)`` at every epoch, so a resumed run draws the same
  batches and crops as an uninterrupted one. Crops are in [0, 1] and normalised with the ImageNet mean/std, as
  everywhere else in the bundle (``scripts.network.IMAGENET_MEAN``/``IMAGENET_STD``).
* **Loss.** InfoNCE (:func:`info_nce`): L2-normalised student projection of a view against the L2-normalised
  teacher projections of a global view of every image in the batch, divided by ``temperature``, cross-entropy
  with the same image as the positive and the other images of the batch as negatives. Global view 1 is matched
  to teacher global view 2 and vice versa; a local crop is matched to both teacher global views (it is neither of
  them) and its two terms are averaged. The loss is the mean over the ``2 + num_local_crops`` views.
* **Optimisation.** AdamW (no weight decay on biases, norms, layer scales, tokens and position embeddings), the
  head at 10x the encoder learning rate (it starts from random weights, the encoder from good ones), per-iteration
  cosine schedule from ``learning_rate`` to 0 over all iterations (no warm-up), gradient norm clipped at 3.

The training loop is an Ignite :class:`~ignite.engine.Engine` with MONAI ``CheckpointSaver`` (every epoch) and
``CheckpointLoader`` (which loads with ``torch.load(..., weights_only=True)``), an Ignite ``ProgressBar`` and a
MONAI ``StatsHandler`` (iteration loss and epoch mean loss through this module's logger).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn
from transformers import Dinov2Model

from .network import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = [
    "FINETUNE_KIND",
    "MoCoBranch",
    "MultiCropAugment",
    "ProjectionHead",
    "ema_update",
    "finetune_encoder",
    "info_nce",
    "load_image_folder",
    "moco_loss",
]

FINETUNE_KIND = "moco-finetune"
PROVENANCE_FILE = "provenance.json"

GLOBAL_CROP_SCALE = (0.4, 1.0)
LOCAL_CROP_SCALE = (0.05, 0.4)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.2  # brightness, contrast and saturation factors drawn uniformly in [1 - JITTER, 1 + JITTER]
HEAD_HIDDEN_MULTIPLIER = 4  # head hidden width = 4 x encoder width
HEAD_LR_MULTIPLIER = 10.0
GRAD_CLIP_NORM = 3.0
_CHECKPOINT_RE = re.compile(r"moco_checkpoint_(?:epoch=)?(\d+)\.pt")  # MONAI CheckpointSaver names


# ----------------------------------------------------------------------------------------------------------------------
# model pieces
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


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``teacher = momentum * teacher + (1 - momentum) * student``.

    Floating-point buffers are copied from the student (DINOv2 and the head have none that matter). The two modules
    must have the same architecture.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student do not have the same parameters")
    for t, s in zip(t_params, s_params):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.copy_(s)


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
# augmentation
# ----------------------------------------------------------------------------------------------------------------------


class MultiCropAugment:
    """Multi-crop views of uint8 images (B, 3, S, S): 2 global + ``num_local_crops`` local, float in [0, 1].

    Each crop: random resized crop (area fraction in ``scale``, aspect ratio in 3/4-4/3, bilinear resize with
    anti-aliasing), horizontal flip with probability 1/2, brightness/contrast/saturation jitter. Randomness comes
    only from the ``generator`` passed to :meth:`__call__`.
    """

    def __init__(self, global_crop_size: int, local_crop_size: int, num_local_crops: int) -> None:
        self.global_crop_size = int(global_crop_size)
        self.local_crop_size = int(local_crop_size)
        self.num_local_crops = int(num_local_crops)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns (global views, local views): lists of (B, 3, size, size) float tensors in [0, 1]."""
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        glob = [self._views(images, self.global_crop_size, GLOBAL_CROP_SCALE, generator) for _ in range(2)]
        local = [
            self._views(images, self.local_crop_size, LOCAL_CROP_SCALE, generator) for _ in range(self.num_local_crops)
        ]
        return glob, local

    def _views(
        self, images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
    ) -> torch.Tensor:
        return torch.stack([self._view(img, size, scale, generator) for img in images])

    @staticmethod
    def _crop_box(height: int, width: int, scale: tuple[float, float], generator: torch.Generator):
        area = height * width
        log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        for _ in range(10):
            r = torch.rand(3, generator=generator).tolist()
            target = area * (scale[0] + (scale[1] - scale[0]) * r[0])
            ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r[1])
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                j = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return i, j, h, w
        # fallback: a central square crop of the largest allowed area
        side = max(1, round(math.sqrt(area * scale[1])))
        h, w = min(side, height), min(side, width)
        return (height - h) // 2, (width - w) // 2, h, w

    def _view(self, img: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator):
        _, height, width = img.shape
        i, j, h, w = self._crop_box(height, width, scale, generator)
        crop = img[None, :, i : i + h, j : j + w]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        flip, bright, contr, satur = torch.rand(4, generator=generator).tolist()
        if flip < 0.5:
            crop = crop.flip(-1)
        lo = 1.0 - JITTER
        crop = crop * (lo + 2 * JITTER * bright)
        grey = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2])[None]
        crop = grey.mean() + (crop - grey.mean()) * (lo + 2 * JITTER * contr)
        crop = grey + (crop - grey) * (lo + 2 * JITTER * satur)
        return crop.clamp_(0.0, 1.0)


def _normalise(views: torch.Tensor) -> torch.Tensor:
    mean = views.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = views.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views - mean) / std


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------


class _MoCoState:
    """Models, optimizer and augmentation of one fine-tuning run, plus :meth:`step` (one optimizer step)."""

    def __init__(
        self,
        encoder: Dinov2Model,
        projection_dim: int,
        learning_rate: float,
        weight_decay: float,
        temperature: float,
        ema_momentum: float,
        augment: MultiCropAugment,
        device: torch.device,
        seed: int,
    ) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded head initialisation, global RNG left untouched
            torch.manual_seed(seed)
            self.student = MoCoBranch(encoder, projection_dim).to(device).train()
        self.teacher = copy.deepcopy(self.student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.ema_momentum = ema_momentum
        self.augment = augment
        self.device = device
        self.optimizer = torch.optim.AdamW(self._param_groups(learning_rate, weight_decay), lr=learning_rate)
        self.base_lrs: list[float] = [g["lr"] for g in self.optimizer.param_groups]

    def _param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.student.named_parameters():
            is_head = name.startswith("head.")
            no_decay = p.ndim <= 1 or name.endswith(
                ("cls_token", "mask_token", "position_embeddings", "register_tokens")
            )
            groups.setdefault((is_head, not no_decay), []).append(p)
        return [
            {
                "params": params,
                "lr": lr * (HEAD_LR_MULTIPLIER if is_head else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            }
            for (is_head, decay), params in sorted(groups.items())
        ]

    def set_lr_factor(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        glob, local = self.augment(images, generator)
        b = images.shape[0]
        glob_px = _normalise(torch.cat(glob).to(self.device))
        with torch.no_grad():
            teacher = self.teacher(glob_px).split(b)
        student_global = self.student(glob_px).split(b)
        student_local = self.student(_normalise(torch.cat(local).to(self.device))).split(b) if local else []
        return moco_loss(student_global, student_local, teacher, self.temperature)

    def step(self, images: torch.Tensor, generator: torch.Generator) -> float:
        """One optimizer step on a batch of uint8 images (B >= 2), then the EMA update; returns the loss."""
        self.student.train()
        loss = self.loss(images.to(self.device), generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        ema_update(self.teacher, self.student, self.ema_momentum)
        return float(loss.detach())


class _RunRecord:
    """Checkpointed bookkeeping: the run's fingerprint (checked on resume) and the last epoch's mean loss."""

    def __init__(self, fingerprint: dict) -> None:
        self.fingerprint = fingerprint
        self.epoch_losses: list[float] = []

    def state_dict(self) -> dict:
        return {"fingerprint": dict(self.fingerprint), "epoch_losses": list(self.epoch_losses)}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved != self.fingerprint:
            diff = {k: (saved.get(k), self.fingerprint.get(k)) for k in set(saved) | set(self.fingerprint)}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise ValueError(
                f"the checkpoint was written by a different fine-tuning run (checkpoint vs now: {diff}); "
                "use another checkpoint_dir or empty it"
            )
        self.epoch_losses = [float(x) for x in state.get("epoch_losses", [])]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def _checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of the epoch checkpoints written by :func:`finetune_encoder` in ``checkpoint_dir``, newest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        m = _CHECKPOINT_RE.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(found, reverse=True)


def _newest_checkpoint(checkpoint_dir: str) -> str | None:
    """The readable checkpoint of the highest epoch in ``checkpoint_dir`` (a truncated file is skipped)."""
    for _, path in _checkpoints(checkpoint_dir):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (
            RuntimeError,
            OSError,
            EOFError,
            ValueError,
            pickle.UnpicklingError,
        ) as exc:  # truncated or otherwise unreadable: try the previous epoch
            logger.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
            continue
        return path
    return None


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
    if not 0.0 <= hp["ema_momentum"] <= 1.0:
        raise ValueError(f"ema_momentum must be in [0, 1], got {hp['ema_momentum']}")


def _make_trainer(
    state: _MoCoState,
    images: torch.Tensor,
    batch_size: int,
    epochs: int,
    seed: int,
    record: _RunRecord,
    checkpoint_dir: str | None,
) -> tuple[Engine, list]:
    """The Ignite engine: one iteration = one batch index (batches are drawn per epoch from ``(seed, epoch)``)."""
    from ignite.handlers import ProgressBar
    from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler

    n = images.shape[0]
    num_batches = max(1, math.ceil(n / batch_size))
    if n // num_batches < 2:
        num_batches = n // 2
    data = list(range(num_batches))
    total_iterations = epochs * num_batches
    run: dict = {"batches": [], "generator": None, "losses": []}

    def process(engine: Engine, batch_number: int) -> float:
        # per-iteration cosine schedule on the global iteration (1-based in Ignite; 0 for the first step)
        state.set_lr_factor(0.5 * (1.0 + math.cos(math.pi * (engine.state.iteration - 1) / total_iterations)))
        loss = state.step(images[run["batches"][batch_number]], run["generator"])
        run["losses"].append(loss)
        return loss

    trainer = Engine(process)

    @trainer.on(Events.EPOCH_STARTED)
    def _draw_epoch(engine: Engine) -> None:
        generator = _epoch_generator(seed, engine.state.epoch)
        perm = torch.randperm(n, generator=generator)
        # near-equal batches of at most batch_size (never a last batch of 1, which has no negatives)
        run["batches"] = list(torch.tensor_split(perm, num_batches))
        run["generator"] = generator
        run["losses"] = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_loss(engine: Engine) -> None:
        mean = float(np.mean(run["losses"])) if run["losses"] else float("nan")
        record.epoch_losses.append(mean)
        engine.state.metrics["epoch_loss"] = mean

    # epoch mean loss (engine.state.metrics["epoch_loss"]) through MONAI's StatsHandler logger (stdout, INFO);
    # the progress bar shows the iteration loss
    StatsHandler(tag_name="loss", iteration_log=False, output_transform=lambda x: x).attach(trainer)
    ProgressBar(persist=False).attach(trainer, output_transform=lambda x: {"loss": x})
    if checkpoint_dir is not None:
        save_dict = {
            "student": state.student,
            "teacher": state.teacher,
            "optimizer": state.optimizer,
            "trainer": trainer,
            "record": record,
        }
        os.makedirs(checkpoint_dir, exist_ok=True)
        newest = _newest_checkpoint(checkpoint_dir)
        if newest is not None:
            logger.info("resuming encoder fine-tuning from %s", newest)
            CheckpointLoader(load_path=newest, load_dict=save_dict, map_location=state.device).attach(trainer)
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

    return trainer, data


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
    augment = MultiCropAugment(global_crop_size, local_crop_size, num_local_crops)
    state = _MoCoState(
        encoder, projection_dim, learning_rate, weight_decay, temperature, ema_momentum, augment, dev, seed
    )
    fingerprint = {k: v for k, v in hyperparameters.items() if k != "epochs"}
    fingerprint.update(
        images=int(images.shape[0]), images_sha256=images_sha256, encoder_dir=os.path.abspath(encoder_dir)
    )
    record = _RunRecord(fingerprint)
    trainer, data = _make_trainer(state, images, batch_size, epochs, seed, record, checkpoint_dir)

    started: dict = {}
    # registered after the CheckpointLoader, so it sees the epoch the run resumes from
    trainer.add_event_handler(Events.STARTED, lambda e: started.update(epoch=e.state.epoch))
    logger.info(
        "fine-tuning the encoder %s on %d images for %d epochs (%d iterations each) on %s",
        encoder_dir,
        images.shape[0],
        epochs,
        len(data),
        dev,
    )
    train_start = time.perf_counter()
    trainer.run(data, max_epochs=epochs)
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
            "jitter": JITTER,
            "grad_clip_norm": GRAD_CLIP_NORM,
            "lr_schedule": "cosine per iteration to 0, no warm-up",
            "saved": "student encoder",
        },
        "images": int(images.shape[0]),
        "images_shape": list(images.shape),
        "images_sha256": images_sha256,
        "iterations_per_epoch": len(data),
        "resumed_from_epoch": int(started.get("epoch", 0)),
        "epochs_trained_this_run": int(epochs - started.get("epoch", 0)),
        "epoch_losses": record.epoch_losses,
        "final_loss": record.epoch_losses[-1] if record.epoch_losses else None,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "train_time_s": round(train_time, 3),
        "device": str(dev),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    _write_encoder(state.student.encoder, provenance, output_dir)
    logger.info("fine-tuned encoder written to %s (final loss %s)", output_dir, provenance["final_loss"])
    return output_dir


# ----------------------------------------------------------------------------------------------------------------------
# output and helpers
# ----------------------------------------------------------------------------------------------------------------------


def _write_encoder(encoder: Dinov2Model, provenance: dict, output_dir: str) -> None:
    """``save_pretrained`` + provenance.json into a temp sibling folder, then ``os.replace`` onto ``output_dir``."""
    target = Path(output_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        encoder.cpu().save_pretrained(tmp)
        with open(tmp / PROVENANCE_FILE, "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2, sort_keys=True)
            f.write("\n")
        for child in tmp.iterdir():
            if child.is_file():
                child.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists():
            logger.warning("replacing the unfinished folder %s", target)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
