"""Consistency-regularised round training (``round_training="consistency"``, issue 33): weak-to-strong consistency
with an EMA teacher in the manner of UniMatch (Yang et al., CVPR 2023) and UniMatch V2 (a DINOv2 encoder, an EMA
teacher), on top of MedSMILE's rounds.

A round still starts a fresh network and trains on the cached token views (token_cache.py). Each iteration is one
optimizer step on the sum of three streams, all through ONE forward of the student (one DDP forward per step):

* labelled: every reference with its true label, in every batch, randomly mirrored (the only ground truth, never
  drowned out by a large pool);
* pseudo-labelled: the round's usual batch of pool images with the previous round's labels (the main loader of
  ``training.train_round``). Per-pixel confidence of those labels is not kept between rounds (a resumed run only has
  the label files), so this stream is not confidence-weighted; its confidence threshold is the one the labels already
  carry: ``ignore_uncertain_pixels`` marks the least certain pixels of each class ``IGNORE_LABEL`` when they are made
  and the loss skips them (0 by default: every pixel counts);
* consistency: ``pool_images`` pool images per step (a second loader over the whole pool, restarted every epoch).
  The teacher, an exponential moving average of the student (Ignite's ``EMAHandler``), predicts their weak view
  (cached tokens of a random mirror); pixels whose maximum class probability reaches ``threshold`` become hard
  targets. The student learns them on (a) a strong view: the mirrored image with colour, contrast and grey jitter
  and blur (MONAI transforms, medsmile.json's ``consistency_strong_transforms``), then CutMix between the pool
  images of the batch with the targets mixed alike; its pixels changed, so the frozen ViT computes its tokens (no
  gradient); and (b) the weak view's tokens under channel dropout (UniMatch's feature perturbation).

loss = labelled + pseudo_weight x pseudo + consistency_weight x (strong + feature-perturbed) / 2.

The teacher, not the student, predicts the pool at the end of the round and is the round's model. A round's epoch
checkpoint holds the teacher beside the student, optimiser, scheduler and trainer; every random draw of an epoch
(mirrors, boxes, jitter, dropout, the pool streams' order) comes from the seed and the epoch number
(``train_round`` reseeds at each epoch start, this module reseeds its own streams right after), so a run resumed from
an epoch checkpoint continues as if never stopped. Under torchrun each rank keeps its own teacher of the DDP student
(the same weights on every rank, since DDP keeps the students equal).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.data import Dataset
from monai.engines.utils import IterationEvents
from monai.transforms import Compose, Lambda
from monai.utils import CommonKeys

from . import distributed
from .losses import IGNORE_LABEL, Mask2FormerSemanticLoss
from .pool_store import RowItems
from .token_cache import TOKEN_VIEWS
from .training import build_transforms, bundle_default

ROUND_TRAININGS = ("pseudo_labels", "consistency")
CONSISTENCY_LOSSES = ("round", "cross_entropy")
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma


def confidence_mask(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) class probabilities -> hard targets (B, H, W) (the argmax) and the pixels whose maximum
    probability is at least ``threshold`` (B, H, W) bool."""
    confidence, target = probs.max(dim=1)
    return target, confidence >= threshold


def teacher_momentum(iteration: int, momentum: float) -> float:
    """Ignite's EMA momentum (the student's share, 1 - the teacher's) after ``iteration`` (1-based) steps.

    The teacher keeps ``momentum`` of itself, except early on: its share is at most 1 - 1/t (UniMatch V2), so for
    the first 1 / (1 - momentum) steps it is the plain mean of the students so far and never carries the random
    initial head that a fixed momentum would leave in it (0.99^200 = 13 % after a 200-step round)."""
    return max(1.0 - momentum, 1.0 / max(iteration, 1))


def cutmix_boxes(
    n: int, size: int, prob: float = 0.5, area: tuple[float, float] = (0.02, 0.4), ratio: float = 0.3
) -> torch.Tensor:
    """(n, size, size) bool boxes, drawn from torch's global generator: with probability ``prob`` a rectangle of
    ``area`` (fraction of the image, uniform) and aspect ratio (height / width) in [ratio, 1 / ratio], placed
    uniformly inside the image; otherwise no box (UniMatch's CutMix boxes)."""
    boxes = torch.zeros((n, size, size), dtype=torch.bool)
    for i in range(n):
        if torch.rand(()) >= prob:
            continue
        a = float(torch.empty(()).uniform_(*area)) * size * size
        r = float(torch.empty(()).uniform_(ratio, 1 / ratio))
        h, w = (min(size, max(1, round(math.sqrt(a * r)))), min(size, max(1, round(math.sqrt(a / r)))))
        y, x = int(torch.randint(0, size - h + 1, ())), int(torch.randint(0, size - w + 1, ()))
        boxes[i, y : y + h, x : x + w] = True
    return boxes


def cutmix(
    images: torch.Tensor, targets: torch.Tensor, confident: torch.Tensor, boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix of a batch with itself: inside ``boxes[i]`` image i (and its target and confidence, (B, H, W)) takes
    the pixels of image i - 1 (the batch rolled by one, so each image gets another one's content when B >= 2).

    Not MONAI's ``CutMix``/``CutMixd``: those draw one box corner for the whole batch, size the box from a Beta
    weight and clip it at the border (so the mixed area is not the drawn one), and pair images by a random
    permutation that can pair an image with itself; here each image has its own box, drawn as UniMatch draws it
    (``cutmix_boxes``), and the segmentation targets and their confidence follow the pixels exactly."""
    partner = [torch.roll(t, 1, dims=0) for t in (images, targets, confident)]
    inside = boxes.to(images.device)
    return (
        torch.where(inside[:, None], partner[0], images),
        torch.where(inside, partner[1], targets),
        torch.where(inside, partner[2], confident),
    )


def grey(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) image's ITU-R 601 luma in all three channels (the strong view's grey step)."""
    weights = torch.tensor(_GREY, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True).expand_as(image)


def strong_transform(transforms=None) -> Compose:
    """The strong view's pixel jitter of one (3, H, W) image in [0, 1]: ``transforms`` (medsmile.json's
    ``consistency_strong_transforms``, by default UniMatch's colour jitter p 0.8, grey p 0.2, blur p 0.5 from MONAI
    transforms: per-channel intensity scale (colour), contrast (gamma), brightness shift, grey, Gaussian blur with sigma
    0.1-2 px), then clamped to [0, 1]. CutMix follows in ``ConsistencyStep`` (it mixes images of the batch)."""
    transforms = bundle_default("consistency_strong_transforms") if transforms is None else transforms
    return Compose([*build_transforms(transforms), Lambda(func=lambda x: torch.as_tensor(x).clamp(0, 1))])


def confident_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, C, H, W) log-probabilities on the ``confident`` pixels of ``target`` (B, H, W), summed and
    divided by ALL pixels (UniMatch's normalisation): a batch with few confident pixels pulls little."""
    ce = F.nll_loss(log_probs, target, reduction="none")
    return (ce * confident).sum() / confident.numel()


def confident_targets(target: torch.Tensor, confident: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """The teacher's hard targets (B, H, W) as label maps (B, 1, H, W) whose unconfident pixels are ``IGNORE_LABEL``,
    and per image the classes the teacher predicts there (confident or not): a lesion the teacher sees but is not
    sure of in every pixel stays an object of the set loss instead of becoming "no lesion here"."""
    label = target.where(confident, torch.full_like(target, IGNORE_LABEL))[:, None]
    return label, [torch.unique(t).tolist() for t in target]


def confident_round_loss(
    loss_function, pred: tuple, target: torch.Tensor, confident: torch.Tensor, rows: slice
) -> torch.Tensor:
    """The round's own loss (``training.build_loss``) on the ``confident`` pixels of the teacher's ``target``
    (B, H, W), for ``rows`` of the step's one forward ``pred`` = (log_probs, per-query outputs), times the confident
    fraction of the stream's pixels: UniMatch's normalisation by all pixels (a batch with few confident pixels pulls
    little), on the scale of the labelled and pseudo-labelled streams' loss (the set loss is ~100x a pixel CE).
    Images without a confident pixel give nothing."""
    log_probs, queries = pred
    keep = confident.flatten(1).any(1)
    if not keep.any():
        return log_probs.sum() * 0.0
    index = torch.arange(rows.start, rows.stop, device=keep.device)[keep]
    label, classes = confident_targets(target[keep], confident[keep])
    if isinstance(loss_function, Mask2FormerSemanticLoss):
        loss = loss_function((log_probs[index], queries), label, rows=index, present=classes)
    else:
        loss = loss_function(log_probs[index], label)
    return loss * confident.float().mean()


class ConsistencyStep:
    """A SupervisedTrainer's ``iteration_update`` for a consistency round (module docstring), with its teacher.

    ``references``: (R, V, D, h, w) token views and (R, S, S) labels of the labelled stream (R may be 0).
    ``pool_tokens`` (N, V, D, h, w) and ``pool_images`` (N, 3, S, S) uint8: the whole pool (tensors or DiskArrays),
    the consistency stream's source, ``pool_images`` of them per step (the global count under torchrun: each rank
    takes its share). ``pseudo_weight``, ``consistency_weight``: the stream weights; ``threshold``: the teacher's
    confidence for a target; ``ema_momentum``: the teacher's own share per step; ``feature_dropout``: channel
    dropout of the feature-perturbed view; ``strong_transforms``: the strong view's pixel jitter (``strong_transform``);
    ``bf16``: the strong view's ViT under bf16 autocast where supported.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        references: tuple[torch.Tensor, torch.Tensor],
        pool_tokens,
        pool_images,
        pool_images_per_step: int = 2,
        pseudo_weight: float = 1.0,
        consistency_weight: float = 1.0,
        threshold: float = 0.95,
        ema_momentum: float = 0.99,
        feature_dropout: float = 0.5,
        loss: str = "round",
        strong_transforms=None,
        bf16: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ):
        self.network = network
        self.ref_tokens, self.ref_labels = references
        self.pool_images = pool_images
        self.pseudo_weight, self.consistency_weight = pseudo_weight, consistency_weight
        self.threshold, self.ema_momentum, self.feature_dropout = threshold, ema_momentum, feature_dropout
        self.bf16 = bf16
        if loss not in CONSISTENCY_LOSSES:
            raise ValueError(f"consistency_loss={loss!r} must be one of {CONSISTENCY_LOSSES}")
        self.loss = loss
        self.ema = EMAHandler(network, momentum=1.0 - ema_momentum)
        self.teacher = self.ema.ema_model
        self.teacher.requires_grad_(False)
        self.loader = distributed.train_loader(
            Dataset(RowItems(pool_tokens)), pool_images_per_step, num_workers, seed=seed + 1
        )
        self.strong = strong_transform(strong_transforms)
        self._unlabelled = None
        self._sums: dict[str, float] = {}
        self.epoch_means: list[dict] = []  # per epoch of this invocation: mean stream losses and confident fraction

    def attach(self, trainer: Engine) -> None:
        """Restart the pool stream at each epoch start (after ``train_round`` reseeds) and update the teacher after
        each step; call after ``train_round``'s own EPOCH_STARTED handler."""
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

        def momentum(engine):
            engine.state.ema_momentum = teacher_momentum(engine.state.iteration, self.ema_momentum)

        trainer.add_event_handler(Events.ITERATION_COMPLETED, momentum)
        self.ema.attach(trainer, name="ema_momentum", warn_if_exists=False)

    def _epoch_started(self, engine: Engine) -> None:
        self.strong.set_random_state(seed=int(torch.randint(2**31, ())))
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.epoch)
        self._unlabelled = iter(self.loader)

    def _epoch_completed(self, engine: Engine) -> None:
        steps = self._sums.pop("steps", 1)
        self.epoch_means.append({"epoch": engine.state.epoch, **{k: v / steps for k, v in self._sums.items()}})
        self._sums = {}

    def _next_unlabelled(self) -> dict:
        """The next pool batch, the pool stream cycling when a round has more steps than it has batches."""
        try:
            return next(self._unlabelled)
        except StopIteration:
            self._unlabelled = iter(self.loader)
            return next(self._unlabelled)

    def finished_teacher(self) -> torch.nn.Module:
        """The teacher to predict with and save. Its backbone is the frozen one: the student's weights are copied
        back, undoing the float rounding that averaging identical weights leaves."""
        self.teacher.backbone.load_state_dict(self.network.backbone.state_dict())
        return self.teacher.eval()

    @staticmethod
    def _mirrored_views(tokens: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """One random mirrored view per item of (B, V, D, h, w) token views: (B, D, h, w) float and its flip dims."""
        views = torch.randint(len(TOKEN_VIEWS), (len(tokens),))
        grids = tokens[torch.arange(len(tokens)), views].float()
        return grids, [TOKEN_VIEWS[v] for v in views.tolist()]

    def _strong_view(self, index: torch.Tensor, dims: list[tuple[int, ...]], device) -> torch.Tensor:
        pixels = torch.as_tensor(self.pool_images[index.cpu().numpy()]).float() / 255.0
        out = [torch.as_tensor(self.strong(p.flip(d) if d else p)) for p, d in zip(pixels, dims, strict=True)]
        return torch.stack(out).to(device)

    def __call__(self, engine: Engine, batch: dict) -> dict:
        device = engine.state.device
        pseudo_x, pseudo_y = batch["image"].to(device), batch["label"].to(device).long()
        ref_x, ref_dims = self._mirrored_views(self.ref_tokens)
        ref_y = torch.stack([y.flip(d) if d else y for y, d in zip(self.ref_labels, ref_dims, strict=True)])
        ref_x, ref_y = ref_x.to(device), ref_y[:, None].long().to(device)
        pool = self._next_unlabelled()
        weak, dims = self._mirrored_views(pool["image"])
        weak = weak.to(device)
        with torch.no_grad():
            target, confident = confidence_mask(self.teacher.forward_tokens(weak).exp(), self.threshold)
            boxes = cutmix_boxes(len(weak), target.shape[-1])
            strong, strong_target, strong_confident = cutmix(
                self._strong_view(pool["index"], dims, device), target, confident, boxes
            )
            strong = self.network.backbone_tokens(strong, bf16=self.bf16)
        perturbed = F.dropout2d(weak, self.feature_dropout, training=True)

        n_ref, n_pseudo, n_pool = len(ref_x), len(pseudo_x), len(weak)
        inputs = torch.cat([ref_x, pseudo_x, strong, perturbed])
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pred, queries = engine.network(inputs)  # network.WithQueryOutputs (under DDP)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        rows = np.cumsum([0, n_ref, n_pseudo, n_pool, n_pool])
        parts = {
            "loss_labelled": self._supervised(engine, (pred, queries), ref_y, slice(rows[0], rows[1])),
            "loss_pseudo": self._supervised(engine, (pred, queries), pseudo_y, slice(rows[1], rows[2])),
            "loss_strong": self._consistency(engine, (pred, queries), strong_target, strong_confident, rows[2:4]),
            "loss_perturbed": self._consistency(engine, (pred, queries), target, confident, rows[3:5]),
        }
        loss = (
            parts["loss_labelled"]
            + self.pseudo_weight * parts["loss_pseudo"]
            + self.consistency_weight * (parts["loss_strong"] + parts["loss_perturbed"]) / 2
        )
        engine.state.output = {
            CommonKeys.IMAGE: inputs,
            CommonKeys.LABEL: pseudo_y,
            CommonKeys.PRED: pred,
            CommonKeys.LOSS: loss,
            **{k: v.detach() for k, v in parts.items()},
            "confident_fraction": confident.float().mean(),
        }
        for key in (*parts, "confident_fraction"):
            self._sums[key] = self._sums.get(key, 0.0) + engine.state.output[key].item()
        self._sums["steps"] = self._sums.get("steps", 0) + 1
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _consistency(self, engine: Engine, pred: tuple, target, confident, bounds) -> torch.Tensor:
        """One consistency view's loss on rows ``bounds[0]:bounds[1]`` of the step's forward (``consistency_loss``)."""
        rows = slice(int(bounds[0]), int(bounds[1]))
        if self.loss == "cross_entropy":
            return confident_cross_entropy(pred[0][rows], target, confident)
        return confident_round_loss(engine.loss_function, pred, target, confident, rows)

    @staticmethod
    def _supervised(engine: Engine, pred: tuple, label: torch.Tensor, rows: slice) -> torch.Tensor:
        """The round's loss (``training.build_loss``) on ``rows`` of the step's one forward, ``pred`` its
        (log_probs, per-query outputs); 0 for no rows."""
        log_probs, queries = pred
        if rows.stop == rows.start:
            return log_probs.sum() * 0.0
        loss = engine.loss_function
        if isinstance(loss, Mask2FormerSemanticLoss):
            return loss((log_probs[rows], queries), label, rows=rows)
        return loss(log_probs[rows], label)
