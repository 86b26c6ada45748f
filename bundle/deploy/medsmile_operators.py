"""Operators of the MedSMILE MONAI Deploy application: the bundle's 2-D network applied slice by slice.

``SliceBundleInferenceOperator`` is the SDK's :class:`MonaiBundleInferenceOperator` (``device``, ``inferer``,
``preprocessing`` and ``postprocessing`` parsed from inference.json, ``LoadImage*``/``SaveImage*`` dropped), with its
own bundle reading and ``compute``:

* the configs come from a bundle folder (``configs/inference.json``; ``models/metadata.json``, the trained model's
  classes and size, else ``configs/metadata.json``) or from the files embedded in a TorchScript ``model.ts``
  (``model.ts/extra/inference.json`` and ``metadata.json``, which the SDK does not find in a bare model.ts); the
  model is ``models/model.ts``, else ``models/model.pt`` (weights only) in inference.json's ``network_def``;
* the stock ``compute`` hands the whole DICOM volume ``(W, H, D)`` to the pre-processing as one image; here every
  slice goes through inference.json's ``preprocessing -> inferer -> postprocessing`` on its own (with the series'
  window, below) and the masks are stacked back;
* intensities are scaled the way the training pool reads its inputs (``scripts.image_io.read_case``): a single 2-D
  image is passed raw, so ``IntensityToRGBd`` applies its rule to it exactly as inference.json does on a file; a
  volume is windowed once over the whole volume (same 0.5/99.5 percentile rule, same function) and each slice is
  handed over as 8-bit, the form the training pool stores its images in (``IntensityToRGBd`` then divides by 255).
  Windowing each slice on its own would give every slice of a CT its own contrast, which training never saw;
* the mask is returned in the input's layout: ``(D, H, W)`` for an SDK DICOM volume (the stock operator keeps
  ``(W, H)`` for a single slice, a transposed SEG for non-square images), ``(N, X, Y)`` for the planes of a file;
* the model is always loaded from the bundle path given here: for a bundle *folder* passed with ``-m``, the SDK's
  model factory makes a generic ``Model`` that cannot predict, which the stock ``compute`` would try to use.

``ImageFileLoaderOperator`` and ``MaskFileWriterOperator`` serve non-DICOM inputs (PNG/JPG/BMP/TIFF, NIfTI): read with
the bundle's own readers; masks written as ``<name>_seg.png`` (2-D) or ``<name>_seg.nii.gz`` (NIfTI and 3-D inputs,
with the input's affine) through ``scripts.image_io.write_label``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.deploy.core import Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.core.models import TorchScriptModel
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator
from monai.utils import ensure_tuple, first

logger = logging.getLogger(__name__)

PLANES_KEY = "medsmile_planes"  # Image metadata flag: data is (N, C, X, Y) planes ready for the bundle
CASE_KEY = "medsmile_case"  # Image metadata: the scripts.image_io.Case a file was read into
OUTPUT_POSTFIX = "_seg"  # as inference.json's SaveImaged (output_postfix "seg")
DEFAULT_BUNDLE_ROOT = Path(__file__).resolve().parents[1]  # this repository's bundle/ folder


# ----------------------------------------------------------------------------------------------------------------------
# bundle location and metadata
# ----------------------------------------------------------------------------------------------------------------------


def resolve_bundle(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> Path:
    """The bundle to use for ``-m path``: a bundle folder (``configs/metadata.json`` inside), a folder holding exactly
    one such folder (what a MAP's model folder looks like), a TorchScript ``model.ts`` with the bundle configs
    embedded, or a ``.zip`` of a bundle folder (extracted into ``workdir``, default a new temporary folder)."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        if (p / "configs" / "metadata.json").is_file():
            return p
        bundles = [c for c in sorted(p.iterdir()) if c.is_dir() and (c / "configs" / "metadata.json").is_file()]
        if len(bundles) == 1:
            return bundles[0]
        for candidate in (p / "model.ts", p / "models" / "model.ts"):
            if candidate.is_file():
                return candidate
        raise ValueError(f"{p}: no MONAI bundle found (expected configs/metadata.json or model.ts)")
    if p.is_file():
        if TorchScriptModel.accept(str(p))[0]:
            return p
        if zipfile.is_zipfile(p):
            target = Path(workdir, f"{p.stem}_bundle") if workdir else Path(tempfile.mkdtemp(prefix="medsmile_bundle_"))
            with zipfile.ZipFile(p) as archive:
                names = [n for n in archive.namelist() if n.endswith("configs/metadata.json")]
                if len(names) != 1:
                    raise ValueError(f"{p}: expected one bundle (configs/metadata.json) in the archive, got {names}")
                for member in archive.infolist():
                    dest = (target / member.filename).resolve()
                    if not str(dest).startswith(str(target.resolve()) + os.sep):
                        raise ValueError(f"{p}: unsafe path in archive: {member.filename}")
                archive.extractall(target)
            return (target / names[0]).parent.parent
    raise ValueError(f"{p}: not a bundle folder, TorchScript model or zipped bundle")


def bundle_metadata(bundle: Path) -> dict:
    """The trained model's metadata: ``models/metadata.json`` of a bundle folder (written by the run with its classes
    and size; else ``configs/metadata.json``), or the copy embedded in a TorchScript file (``*/extra/metadata.json``)."""
    if bundle.is_dir():
        run_file = bundle / "models" / "metadata.json"
        return json.loads((run_file if run_file.is_file() else bundle / "configs" / "metadata.json").read_text())
    return json.loads(embedded_file(bundle, "metadata.json"))


def embedded_file(model_ts: Path, name: str) -> bytes:
    """A bundle file embedded in a TorchScript model by ``ckpt_export`` (``<archive>/extra/<name>``)."""
    with zipfile.ZipFile(model_ts) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"extra/{name}")]
        if not names:
            raise ValueError(
                f"{model_ts}: no {name} embedded in this TorchScript model; export it with the bundle "
                "(configs/medsmile.json does, or ckpt_export --meta_file/--config_file), or pass the bundle folder"
            )
        return archive.read(names[0])


def load_bundle_network(bundle: Path, device, parser) -> torch.nn.Module:
    """The model of a bundle folder: ``models/model.ts`` (TorchScript), else ``models/model.pt`` loaded (weights
    only) into inference.json's ``network_def``."""
    models = bundle / "models"
    if (models / "model.ts").is_file():
        return torch.jit.load(str(models / "model.ts"), map_location=device).eval()
    if not (models / "model.pt").is_file():
        raise FileNotFoundError(f"{models}: no model.ts or model.pt (train the bundle first: configs/medsmile.json)")
    network = parser.get_parsed_content("network_def").to(device)
    network.load_state_dict(torch.load(str(models / "model.pt"), map_location=device, weights_only=True))
    return network.eval()


def ensure_scripts_importable(bundle: Path) -> None:
    """Put the folder holding the bundle's ``scripts`` package on ``sys.path`` (inference.json instantiates
    ``scripts.transforms.IntensityToRGBd``). A TorchScript file carries no code: this repository's ``bundle/`` is used.
    An already imported ``scripts`` package stays the one in use."""
    root = bundle if bundle.is_dir() and (bundle / "scripts").is_dir() else DEFAULT_BUNDLE_ROOT
    if not (root / "scripts").is_dir():
        raise ValueError(f"the bundle scripts package is not found in {bundle} nor in {DEFAULT_BUNDLE_ROOT}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def output_classes(metadata: dict) -> dict[int, str]:
    """``{class index: name}`` of the network's first output (``channel_def`` of metadata.json)."""
    outputs = metadata["network_data_format"]["outputs"]
    channel_def = outputs[first(outputs)].get("channel_def") or {}
    return {int(k): str(v) for k, v in sorted(channel_def.items(), key=lambda kv: int(kv[0]))}


# ----------------------------------------------------------------------------------------------------------------------
# planes
# ----------------------------------------------------------------------------------------------------------------------


def to_uint8(plane: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 as the training pool stores its images (``scripts.pool.to_uint8``: round half to even)."""
    return np.rint(np.clip(plane, 0.0, 1.0) * 255.0).astype(np.uint8)


def volume_planes(data: np.ndarray, slice_axis: int = 2, name: str = "volume") -> list[np.ndarray]:
    """Channel-first ``(C, X, Y, Z)`` data -> the 2-D planes ``(C', X, Y)`` to hand to inference.json's
    pre-processing. One slice along ``slice_axis``: the raw plane. Several: ``scale_intensity`` over the whole volume
    (as ``read_case``), RGB expansion, 8-bit planes."""
    from scripts.image_io import scale_intensity, to_rgb

    count = data.shape[1 + slice_axis]
    if count == 1:
        return [np.take(data, 0, axis=1 + slice_axis)]
    scaled, _ = scale_intensity(data)
    return [to_uint8(to_rgb(np.take(scaled, i, axis=1 + slice_axis), name)) for i in range(count)]


def dicom_volume_to_spatial(array: np.ndarray) -> np.ndarray:
    """SDK DICOM volume ``(D, H, W)`` or ``(D, H, W, C)`` -> channel-first MONAI order ``(C, W, H, D)``, the layout
    MONAI's DICOM readers give (``(columns, rows, slices)``)."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 3:
        array = array[None]
    elif array.ndim == 4:
        array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"unsupported DICOM volume shape {array.shape}")
    return np.ascontiguousarray(np.transpose(array, (0, 3, 2, 1)))


# ----------------------------------------------------------------------------------------------------------------------
# operators
# ----------------------------------------------------------------------------------------------------------------------


class SliceBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK bundle inference operator run slice by slice (see the module docstring for what differs and why).

    Input ``image``: an SDK DICOM volume ``Image`` (``DICOMSeriesToVolumeOperator``) or an ``Image`` of planes from
    :class:`ImageFileLoaderOperator`. Output ``pred``: ``uint8`` class indices, ``(D, H, W)`` for DICOM (what
    ``DICOMSegmentationWriterOperator`` expects) or ``(N, X, Y)`` for planes; the input's metadata is passed on.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        app_context,
        bundle_path: str | os.PathLike,
        slice_axis: int = 2,
        config_overrides: dict | None = None,
        **kwargs,
    ):
        self._medsmile_bundle = Path(bundle_path)
        self._slice_axis = slice_axis
        self._config_overrides = dict(config_overrides or {})
        super().__init__(
            fragment,
            *args,
            app_context=app_context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_path=None,  # parsed on first compute, from self._medsmile_bundle (see _ensure_ready)
            **kwargs,
        )

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.output("pred")

    # -- bundle ----------------------------------------------------------------------------------------------------

    def _bundle_parser(self, bundle: Path) -> ConfigParser:
        """inference.json of the bundle folder or the one embedded in the TorchScript model, with ``bundle_root``
        and the overrides set. Read here, not by the SDK: for a ``.ts`` bundle the SDK looks for ``<stem>/extra/``,
        while ckpt_export names the archive folder after the whole file name (``model.ts/extra/``), so with a bare
        ``model.ts`` it found no inference.json and ran without pre- and post-processing; and ``bundle_root`` must be
        set before anything is parsed (``image_size`` is read from ``models/network.json``)."""
        parser = ConfigParser()
        if bundle.is_dir():
            parser.read_config(str(bundle / "configs" / "inference.json"))
        else:  # its image_size is the trained one, written into the embedded copy by the export
            parser.read_config(json.loads(embedded_file(bundle, "inference.json")))
        parser.read_meta(bundle_metadata(bundle))
        parser["bundle_root"] = str(bundle if bundle.is_dir() else DEFAULT_BUNDLE_ROOT)
        for key, value in self._config_overrides.items():
            parser[key] = value
        return parser

    def _ensure_ready(self) -> None:
        if self._init_completed and self._model_network is not None:
            return
        bundle = self._medsmile_bundle
        ensure_scripts_importable(bundle)
        self._bundle_path = bundle
        # what the SDK's _init_config sets, from this parser
        self._parser = parser = self._bundle_parser(bundle)
        self._device = parser.get_parsed_content("device") if parser.get("device") is not None else torch.device("cpu")
        self._inferer = parser.get_parsed_content(self._bundle_config_names.inferer_name)
        self._inputs = parser["_meta_"]["network_data_format"]["inputs"]
        self._outputs = parser["_meta_"]["network_data_format"]["outputs"]
        self._preproc = self._get_compose(self._bundle_config_names.preproc_name, ["LoadImage", "SaveImage"])
        self._postproc = self._get_compose(self._bundle_config_names.postproc_name, ["LoadImage", "SaveImage"])
        self._meta_key_postfix = self._get_meta_key_postfix(self._preproc)
        if bundle.is_dir():
            self._model_network = load_bundle_network(bundle, self._device, parser)
        else:
            self._model_network = torch.jit.load(str(bundle), map_location=self._device).eval()
        self._init_completed = True
        logger.info(
            "MedSMILE bundle %s: pre-processing %s, post-processing %s",
            bundle,
            [type(t).__name__ for t in self._preproc.transforms],
            [type(t).__name__ for t in self._postproc.transforms],
        )

    # -- inference -------------------------------------------------------------------------------------------------

    def segment_plane(self, plane: np.ndarray, name: str = "slice") -> np.ndarray:
        """One channel-first 2-D plane ``(C, X, Y)`` (any dtype) -> ``uint8`` class map ``(X, Y)`` through
        inference.json's pre-processing, inferer and post-processing (LoadImage/SaveImage dropped)."""
        self._ensure_ready()
        in_key, out_key = first(self._inputs), first(self._outputs)
        image = MetaTensor(
            torch.as_tensor(np.ascontiguousarray(plane)),
            meta={"original_channel_dim": 0, "filename_or_obj": name, "spatial_shape": np.asarray(plane.shape[1:])},
        )
        with torch.no_grad():
            inputs = self.pre_process({in_key: image})
            batch = inputs[in_key][None].to(self._device)
            logits = self.predict(data=batch)
            outputs = self.post_process(ensure_tuple(logits)[0], **{self.kw_preprocessed_inputs: inputs})
        mask = outputs[out_key]
        mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        mask = mask.reshape(mask.shape[-2:]) if mask.ndim == 3 and mask.shape[0] == 1 else mask
        if mask.shape != tuple(plane.shape[1:]):
            raise RuntimeError(f"{name}: mask shape {mask.shape} differs from the slice shape {plane.shape[1:]}")
        return np.rint(mask).astype(np.uint8)

    def segment(self, image: Image) -> Image:
        metadata = dict(image.metadata() or {})
        name = str(metadata.get("SeriesInstanceUID") or metadata.get("series_instance_uid") or "image")
        if metadata.get(PLANES_KEY):
            planes = np.asarray(image.asnumpy())  # (N, C, X, Y)
            masks = [self.segment_plane(p, f"{name}[{i}]") for i, p in enumerate(planes)]
            return Image(np.stack(masks), metadata=metadata)
        spatial = dicom_volume_to_spatial(image.asnumpy())  # (C, X, Y, Z); DICOM slices are along Z
        planes = volume_planes(spatial, slice_axis=2, name=name)
        masks = np.stack([self.segment_plane(p, f"{name}[{i}]") for i, p in enumerate(planes)])  # (Z, X, Y)
        return Image(np.ascontiguousarray(np.transpose(masks, (0, 2, 1))), metadata=metadata)  # (D, H, W)

    def compute(self, op_input, op_output, context):
        self._ensure_ready()
        image = op_input.receive("image")
        if not isinstance(image, Image):
            raise TypeError(f"input 'image' must be an SDK Image, got {type(image).__name__}")
        op_output.emit(self.segment(image), "pred")


class ImageFileLoaderOperator(Operator):
    """Emits one input (image file, NIfTI, DICOM file or series folder) per call as an ``Image`` of planes.

    Reads with the bundle's readers (``scripts.image_io``). 2-D inputs: the raw channel-first plane (inference.json's
    ``IntensityToRGBd`` scales it, as for a file). Volumes: ``read_case``'s slices (volume-wide window) as 8-bit.
    Run it with ``CountCondition(app, len(paths))``.
    """

    def __init__(self, fragment: Fragment, *args, paths, dataset_root=None, slice_axis: int = 2, **kwargs):
        self._paths = [str(p) for p in paths]
        self._root = str(dataset_root) if dataset_root else None
        self._slice_axis = slice_axis
        self._index = 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def load(self, path: str) -> Image:
        from scripts.image_io import _load, _to_spatial, read_case

        case, slices = read_case(path, slice_axis=self._slice_axis, dataset_root=self._root)
        if case.is_volume:
            planes = [to_uint8(s) for s in slices]
        else:
            data, _meta, _reader, kind = _load(path)
            data = _to_spatial(data, path, kind)
            squeezed = case.meta.get("squeezed_axis")
            planes = [np.take(data, 0, axis=squeezed + 1) if squeezed is not None else data]
        return Image(np.stack(planes), metadata={PLANES_KEY: True, CASE_KEY: case, "source": path})

    def compute(self, op_input, op_output, context):
        if self._index >= len(self._paths):
            raise RuntimeError("no input left to load (the loader ran more often than there are inputs)")
        path = self._paths[self._index]
        self._index += 1
        logger.info("MedSMILE input %d/%d: %s", self._index, len(self._paths), path)
        op_output.emit(self.load(path), "image")


class MaskFileWriterOperator(Operator):
    """Writes the ``(N, X, Y)`` masks of a file input as ``<name>_seg.png`` (2-D inputs) or ``<name>_seg.nii.gz``
    (NIfTI and 3-D inputs, with the input's affine) with ``scripts.image_io.write_label``."""

    def __init__(self, fragment: Fragment, *args, output_folder, **kwargs):
        self.output_folder = Path(output_folder)
        self.written: list[str] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("seg_image")

    def compute(self, op_input, op_output, context):
        from scripts.image_io import write_label

        image = op_input.receive("seg_image")
        case = image.metadata()[CASE_KEY]
        masks = list(np.asarray(image.asnumpy()))
        out_case = dataclasses.replace(case, name=case.name + OUTPUT_POSTFIX)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = write_label(out_case, masks, self.output_folder)
        self.written.append(path)
        logger.info("MedSMILE mask written: %s", path)
