"""The unlabelled pool: every 2-D image (volume slices included), kept as uint8 at the encoder and training sizes.

Inputs come from a folder or a MONAI datalist JSON; reading goes through ``image_io`` (MONAI readers, size checks,
volume slicing), then each 2-D image through the pool's steps (medsmile.json's ``pool_transforms``, a MONAI transform
list: intensity window -> RGB -> resize by default, the transforms inference.json uses). Images are held once at the
round-0 feature size and once at the training size, so later rounds never re-read the files: in RAM, or streamed to
files as they are read (``pool_store``), so that RSS does not grow with the pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, Resize
from monai.utils import convert_to_tensor

from .image_io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, Case, check_image_size, list_inputs, read_planes
from .pool_store import ArrayStore, RowCollector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolItem:
    """One 2-D image of the pool: which case, which slice, and its native size (MONAI spatial order)."""

    case: int
    slice: int
    native_shape: tuple[int, int]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def resize_image(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(3, X, Y) float in [0, 1] -> (3, size, size) float, bilinear with anti-aliasing (MONAI Resize)."""
    resize = Resize(spatial_size=(size, size), mode="bilinear", anti_aliasing=True)
    return torch.as_tensor(resize(torch.as_tensor(image, dtype=torch.float32))).clamp(0, 1)


def default_pool_transforms() -> list:
    """medsmile.json's ``pool_transforms`` (the one place they are written), for a pool built without the config."""
    from .pipeline import default_parts  # here, not at the top: the pipeline imports this module

    return default_parts({})["pool_transforms"]


def sized_transform(steps: Sequence, size: int) -> Compose:
    """The pool's steps (``pool_transforms``: dictionary transforms on the key "image", each a ``_mode_: "callable"``
    partial or a class, ``training.check_transform_list``) as one MONAI ``Compose`` at ``size``: a step that takes a
    ``size`` (``ResizePlanesd``) is given the round-0 feature size or the training size (``training.call_with``)."""
    from .training import call_with, check_transform_list

    check_transform_list("pool_transforms", steps)
    built = [call_with(step, size=size) for step in steps]
    return Compose(built)


def preprocess(transform: Compose, plane: torch.Tensor, size: int) -> torch.Tensor:
    """One 2-D plane (``image_io.read_planes``) through the pool's steps at ``size``: float (3, size, size) in
    [0, 1]; steps that give another shape are refused, naming the file."""
    image = convert_to_tensor(transform({"image": plane})["image"], track_meta=False)
    if tuple(image.shape) != (3, size, size) or not image.is_floating_point():
        name = getattr(plane, "meta", {}).get("filename_or_obj", "a pool image")
        raise ValueError(
            f"{name}: pool_transforms gave a {image.dtype} image of shape {tuple(image.shape)}; they must give float "
            f"(3, {size}, {size}) in [0, 1] (3 channels, the size the pipeline asks for)"
        )
    return image.float().clamp(0, 1)


def datalist_inputs(datalist: str, key: str, base_dir: str | None = None) -> list[dict]:
    """Entries of a MONAI datalist JSON (``load_decathlon_datalist``); paths must stay inside ``base_dir``."""
    base_dir = base_dir or os.path.dirname(os.path.abspath(datalist))
    entries = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=key, base_dir=base_dir)
    root = os.path.realpath(base_dir)
    for entry in entries:
        for name in ("image", "label"):
            if name in entry and not os.path.realpath(entry[name]).startswith(root + os.sep):
                raise ValueError(f"{datalist}: entry '{entry[name]}' points outside the dataset folder {root}")
    return entries


@dataclass
class ImagePool:
    """The unlabelled images of a run, with the input cases they come from."""

    cases: list[Case]
    items: list[PoolItem]
    feature_images: torch.Tensor  # (N, 3, F, F) uint8, encoder input of round 0 and the KNN features
    train_images: torch.Tensor  # (N, 3, S, S) uint8, network input of every round (both: or pool_store.DiskArray)
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(
        cls,
        sources: list[str],
        feature_size: int,
        train_size: int,
        slice_axis: int = 2,
        dataset_root: str | None = None,
        skip_bad_inputs: bool = False,
        store: ArrayStore | None = None,
        transforms: Sequence | None = None,
    ) -> ImagePool:
        """Read every source (image file, volume or DICOM series folder) and put its slices through ``transforms``
        (medsmile.json's ``pool_transforms``, its default when None) at both sizes.

        A bad file raises ValueError naming it, or is logged and listed in ``skipped`` when ``skip_bad_inputs``.
        ``store``: where the resized images go (default: tensors in RAM).
        """
        steps = default_pool_transforms() if transforms is None else transforms
        to_feature, to_train = sized_transform(steps, feature_size), sized_transform(steps, train_size)
        cases, items, skipped = [], [], []
        if store is None:
            feats, trains = RowCollector(None), RowCollector(None)
        else:
            feats = store.growing("pool_feature_images", (3, feature_size, feature_size), torch.uint8)
            trains = store.growing("pool_train_images", (3, train_size, train_size), torch.uint8)
        for source in sources:
            try:
                case, slices = read_planes(source, slice_axis=slice_axis, dataset_root=dataset_root)
                check_image_size(case)
            except ValueError as err:
                if not skip_bad_inputs:
                    raise ValueError(f"{err} (remove the file from the pool, or pass --skip_bad_inputs true)") from err
                logger.warning("skipping bad input: %s", err)
                skipped.append({"source": os.path.basename(source), "reason": str(err)})
                continue
            case_index = len(cases)
            cases.append(case)
            for slice_index, image in enumerate(slices):
                items.append(PoolItem(case_index, slice_index, tuple(int(s) for s in image.shape[1:])))
                feats.append(to_uint8(preprocess(to_feature, image, feature_size)))
                trains.append(to_uint8(preprocess(to_train, image, train_size)))
        if not items:
            where = f" in {dataset_root}" if dataset_root else ""
            raise ValueError(f"no readable images among the {len(sources)} inputs{where}")
        names = [c.name for c in cases]
        if len(set(names)) != len(names):
            raise ValueError("two inputs map to the same output name; keep file names unique per folder")
        logger.info("pool: %d images from %d inputs (%d skipped)", len(items), len(cases), len(skipped))
        return cls(cases, items, feats.finish(), trains.finish(), skipped)


def pool_sources(
    dataset_dir: str | None, datalist: str | None, exclude: list[str], datalist_key: str = "unlabeled"
) -> list[str]:
    """The unlabelled inputs: every image under ``dataset_dir`` or the ``datalist_key`` entries of a datalist,
    minus the reference images (a labelled image is not part of the unlabelled pool)."""
    if datalist:
        sources = [e["image"] for e in datalist_inputs(datalist, datalist_key, dataset_dir)]
    elif dataset_dir:
        if not os.path.isdir(dataset_dir):
            raise ValueError(f"dataset_dir {dataset_dir} is not a folder")
        sources = list_inputs(dataset_dir)
        if not sources:
            raise ValueError(
                f"no images found in {os.path.abspath(dataset_dir)} (dataset_dir): searched recursively for "
                f"{', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}, DICOM files and DICOM series folders"
            )
    else:
        raise ValueError("give dataset_dir (a folder of images) or datalist (a MONAI datalist JSON)")
    excluded = {os.path.realpath(p) for p in exclude}
    sources = [s for s in sources if os.path.realpath(s) not in excluded]
    sources = _without_reference_copies(sources, exclude)
    if not sources:
        raise ValueError(f"no pool image left in {dataset_dir or datalist} once the reference images are taken out")
    return sources


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _without_reference_copies(sources: list[str], references: list[str]) -> list[str]:
    """Leave out pool files with a reference's exact content (a reference copied into the pool under another name
    would otherwise be pseudo-labelled as an unlabelled image). Only files of a reference's byte size are hashed."""
    by_size: dict[int, list[str]] = {}
    for ref in references:
        if os.path.isfile(ref):
            by_size.setdefault(os.path.getsize(ref), []).append(ref)
    if not by_size:
        return sources
    digests: dict[str, str] = {}
    kept = []
    for source in sources:
        size = os.path.getsize(source) if os.path.isfile(source) else -1
        twin = None
        if size in by_size:
            digest = _file_digest(source)
            for ref in by_size[size]:
                digests.setdefault(ref, _file_digest(ref))
                if digests[ref] == digest:
                    twin = ref
        if twin is None:
            kept.append(source)
        else:
            logger.warning("pool: %s has the same content as the reference %s: left out of the pool", source, twin)
    return kept
