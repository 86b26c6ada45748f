"""One self-training round on MONAI engines: a SupervisedTrainer on the current pseudo-labels, then a
SupervisedEvaluator that predicts the pool with the entropy and KNN-refinement handlers attached.

Under torchrun (see distributed.py) the trainer runs DDP on a DistributedSampler and the evaluator predicts each
rank's share of the pool; single-process runs are unchanged."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import pickle
import re

import numpy as np
import torch
from ignite.contrib.handlers import ProgressBar
from ignite.engine import Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler, from_engine
from monai.inferers import SimpleInferer
from monai.transforms import Compose, Lambdad
from monai.utils import set_determinism

from . import distributed
from .handlers import GradientClipHandler, KNNRefinementHandler, PixelEntropyHandler, RoundPredictions
from .inferers import FlipAveragingInferer
from .losses import loss_class
from .network import WithQueryOutputs
from .pool_store import RowItems
from .token_cache import TokenHead, token_training_transform

logger = logging.getLogger(__name__)


def _as_float_image(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def training_items(images: torch.Tensor, labels: torch.Tensor, indices=None) -> RowItems:
    """Dataset items: uint8 images (N, 3, S, S) and uint8 labels (N, S, S) -> dicts of image / label / index, for
    every image or only ``indices``, read lazily (the arrays may be pool_store.DiskArray files); ``append`` adds
    in-memory items after them."""
    return RowItems(images, labels, indices)


# the presets of medsmile.json's augmentation_presets, which its ``augmentation`` option picks as train_transforms
AUGMENTATIONS = ("flips", "strong")


def bundle_default(key: str):
    """medsmile.json's training part ``key`` with its default options (``pipeline.default_parts``): what callers outside
    the bundle config (benchmarks, tests) get when they pass none."""
    from .pipeline import default_parts

    return default_parts({}, keys=(key,))[key]


def build_transforms(transforms) -> list:
    """Fresh transforms from a config list: ``_mode_: "callable"`` partials (medsmile.json's lists) and classes are
    called, ready transforms are used as they are."""
    return [t() if isinstance(t, functools.partial) or inspect.isclass(t) else t for t in transforms]


def training_transform(transforms=None) -> Compose:
    """A round's training transform of items (uint8 image (3, S, S), label (1, S, S)): ``transforms`` (medsmile.json's
    ``train_transforms``, by default its "flips" preset: horizontal and vertical flips) between the fixed steps the
    network needs: first the image to float in [0, 1] and the label to long; after them the label back to long (an
    interpolating transform leaves it float) and the image clamped to [0, 1] (intensity jitter may leave it)."""
    transforms = bundle_default("train_transforms") if transforms is None else transforms
    return Compose(
        [
            Lambdad(keys="image", func=_as_float_image),
            Lambdad(keys="label", func=lambda x: x.long()),
            *build_transforms(transforms),
            Lambdad(keys="label", func=lambda x: x.long()),
            Lambdad(keys="image", func=lambda x: x.clamp(0, 1)),
        ]
    )


def round_epochs(num_items: int, batch_size: int, epochs: int, min_iterations: int) -> int:
    """``epochs``, raised so that a round trains at least ``min_iterations`` steps: a fresh Mask2Former needs a few
    hundred before it predicts anything but background (measured in benchmarks/README.md)."""
    per_epoch = max(1, num_items // batch_size)
    return max(epochs, math.ceil(min_iterations / per_epoch))


def call_with(part, *args, **runtime):
    """Call a config part (a ``_mode_: "callable"`` partial from the bundle config, or a class or function) with
    ``args`` and those of the ``runtime`` values its signature names and the config did not already set: the one rule
    by which the pipeline hands a swapped-in optimizer, scheduler, loss or network what it needs at run time."""
    try:
        params = inspect.signature(part).parameters
    except (TypeError, ValueError):  # no signature to read: pass nothing by name
        params = {}
    bound = part.keywords if isinstance(part, functools.partial) else {}
    extra = {k: v for k, v in runtime.items() if k in params and k not in bound}
    return part(*args, **extra)


def check_transform_list(key: str, steps) -> None:
    """A config list of transforms holds ``_mode_: "callable"`` partials or classes, never built objects: an object
    cannot be recorded with its arguments in run_config.json (a changed one would not count as a changed run), nor
    built again at another size (``call_with``). Refused as an option error naming ``key#i``."""
    if not isinstance(steps, (list, tuple)):
        raise TypeError(f"{key} must be a list of transforms, got {steps!r}")
    for i, step in enumerate(steps):
        if not (isinstance(step, functools.partial) or inspect.isclass(step)):
            raise ValueError(
                f'{key}#{i} is a {type(step).__name__} object: give it "_mode_": "callable" (as the lists in '
                "medsmile.json), so that the pipeline can build it and run_config.json records its arguments"
            )


def build_loss(name, network: torch.nn.Module, bootstrap: float = 0.0) -> torch.nn.Module:
    """The round's loss: ``name`` a config part (``loss_function`` in medsmile.json, called with the network and its
    class count as far as it takes them) or, for callers outside the bundle config, "mask2former" / "dicece"."""
    if callable(name):
        return call_with(name, network=network, num_classes=network.num_classes)
    return call_with(loss_class(name), network=network, num_classes=network.num_classes, bootstrap=bootstrap)


def build_optimizer(
    network: torch.nn.Module,
    learning_rate: float,
    head_learning_rate: float | None,
    weight_decay: float,
    freeze_backbone: bool,
    optimizer=None,
) -> torch.optim.Optimizer:
    """``optimizer`` (default AdamW with ``weight_decay``; medsmile.json's ``optimizer`` part) over two parameter
    groups: one learning rate for the pretrained DINOv2 backbone and one for the rest (feature pyramid and
    Mask2Former), which starts from random weights every round and needs larger steps to converge in a few hundred
    iterations. A frozen backbone is left out; ``head_learning_rate`` None means ``learning_rate`` for everything."""
    if freeze_backbone:
        network.backbone.requires_grad_(False)
    backbone = {id(p) for p in network.backbone.parameters()}
    head_lr = learning_rate if head_learning_rate is None else head_learning_rate
    groups = [
        {"params": [p for p in network.parameters() if p.requires_grad and id(p) in backbone], "lr": learning_rate},
        {"params": [p for p in network.parameters() if p.requires_grad and id(p) not in backbone], "lr": head_lr},
    ]
    params = [p for g in groups for p in g["params"]]
    # one fused kernel per step instead of a dozen element-wise ops per tensor (CPU and CUDA float parameters),
    # for an optimizer that has a fused kernel (AdamW, Adam, SGD) unless the config sets it
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if optimizer is None:
        optimizer = functools.partial(torch.optim.AdamW, weight_decay=weight_decay)
    return call_with(optimizer, [g for g in groups if g["params"]], fused=fused)


# the names by which a learning-rate scheduler takes the length of its schedule (CosineAnnealingLR, LinearLR /
# PolynomialLR, OneCycleLR): a scheduler from the config gets the round's iteration count under its own name
SCHEDULE_LENGTH_ARGS = ("T_max", "total_iters", "total_steps")


def train_round(
    network: torch.nn.Module,
    items: list[dict],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    grad_clip_norm: float,
    device: torch.device,
    checkpoint_dir: str,
    num_workers: int = 0,
    loss: str = "mask2former",
    seed: int = 0,
    freeze_backbone: bool = False,
    head_learning_rate: float | None = None,
    transforms=None,
    bootstrap_targets: float = 0.0,
    token_views: bool = False,
    consistency=None,
    optimizer=None,
    lr_scheduler=None,
    handlers=(),
) -> dict:
    """Train ``network`` in place with AdamW, cosine annealing per iteration, grad clipping and CE + Dice.

    ``loss``: "mask2former" (its set loss + CE + Dice on the semantic map, see losses.py), "dicece" (CE + Dice on
    the semantic map only) or a config part called with the network (``build_loss``). ``optimizer`` and
    ``lr_scheduler``: config parts that replace AdamW (``build_optimizer``) and the cosine schedule (called with the
    optimizer and the round's iteration count, ``SCHEDULE_LENGTH_ARGS``), stepped per iteration. ``handlers``: more
    train handlers (medsmile.json's ``train_handlers``: loss logging) attached after the ones the round needs
    (schedule, clipping, epoch checkpoints). ``freeze_backbone`` keeps the pretrained DINOv2 fixed and trains the
    feature pyramid and Mask2Former only: half the CPU time per step (no backward through the ViT) and no drift of the features
    towards the noise of the pseudo-labels. ``learning_rate`` is the backbone's, ``head_learning_rate`` the rest's
    (see ``build_optimizer``). ``bootstrap_targets`` mixes the network's own prediction into the targets (losses.py).
    ``transforms``: the training transforms (medsmile.json's ``train_transforms``, see ``training_transform``).
    ``token_views``: the items' images are cached token views of a frozen backbone (token_cache.py), so each step
    runs the head only; ``transforms`` must then be flips only (``token_flips``), each the choice of a mirrored view.
    ``consistency``: a ``consistency.ConsistencyStep`` that runs each iteration instead (``items`` are then its
    pseudo-labelled stream) and whose teacher is checkpointed with the rest.
    Saves a checkpoint every epoch in ``checkpoint_dir`` and resumes from the newest one found there, so a crash
    inside a round costs at most one epoch.
    """
    if token_views and not freeze_backbone:
        raise ValueError("cached token views need freeze_backbone")
    if consistency is not None and not token_views:
        raise ValueError("consistency round training runs on cached token views (token_views=True)")
    transform = token_training_transform(transforms) if token_views else training_transform(transforms)
    loader = distributed.train_loader(Dataset(items, transform=transform), batch_size, num_workers, seed=seed)
    optimizer = build_optimizer(network, learning_rate, head_learning_rate, weight_decay, freeze_backbone, optimizer)
    total_steps = max(1, epochs * len(loader))
    scheduler = call_with(
        lr_scheduler or torch.optim.lr_scheduler.CosineAnnealingLR,
        optimizer,
        **dict.fromkeys(SCHEDULE_LENGTH_ARGS, total_steps),
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=loader,
        # DDP under torchrun; checkpoints hold the bare network
        network=distributed.wrap_model(WithQueryOutputs(network, tokens=token_views)),
        optimizer=optimizer,
        loss_function=build_loss(loss, network, bootstrap_targets),
        inferer=SimpleInferer(),
        decollate=False,
        iteration_update=consistency,
        train_handlers=[LrScheduleHandler(lr_scheduler=scheduler, print_lr=False, epoch_level=False), *handlers],
    )
    GradientClipHandler(grad_clip_norm).attach(trainer)
    ProgressBar(desc="train", persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))
    save_dict = {"network": network, "optimizer": optimizer, "lr": scheduler, "trainer": trainer}
    if consistency is not None:
        save_dict["teacher"] = consistency.teacher
    last = latest_checkpoint(checkpoint_dir)
    if last:
        logger.info("resuming round training from %s", last)
        CheckpointLoader(load_path=last, load_dict=save_dict, map_location=device).attach(trainer)
    CheckpointSaver(save_dir=checkpoint_dir, save_dict=save_dict, save_interval=1, n_saved=1, epoch_level=True).attach(
        trainer
    )

    def reseed(engine):
        set_determinism(seed=seed * 1000 + engine.state.epoch)
        transform.set_random_state(seed=seed * 1000 + engine.state.epoch)

    trainer.add_event_handler(Events.EPOCH_STARTED, reseed)
    if consistency is not None:
        consistency.attach(trainer)  # after reseed: its streams draw from the reseeded generators
    losses = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    return {"epochs": epochs, "iterations": trainer.state.iteration, "last_epoch_loss": losses}


def latest_checkpoint(folder: str, prefix: str = "") -> str | None:
    """Newest epoch checkpoint that MONAI's ``CheckpointSaver`` (``file_prefix=prefix``) wrote in ``folder`` and that
    loads, by the epoch in its name (``[<prefix>_]<key>_epoch=<N>.pt``), then by time. The saver writes in place (not
    atomically), so a crash during a save can leave a truncated newest file: it is removed and the previous one used."""
    if not os.path.isdir(folder):
        return None
    start = f"{prefix}_" if prefix else ""
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(start) and f.endswith(".pt")]

    def newness(path: str) -> tuple[int, float]:
        epoch = re.search(r"(\d+)\.pt$", os.path.basename(path))
        return (int(epoch.group(1)) if epoch else -1, os.path.getmtime(path))

    for path in sorted(files, key=newness, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:  # truncated or corrupt
            logger.warning("discarding unreadable checkpoint %s (%s)", path, err)
            if distributed.is_main():  # every rank skips it; rank 0 alone writes
                os.remove(path)
    return None


def predict_and_refine(
    network: torch.nn.Module,
    images: torch.Tensor,
    global_features: np.ndarray,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    quantile: float,
    k: int,
    refine: bool = True,
    exact_limit: int = 50_000,
    probs=None,
    flip_average: bool = False,
    token_views: bool = False,
    handlers=(),
) -> RoundPredictions:
    """Predict every pool image with an Ignite evaluator; entropy per image; KNN refinement at the end.

    ``probs``: where the (N, C, S, S) float16 probability maps go (default: a tensor in RAM). ``flip_average``:
    predict with ``FlipAveragingInferer`` (mean of the four mirrored views) instead of one forward pass.
    ``token_views``: ``images`` holds each image's cached token views (N, 4, D, h, w) (token_cache.py) and the
    head alone predicts, from the identity view or, with ``flip_average``, from all four. ``handlers``: more
    evaluator handlers (medsmile.json's ``val_handlers``: a log of the round's prediction) attached after the round's
    own, so they see its metrics (``mean_pixel_entropy``, ``refined_images``)."""
    if token_views:
        size = images.shape[-1] * network.patch_size
        select = (lambda x: x.float()) if flip_average else (lambda x: x[0].float())
        dataset = Dataset(RowItems(images), transform=Lambdad(keys="image", func=select))
        network, inferer = TokenHead(network), SimpleInferer()
    else:
        size = images.shape[-1]
        dataset = Dataset(RowItems(images), transform=Lambdad(keys="image", func=_as_float_image))
        inferer = FlipAveragingInferer() if flip_average else SimpleInferer()
    predictions = RoundPredictions.empty(len(images), num_classes, size, probs=probs)
    loader = distributed.shard_loader(dataset, batch_size)
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=loader, network=network, inferer=inferer, decollate=False
    )
    ProgressBar(desc="predict", persist=False).attach(evaluator)
    PixelEntropyHandler(predictions).attach(evaluator)
    if refine:
        KNNRefinementHandler(predictions, global_features, quantile, k, exact_limit).attach(evaluator)
    for handler in handlers:
        handler.attach(evaluator)
    evaluator.run()
    return predictions
