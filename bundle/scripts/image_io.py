"""Reading bundle inputs into 2-D slices and writing label maps back with the input's geometry.

All reading goes through :class:`monai.transforms.LoadImage` with an explicitly chosen MONAI reader and all
writing through MONAI writers (:class:`monai.data.PILWriter`, :class:`monai.data.NibabelWriter`).

Conventions (MONAI's, used consistently everywhere in the bundle):

* Arrays are in MONAI *spatial order*: a 2-D image file comes back as ``(X, Y) = (width, height)`` (``PILReader``
  and ``ITKReader`` both use ``reverse_indexing``), i.e. the transpose of ``numpy.asarray(PIL.Image.open(f))``.
  DICOM comes back as ``(columns, rows[, slices])``, NIfTI in its voxel order.
* A slice is ``float32 (3, X, Y)`` in ``[0, 1]``. A volume ``(X, Y, Z)`` is cut along ``slice_axis``; the slice
  keeps the two remaining axes in their original order.
* Labels are ``int64`` arrays in the same spatial order.

Readers used per input type (``LoadImage(...)(path, reader=...)``; the next one is tried only if the first fails):

* ``.png .jpg .jpeg .bmp``: ``PILReader`` (MONAI's default pick for these suffixes).
* ``.tif .tiff``: ``ITKReader`` (MONAI's default pick), then ``PILReader``.
* ``.nii .nii.gz``: ``NibabelReader`` (no reorientation, so the affine is the file's own).
* DICOM file (``.dcm``/``.dicom``/``.ima`` or no suffix with a ``DICM`` preamble) or DICOM series folder:
  ``PydicomReader``, then ``ITKReader``. Both report the same RAS affine for a series.

Output format: NIfTI inputs and all 3-D inputs are written as ``.nii.gz`` with the input's affine; other 2-D inputs
(image files, single-frame DICOM) as a ``uint8`` ``.png`` that PIL shows in the input image's orientation.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic_files import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "Case",
    "check_image_size",
    "check_size_from_header",
    "find_inputs",
    "label_classes",
    "label_slices",
    "list_inputs",
    "read_case",
    "read_label",
    "read_planes",
    "write_label",
]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

# Size limits, checked on every input: MAX_* from the file's header before anything is decoded (so no input can take
# the machine's memory), MIN_IMAGE_SIDE on each 2-D image of the pool. Reading and resizing a 2-D image peaked at
# about 200 bytes per pixel (measured: 16 million pixels -> 3.2 GB RSS), so 25 million pixels (5000 x 5000) stays
# near 5 GB; volumes are read slice by slice after decoding (about 20 bytes per voxel).
MAX_IMAGE_PIXELS = 25_000_000  # pixels of one 2-D image or of a volume's largest plane
MAX_VOLUME_VOXELS = 200_000_000  # voxels of a whole volume or series (e.g. 512 x 512 x 760)
MIN_IMAGE_SIDE = 8  # pixels on each side of a 2-D image (slice) of the pool: smaller ones carry no shape to segment


@dataclass
class Case:
    """One input (image file, NIfTI file, DICOM file or DICOM series folder) and what is needed to write it back."""

    source: str  # path of the file or DICOM series folder
    name: str  # output name relative to the dataset root, without extension (e.g. "sub/img01", "series_a")
    is_volume: bool  # True for 3-D inputs (written back as NIfTI), False for 2-D (one slice)
    slice_axis: int | None  # spatial axis the volume is cut along; None for 2-D inputs
    spatial_shape: tuple[int, ...]  # MONAI spatial shape of the input as read (2 or 3 entries)
    meta: dict = field(default_factory=dict)  # geometry for the writer: affine, original_affine, spacing, ...

    def num_slices(self) -> int:
        if self.is_volume:
            return int(self.spatial_shape[self.slice_axis])
        return 1

    @property
    def slice_shape(self) -> tuple[int, int]:
        """Spatial shape ``(X, Y)`` of one slice (and of each label slice given to :func:`write_label`)."""
        if self.is_volume:
            return tuple(s for i, s in enumerate(self.spatial_shape) if i != self.slice_axis)  # type: ignore[return-value]
        squeezed = self.meta.get("squeezed_axis")
        if squeezed is None:
            return tuple(self.spatial_shape)  # type: ignore[return-value]
        return tuple(s for i, s in enumerate(self.spatial_shape) if i != squeezed)  # type: ignore[return-value]

    @property
    def output_suffix(self) -> str:
        return ".nii.gz" if self.meta.get("output_format") == "nifti" else ".png"


# ----------------------------------------------------------------------------------------------------------------------
# input kinds and listing
# ----------------------------------------------------------------------------------------------------------------------


def _lower_suffix(path: str | os.PathLike) -> str:
    """The supported suffix of ``path`` (lower case, ``.nii.gz`` as one), or ``""``."""
    name = os.path.basename(os.fspath(path)).lower()
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return ""


def split_name(path: str | os.PathLike) -> tuple[str, str]:
    """``(stem, suffix)`` with the suffix as written in the file name (``.nii.gz`` counted as one suffix)."""
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    suffix = _lower_suffix(name)
    if suffix:
        return name[: -len(suffix)], name[-len(suffix) :]
    return name, ""


def _has_dicom_preamble(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_file(path: str) -> bool:
    suffix = _lower_suffix(path)
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix == "" and "." not in os.path.basename(path):  # DICOM files exported without a suffix
        return _has_dicom_preamble(path)
    return False


def _series_uid(path: str) -> str | None:
    """SeriesInstanceUID of a DICOM file ("" if absent), or None if the header cannot be parsed."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # noqa: BLE001 - an unreadable file is reported later by read_case
        return None
    return str(getattr(ds, "SeriesInstanceUID", "") or "")


def _dicom_files_in(folder: str) -> list[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [e.path for e in entries if not e.name.startswith(".") and e.is_file() and _is_dicom_file(e.path)]


def _is_series_folder(dicom_files: Sequence[str]) -> bool:
    """A folder is one DICOM series when it holds 2+ DICOM files that all share one SeriesInstanceUID.

    Files whose header cannot be parsed are ignored here (they surface as read errors of the series). A folder with
    several series (e.g. one 2-D radiograph per file) is listed file by file instead.
    """
    if len(dicom_files) < 2:
        return False
    uids = {uid for uid in (_series_uid(f) for f in dicom_files) if uid is not None}
    return len(uids) <= 1


def list_inputs(dataset_dir: str | os.PathLike) -> list[str]:
    """Image files, NIfTI files, DICOM files and DICOM series folders under ``dataset_dir`` (recursive), sorted.

    Hidden files and folders (name starting with ``.``) are skipped. A folder whose DICOM files form one series is
    returned once (the folder path) instead of its files; its sub-folders are still searched.
    """
    root = os.fspath(dataset_dir)
    if not os.path.isdir(root):
        raise ValueError(f"Dataset folder {root!r} does not exist or is not a folder")
    found: list[str] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = sorted(f for f in files if not f.startswith("."))
        dicom = [os.path.join(current, f) for f in visible if _is_dicom_file(os.path.join(current, f))]
        if _is_series_folder(dicom):
            if os.path.normpath(current) == os.path.normpath(root):
                logger.warning("DICOM files directly in the dataset root %s are read as one series", root)
            found.append(current)
        else:
            found.extend(dicom)
        found.extend(os.path.join(current, f) for f in visible if _lower_suffix(f) in IMAGE_SUFFIXES + NIFTI_SUFFIXES)
    return sorted(found)


def find_inputs(
    folder: str | os.PathLike, patterns: Sequence[str], recursive: bool = False, what: str = "dataset_dir"
) -> list[str]:
    """Files in ``folder`` matching any of the glob ``patterns``, sorted. None is an error naming the folder and the
    patterns: MONAI would only log that the dataloader is empty and exit 0 having written nothing."""
    import glob

    folder = os.fspath(folder)
    where = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {where} is not a folder (relative paths start from {os.getcwd()})")
    root = os.path.join(glob.escape(folder), "**") if recursive else glob.escape(folder)
    found = {f for p in patterns for f in glob.glob(os.path.join(root, p), recursive=recursive) if os.path.isfile(f)}
    if not found:
        how = "recursively " if recursive else ""
        raise ValueError(f"{what} {where} holds no input: searched {how}for {', '.join(patterns)}")
    return sorted(found)


def _input_stem(path: str) -> tuple[str, str] | None:
    """(stem, suffix tag) if ``path`` is something :func:`list_inputs` would return, else None."""
    base = os.path.basename(os.path.normpath(path))
    if base.startswith("."):
        return None
    if os.path.isdir(path):
        return (base, "dcm") if _is_series_folder(_dicom_files_in(path)) else None
    stem, suffix = split_name(path)
    if _lower_suffix(path) in IMAGE_SUFFIXES + NIFTI_SUFFIXES or _is_dicom_file(path):
        return stem, (suffix.lstrip(".").replace(".", "_") or "noext")
    return None


def case_name(path: str, dataset_root: str | os.PathLike | None) -> str:
    """Output name: the path relative to ``dataset_root`` without suffix, using ``/`` as separator.

    When a sibling input has the same stem (``a.png`` and ``a.jpg``, or a series folder ``a`` next to ``a.nii.gz``)
    the suffix is appended (``a_png``, ``a_jpg``, ``a_dcm``) so that every case in a dataset gets its own output.
    """
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    stem, suffix = split_name(path)
    tag = (_input_stem(path) or (stem, suffix.lstrip(".").replace(".", "_") or "noext"))[1]
    # Probe the few names that could collide instead of listing the folder (cheap for folders with many files).
    candidates = {os.path.join(parent, stem)}
    for sfx in NIFTI_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES:
        candidates.update(os.path.join(parent, stem + s) for s in (sfx, sfx.upper()))
    candidates.discard(path)
    if any(os.path.exists(c) and not os.path.samefile(c, path) and _input_stem(c) is not None for c in candidates):
        stem = f"{stem}_{tag}"
    rel_parent = ""
    if dataset_root is not None:
        rel = os.path.relpath(parent or ".", os.fspath(dataset_root))
        if rel != "." and rel != ".." and not rel.startswith(".." + os.sep):
            rel_parent = rel
    return Path(rel_parent, stem).as_posix() if rel_parent else stem


# ----------------------------------------------------------------------------------------------------------------------
# loading through MONAI
# ----------------------------------------------------------------------------------------------------------------------


def _pil_image_mode(img):
    """PILReader converter for images: palette/LA/bilevel/CMYK... to L, RGB or RGBA; 16-bit and float kept."""
    mode = img.mode
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode == "PA":
        return img.convert("RGBA")
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return img.convert("RGB")
    return img


def _pil_label_mode(img):
    """PILReader converter for labels: palette PNGs keep their indices, bilevel -> 0/255 grey, LA -> L."""
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    if img.mode == "PA":
        return img.convert("P")
    return img


@functools.lru_cache(maxsize=1)
def _loader():
    from monai.transforms import LoadImage

    # dtype=None keeps the stored dtype (uint8 vs 16-bit vs float decides the intensity scaling).
    return LoadImage(image_only=True, ensure_channel_first=True, dtype=None)


def _readers(kind: str, for_label: bool) -> list:
    from monai.data import ITKReader, NibabelReader, PILReader, PydicomReader

    if kind == "pil":
        return [PILReader(converter=_pil_label_mode if for_label else _pil_image_mode)]
    if kind == "tiff":
        return [ITKReader(), PILReader(converter=_pil_label_mode if for_label else _pil_image_mode)]
    if kind == "nifti":
        return [NibabelReader(as_closest_canonical=False, squeeze_non_spatial_dims=False)]
    if kind == "dicom":
        return [PydicomReader(), ITKReader()]
    raise AssertionError(kind)


def _input_kind(path: str) -> str:
    if os.path.isdir(path):
        if not _dicom_files_in(path):
            raise ValueError(f"Cannot read {path}: folder contains no DICOM files")
        return "dicom"
    suffix = _lower_suffix(path)
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if _is_dicom_file(path) or _has_dicom_preamble(path):
        return "dicom"
    raise ValueError(
        f"Cannot read {path}: unsupported file type (supported: {', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}, "
        "DICOM files and DICOM series folders)"
    )


def _header_shape(path: str, kind: str) -> tuple[int, ...] | None:
    """The input's size from its header alone (nothing decoded), or None when the header cannot be read (the
    readers then report the file)."""
    try:
        if kind in ("pil", "tiff"):
            from PIL import Image

            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit is checked instead
            try:
                with Image.open(path) as img:  # PIL reads the size lazily
                    return (*img.size, getattr(img, "n_frames", 1))
            except Exception:  # e.g. a TIFF layout PIL does not know: tifffile below
                if kind == "pil":
                    raise
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tuple(int(s) for s in tif.series[0].shape)
        if kind == "nifti":
            import nibabel

            return tuple(int(s) for s in nibabel.load(path).header.get_data_shape())
        if kind == "dicom":
            import pydicom

            files = _dicom_files_in(path) if os.path.isdir(path) else [path]
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            return int(ds.Columns), int(ds.Rows), frames * len(files)
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the readers
        return None
    return None


def check_size_from_header(path: str, kind: str) -> None:
    """Refuse an input above MAX_IMAGE_PIXELS (largest 2-D plane) or MAX_VOLUME_VOXELS before decoding it."""
    shape = _header_shape(path, kind)
    if not shape:
        return
    sides = sorted((s for s in shape if s > 1), reverse=True)
    plane = int(np.prod(sides[:2], dtype=np.int64))
    total = int(np.prod(sides, dtype=np.int64))
    size = " x ".join(str(s) for s in shape if s > 1)
    if plane > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"Cannot read {path}: {size} is {plane:,} pixels per image, above the limit of {MAX_IMAGE_PIXELS:,} "
            f"(reading it would take about {plane * 200 / 1e9:.0f} GB of memory); downsample it first"
        )
    if total > MAX_VOLUME_VOXELS:
        raise ValueError(
            f"Cannot read {path}: {size} is {total:,} voxels, above the limit of {MAX_VOLUME_VOXELS:,}; "
            "crop or downsample it first"
        )


def _missing(path: str) -> ValueError:
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return ValueError(f"Cannot read {path}: symbolic link loop (the link points back to itself)")
        return ValueError(f"Cannot read {path}: broken symbolic link (its target {os.readlink(path)!r} is missing)")
    return ValueError(f"Cannot read {path}: no such file or folder")


def _load(path: str, for_label: bool = False):
    """Load ``path`` with LoadImage -> (channel-first numpy array, meta dict, reader name, kind)."""
    if not os.path.exists(path):
        raise _missing(path)
    kind = _input_kind(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"Cannot read {path}: file is empty (0 bytes)")
    check_size_from_header(path, kind)
    errors = []
    for reader in _readers(kind, for_label):
        try:
            img = _loader()(path, reader=reader)
            data = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
            meta = dict(getattr(img, "meta", {}))
            if hasattr(img, "affine"):
                meta["affine"] = np.asarray(img.affine, dtype=np.float64)
            return data, meta, type(reader).__name__, kind
        except Exception as e:  # noqa: BLE001 - every reader failure is reported together below
            reason = " ".join(str(e).split()) or type(e).__name__
            errors.append(f"{type(reader).__name__}: {type(e).__name__}: {reason[:500]}")
    raise ValueError(f"Cannot read {path}: {'; '.join(errors)}")


def _to_spatial(data: np.ndarray, path: str, kind: str) -> np.ndarray:
    """Check the channel-first array from LoadImage: at most 3 spatial dims and no 4th (time/volume) dimension."""
    if data.ndim < 3:
        raise ValueError(f"Cannot read {path}: expected at least 2 spatial dimensions, got shape {data.shape}")
    while data.ndim > 4 and data.shape[-1] == 1:  # trailing singleton dims beyond 3-D, e.g. NIfTI (X, Y, Z, 1, 1)
        data = data[..., 0]
    channels = data.shape[0]
    if data.ndim > 4:
        raise ValueError(
            f"{path}: {data.ndim - 1}-D data with shape {data.shape[1:]} is not supported (only 2-D and 3-D)"
        )
    if kind == "nifti" and channels > 1:
        raise ValueError(
            f"{path}: 4-D volume (spatial shape {tuple(data.shape[1:])} x {channels} volumes/time points) is not "
            "supported; split it into 3-D volumes"
        )
    return data


def _check_finite(data: np.ndarray, path: str) -> None:
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        raise ValueError(f"{path}: intensities contain non-finite values ({n_nan} NaN, {n_inf} Inf)")


def scale_intensity(data: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """8-bit -> /255; anything else -> per-case 0.5/99.5 percentile window clipped to [0, 1]; constant -> zeros
    (``transforms.ScaleIntensityWindowd``, the first step of :func:`scripts.transforms.intensity_to_rgb`)."""
    from .transforms import ScaleIntensityWindowd

    out = ScaleIntensityWindowd("image")({"image": data})["image"]
    window = out.meta["intensity_window"]
    return np.asarray(out.as_tensor().numpy(), dtype=np.float32), window


def to_rgb(data: np.ndarray, path: str) -> np.ndarray:
    """(C, ...) -> (3, ...): grey repeated, grey+alpha -> grey, RGBA -> RGB (``transforms.ToRGBd``)."""
    from monai.data import MetaTensor

    from .transforms import ToRGBd

    out = ToRGBd("image")({"image": MetaTensor(torch.as_tensor(data), meta={"filename_or_obj": path})})["image"]
    return out.as_tensor().numpy()


def _squeezable_axis(spatial_shape: Sequence[int], slice_axis: int) -> int | None:
    """For a 3-D shape with a singleton axis (a 2-D image stored as 3-D), the axis to drop; else None."""
    if len(spatial_shape) != 3:
        return None
    if spatial_shape[slice_axis] == 1:
        return slice_axis
    for axis in (2, 0, 1):
        if spatial_shape[axis] == 1:
            return axis
    return None


def _geometry(meta: dict, ndim: int) -> dict:
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    original = meta.get("original_affine")
    original = affine if original is None else np.asarray(original, dtype=np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :ndim], axis=0))
    # plain lists keep Case.meta small and serialisable (JSON, pickle for worker processes)
    return {"affine": affine.tolist(), "original_affine": original.tolist(), "spacing": spacing}


def read_planes(
    path: str | os.PathLike, slice_axis: int = 2, dataset_root: str | os.PathLike | None = None
) -> tuple[Case, list[torch.Tensor]]:
    """Read one input into a :class:`Case` and its 2-D planes as stored: channel-first ``(C, X, Y)`` MetaTensors of
    the file's dtype, each with the case's intensity window in its meta (``transforms.CASE_WINDOW``: a volume's
    slices are scaled alike, by the window of the whole volume). What the pool's steps (medsmile.json's
    ``pool_transforms``) then turn into network inputs; :func:`read_case` applies the default intensity steps.

    2-D inputs (and 3-D inputs with a singleton axis) give one plane; 3-D volumes are cut along ``slice_axis``
    (spatial axis 0, 1 or 2). Raises ``ValueError`` naming the file for unreadable/empty/truncated files, 4-D data,
    more than 4 channels and non-finite intensities.
    """
    path = os.fspath(path)
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    data, meta, reader_name, kind = _load(path)
    data = _to_spatial(data, path, kind)
    _check_finite(data, path)
    spatial_shape = tuple(int(s) for s in data.shape[1:])
    squeezed = _squeezable_axis(spatial_shape, slice_axis)
    is_volume = len(spatial_shape) == 3 and squeezed is None
    if data.shape[0] > 4:
        raise ValueError(f"{path}: unsupported number of channels {data.shape[0]} (expected 1, 2, 3 or 4)")
    from monai.data import MetaTensor

    from .transforms import CASE_WINDOW, intensity_window

    stored = torch.as_tensor(data)
    window = intensity_window(stored)  # over the whole case, as inference.json's IntensityToRGBd
    if is_volume:
        planes = [stored.select(slice_axis + 1, i) for i in range(spatial_shape[slice_axis])]
    elif squeezed is not None:
        planes = [stored.select(squeezed + 1, 0)]
    else:
        planes = [stored]
    planes = [MetaTensor(p, meta={"filename_or_obj": path, CASE_WINDOW: window}) for p in planes]
    case_meta = _geometry(meta, len(spatial_shape))
    case_meta.update(
        {
            "reader": reader_name,
            "input_kind": kind,
            "output_format": "nifti" if (is_volume or kind == "nifti") else "png",
            "squeezed_axis": squeezed,
            "dtype": str(data.dtype),
            "channels": int(data.shape[0]),
            "intensity_window": (float(window[0]), float(window[1])),
        }
    )
    case = Case(
        source=path,
        name=case_name(path, dataset_root),
        is_volume=is_volume,
        slice_axis=slice_axis if is_volume else None,
        spatial_shape=spatial_shape,
        meta=case_meta,
    )
    return case, planes


def read_case(
    path: str | os.PathLike, slice_axis: int = 2, dataset_root: str | os.PathLike | None = None
) -> tuple[Case, list[np.ndarray]]:
    """Read one input into a :class:`Case` and its 2-D slices, each ``float32 (3, X, Y)`` in ``[0, 1]``: the planes
    of :func:`read_planes` through :func:`scripts.transforms.intensity_to_rgb`, as inference.json sees them (the
    window over the whole case). Raises as :func:`read_planes`."""
    from .transforms import intensity_to_rgb

    case, planes = read_planes(path, slice_axis, dataset_root)
    intensity = intensity_to_rgb("image")
    slices = [np.ascontiguousarray(intensity({"image": p})["image"].as_tensor().numpy()) for p in planes]
    return case, slices


# ----------------------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------------------


def check_image_size(case: Case) -> None:
    """Refuse a pool input whose 2-D images are smaller than MIN_IMAGE_SIDE on a side (a 1 x 1 PNG, a 100 x 1
    strip): nothing to segment, and MONAI's PNG writer cannot write their labels back."""
    if min(case.slice_shape) < MIN_IMAGE_SIDE:
        sides = " x ".join(str(s) for s in case.slice_shape)
        hint = "" if not case.is_volume else f" (slices cut along slice_axis={case.slice_axis}; another axis?)"
        raise ValueError(
            f"Cannot use {case.source}: its 2-D images are {sides} pixels, below the minimum of {MIN_IMAGE_SIDE} "
            f"pixels a side{hint}"
        )


def _same_up_to_singletons(a: Sequence[int], b: Sequence[int]) -> bool:
    return [s for s in a if s != 1] == [s for s in b if s != 1]


LOSSY_SUFFIXES = (".jpg", ".jpeg")


def label_classes(label: np.ndarray, num_classes: int, path: str | os.PathLike) -> np.ndarray:
    """Class indices 0..C-1 from a stored label map, the one rule for every label file the bundle reads.

    Values already in ``0 .. C-1`` are class indices as stored. A map whose only non-zero value is some ``k >= C``
    (a 0/255 mask) becomes ``{0, 1}``; with ``C = 2`` that is every two-valued ``{0, k}`` mask. For ``C > 2`` a
    ``{0, 2}`` map keeps meaning "only class 2 present". A JPEG mask with ``C = 2`` (lossy: grey values around the
    edges) is foreground where its value is > 127. Anything else out of range (e.g. a ``{0, 128, 255}`` grey image)
    is refused, naming the file."""
    path = os.fspath(path)
    if label.size == 0 or int(label.max()) < num_classes:
        return label
    values = np.unique(label)
    nonzero = values[values != 0]
    if len(nonzero) == 1:  # {0, k} or {k} with k >= C: a binary mask such as 0/255
        return (label > 0).astype(np.int64)
    if num_classes == 2 and path.lower().endswith(LOSSY_SUFFIXES):
        return (label > 127).astype(np.int64)
    shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    raise ValueError(
        f"{path}: label values {{{shown}}} are outside 0..{num_classes - 1} and not a two-valued {{0, k}} mask"
    )


def read_label(
    path: str | os.PathLike,
    spatial_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """Read a label map as ``int64`` in MONAI spatial order (same reader choice as :func:`read_case`).

    Multi-channel (RGB/RGBA) masks use their first channel; palette PNGs keep their indices. With ``num_classes``
    the values become class indices by :func:`label_classes` (0/255 masks -> {0, 1}; other out-of-range values are
    refused); without, they are kept as stored (reading back a map written by :func:`write_label`). With
    ``spatial_shape`` given (e.g. ``case.spatial_shape``) the label must match it (singleton axes aside) and is
    returned with that shape.
    """
    path = os.fspath(path)
    data, _meta, _reader, kind = _load(path, for_label=True)
    data = _to_spatial(data, path, kind)
    label = data[0]
    if np.issubdtype(label.dtype, np.floating):
        _check_finite(label, path)
        label = np.rint(label)
    label = label.astype(np.int64)
    if label.size and label.min() < 0:
        raise ValueError(f"{path}: label contains negative values (min {int(label.min())})")
    if num_classes is not None:
        label = label_classes(label, num_classes, path)
    if spatial_shape is not None:
        expected = tuple(int(s) for s in spatial_shape)
        if tuple(label.shape) != expected:
            if not _same_up_to_singletons(label.shape, expected):
                raise ValueError(
                    f"{path}: label spatial shape {tuple(label.shape)} does not match the image spatial shape "
                    f"{expected}"
                )
            label = label.reshape(expected)
    return label


def label_slices(case: Case, label: np.ndarray) -> list[np.ndarray]:
    """Cut a label map (``case.spatial_shape``) into the same 2-D slices :func:`read_case` produced."""
    label = np.asarray(label)
    if tuple(label.shape) != tuple(case.spatial_shape):
        raise ValueError(f"{case.source}: label shape {label.shape} != case spatial shape {case.spatial_shape}")
    if case.is_volume:
        return [np.take(label, i, axis=case.slice_axis) for i in range(case.num_slices())]
    return [label.reshape(case.slice_shape)]


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------


def _label_dtype(label: np.ndarray, case: Case) -> type:
    if label.size == 0:
        return np.uint8
    lo, hi = int(label.min()), int(label.max())
    if lo < 0:
        raise ValueError(f"{case.source}: label values must be >= 0, got min {lo}")
    if hi <= 255:
        return np.uint8
    if case.output_suffix == ".png":
        raise ValueError(f"{case.source}: label value {hi} does not fit a uint8 PNG")
    return np.int32


def write_label(case: Case, label_slices: Sequence[np.ndarray], out_dir: str | os.PathLike) -> str:
    """Write the label slices of ``case`` to ``<out_dir>/<case.name>.png`` or ``.nii.gz`` (atomically).

    ``label_slices`` are integer arrays ``(X, Y)`` in the case's spatial order, one per slice, each of
    ``case.slice_shape``. PNG output is ``uint8`` class indices, oriented like the input image file when opened with
    PIL. NIfTI output has the input's spatial shape and affine (slices stacked back along ``slice_axis``).
    """
    from monai.data import NibabelWriter, PILWriter

    slices = [np.asarray(s) for s in label_slices]
    if len(slices) != case.num_slices():
        raise ValueError(f"{case.source}: expected {case.num_slices()} label slices, got {len(slices)}")
    for i, s in enumerate(slices):
        if tuple(s.shape) != tuple(case.slice_shape):
            raise ValueError(f"{case.source}: label slice {i} has shape {tuple(s.shape)}, expected {case.slice_shape}")
        is_int = np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_
        if not is_int and not np.array_equal(s, np.rint(s)):
            raise ValueError(f"{case.source}: label slice {i} has non-integer values")
    if case.is_volume:
        label = np.stack(slices, axis=case.slice_axis)
    else:
        label = slices[0].reshape(case.spatial_shape)
    dtype = _label_dtype(label, case)
    label = label.astype(dtype)
    suffix = case.output_suffix
    final = os.path.join(os.fspath(out_dir), *case.name.split("/")) + suffix

    if suffix == ".png":
        plane = label.reshape(case.slice_shape)  # (X, Y)

        def write_png(tmp: str) -> None:
            writer = PILWriter(output_dtype=np.uint8, scale=None)
            writer.set_data_array(plane, channel_dim=None)
            # PILWriter's default reverse_indexing=True turns (X, Y) back into PIL's (height, width) layout.
            writer.write(tmp, format="PNG")

        with atomic_path(final) as tmp:  # keeps the suffix: the writer picks the format from it
            write_png(tmp)
        return final

    meta = case.meta

    def write_nifti(tmp: str) -> None:
        writer = NibabelWriter(output_dtype=dtype)
        # keep the exact spatial shape, e.g. (X, Y, 1) stays 3-D: add no channel, squeeze nothing
        writer.set_data_array(label, channel_dim=None, squeeze_end_dims=False, spatial_ndim=None)
        writer.data_obj = writer.data_obj[..., 0]  # drop the channel axis set_data_array appended
        # No resampling: the label is on the input grid. set_metadata(resample=False) would still run an identity
        # SpatialResample, which fails for 2-D NIfTI in MONAI 1.6.1, so the affine is set directly.
        writer.affine = np.asarray(meta["affine"], dtype=np.float64)
        writer.write(tmp)

    with atomic_path(final) as tmp:
        write_nifti(tmp)
    return final
