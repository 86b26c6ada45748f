"""The files that describe a trained model, beside its weights: what size it was trained at, what its classes are
called, which run made it; and the publishing of a run's model into the bundle's ``models/`` folder.

``models/`` is what ``configs/inference.json``, MONAI Label and MONAI Deploy read; every run also keeps its own copy
in ``<output_dir>/model``. A model in ``models/`` that another run made is moved to ``models/previous/`` before it is
replaced, never overwritten silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence

from .atomic_files import atomic_path

logger = logging.getLogger(__name__)

NETWORK_FILE = "network.json"
METADATA_FILE = "metadata.json"
PREVIOUS_DIR = "previous"
# keys of network.json that describe the model rather than build it (network_from_file leaves them out)
RECORD_KEYS = ("image_size", "label_names", "trained_by", "pool_transforms")
BUNDLE_METADATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", METADATA_FILE)
LEGACY_IMAGE_SIZE = 224  # what inference.json used before network.json recorded the training size


def label_names(num_classes: int, names: Sequence[str] | str | None = None) -> list[str]:
    """One name per class, background first: the given ones (a list, or a comma-separated string from the command
    line), else ["background", "lesion"] for 2 classes and ["background", "class_1", ...] otherwise."""
    if names is None:
        return (
            ["background", "lesion"]
            if num_classes == 2
            else ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        )
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ValueError(f"label_names={names} must name all {num_classes} classes (num_classes), background first")
    if any(not n.strip() for n in names) or len({n.lower() for n in names}) != len(names):
        raise ValueError(f"label_names={names} must be non-empty and distinct (case-insensitive)")
    return names


def read_network_record(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: it is written beside models/model.pt by a MedSMILE run (configs/medsmile.json)"
        )
    with open(path) as f:
        return json.load(f)


def preprocessing_warning(record: dict, path: str | os.PathLike) -> str | None:
    """A model trained with swapped ``pool_transforms`` records them in its network.json (``pool_transforms``, as
    run_config.json describes them); inference.json, evaluate.json, MONAI Label and Deploy apply the default steps, so
    its predictions would be made on inputs unlike its training ones: the text that says so, or None."""
    if "pool_transforms" not in record:
        return None
    steps = ", ".join(step.get("_target_", "?").rsplit(".", 1)[-1] for step in record["pool_transforms"])
    return (
        f"{path}: this model was trained with its own pool_transforms ({steps}), but inference.json and the other "
        "configs apply the default preprocessing (IntensityToRGBd, ResizePlanesd): change their 'preprocessing' "
        "alike before trusting its predictions"
    )


def trained_image_size(network_config: str | os.PathLike) -> int:
    """The image size the model was trained at, from its ``network.json`` (inference.json's default ``image_size``).
    A network.json written before the size was recorded gives the old fixed 224, with a warning."""
    record = read_network_record(network_config)
    if "image_size" not in record:
        logger.warning(
            "%s records no image_size (exported before it was recorded): using %d; pass --image_size N if the model "
            "was trained at another size",
            network_config,
            LEGACY_IMAGE_SIZE,
        )
        return LEGACY_IMAGE_SIZE
    return int(record["image_size"])


def run_metadata(base: dict, num_classes: int, image_size: int, names: Sequence[str]) -> dict:
    """The bundle's metadata.json with one run's values: input/output spatial shape, output channels and a
    ``channel_def`` naming every class (what MONAI Label and the Deploy app's DICOM SEG take the labels from)."""
    meta = json.loads(json.dumps(base))
    shape = [int(image_size), int(image_size)]
    fmt = meta["network_data_format"]
    for spec in fmt["inputs"].values():
        spec["spatial_shape"] = shape
    for spec in fmt["outputs"].values():
        spec.update(num_channels=int(num_classes), spatial_shape=shape)
        spec["channel_def"] = {str(i): name for i, name in enumerate(names)}
    if isinstance(meta.get("image_classes"), str):
        meta["image_classes"] = re.sub(r"\b\d+x\d+\b", f"{image_size}x{image_size}", meta["image_classes"])
    meta["label_classes"] = "single-channel label map: " + ", ".join(f"{i} {n}" for i, n in enumerate(names))
    meta["pred_classes"] = f"{num_classes} channels: " + ", ".join(names)
    return meta


def _previous_name(models_dir: str, record: dict | None) -> str:
    """``<fingerprint>`` of the run that made the model (one folder per configuration), else a new
    ``unrecorded-<time of its newest file>[-n]``."""
    trained_by = (record or {}).get("trained_by") or {}
    if trained_by.get("fingerprint"):
        return str(trained_by["fingerprint"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(_newest_mtime(models_dir)))
    name, n = f"unrecorded-{stamp}", 1
    while os.path.exists(os.path.join(models_dir, PREVIOUS_DIR, name)):
        n += 1
        name = f"unrecorded-{stamp}-{n}"
    return name


def _newest_mtime(models_dir: str) -> float:
    times = [os.path.getmtime(os.path.join(models_dir, n)) for n in os.listdir(models_dir)]
    return max(times, default=time.time())


def _published_record(network_file: str) -> dict | None:
    """network.json of the model in models/ (None: none there; {}: unreadable, so its run is unknown)."""
    if not os.path.isfile(network_file):
        return None
    try:
        record = read_network_record(network_file)
    except (OSError, ValueError) as err:
        logger.warning("%s is unreadable (%s): the model beside it counts as of an unknown run", network_file, err)
        return {}
    return record if isinstance(record, dict) else {}


def publish_model(run_model_dir: str, models_dir: str, model_stem: str, trained_by: dict) -> dict:
    """Copy a run's model files (``<model_stem>.pt``, ``.ts``, network.json, metadata.json: those in
    ``run_model_dir``; network.json last) into ``models_dir``.

    Files of that set already in ``models_dir`` that another run made, or whose run is not recorded, are first moved
    to ``models_dir/previous/<that run's fingerprint>/`` (an older copy of the same fingerprint there is replaced: same
    configuration). The same run exporting again replaces its own files. Returns what was done, for summary.json."""
    names = [f"{model_stem}.pt", f"{model_stem}.ts", METADATA_FILE, NETWORK_FILE]
    files = [n for n in names if os.path.isfile(os.path.join(run_model_dir, n))]
    os.makedirs(models_dir, exist_ok=True)
    present = [n for n in names if os.path.isfile(os.path.join(models_dir, n))]
    record = _published_record(os.path.join(models_dir, NETWORK_FILE))
    previous = None
    same_run = record is not None and record.get("trained_by") == trained_by
    if present and not same_run:
        target = os.path.join(models_dir, PREVIOUS_DIR, _previous_name(models_dir, record))
        if os.path.isdir(target):
            logger.warning("replacing %s (a model of the same configuration kept earlier)", target)
            shutil.rmtree(target)
        os.makedirs(target)
        for name in present:
            os.replace(os.path.join(models_dir, name), os.path.join(target, name))
        previous = {"trained_by": (record or {}).get("trained_by"), "moved_to": target}
        logger.warning(
            "%s held the model of another run (%s): moved to %s",
            models_dir,
            previous["trained_by"] or "run not recorded",
            target,
        )
    elif same_run:
        for name in present:
            if name not in files:
                os.remove(os.path.join(models_dir, name))
    for name in [n for n in files if n != NETWORK_FILE] + [NETWORK_FILE]:
        with atomic_path(os.path.join(models_dir, name)) as tmp:
            shutil.copyfile(os.path.join(run_model_dir, name), tmp)
    logger.info(
        "%s now holds the model of run %s (fingerprint %s)",
        models_dir,
        trained_by.get("output_dir"),
        trained_by.get("fingerprint"),
    )
    return {"published_to": os.path.abspath(models_dir), "previous": previous}
