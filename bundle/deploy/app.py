"""MedSMILE MONAI Deploy application: DICOM series -> DICOM SEG, PNG/NIfTI images -> PNG/NIfTI masks.

DICOM input (every file under ``-i`` is DICOM)::

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator
        -> SliceBundleInferenceOperator (the SDK's MonaiBundleInferenceOperator, slice by slice)
        -> DICOMSegmentationWriterOperator (one segment per foreground class of metadata.json's channel_def)

Other input (PNG/JPG/BMP/TIFF, NIfTI; DICOM files among them are read the same way)::

    ImageFileLoaderOperator (one input per call) -> SliceBundleInferenceOperator -> MaskFileWriterOperator

Run: ``python bundle/deploy/app.py -i <input> -o <output> -m <bundle folder | model.ts | bundle.zip>`` or
``python -m bundle.deploy ...`` from the repository root (``-i/-o/-m`` default to the SDK's ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, parse_args
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.dicom_utils import ModelInfo
from pydicom.sr.codedict import codes

try:  # python -m bundle.deploy / import deploy.app
    from .medsmile_operators import (
        ImageFileLoaderOperator,
        MaskFileWriterOperator,
        SliceBundleInferenceOperator,
        bundle_metadata,
        ensure_scripts_importable,
        output_classes,
        resolve_bundle,
    )
except ImportError:  # python bundle/deploy/app.py, or the packaged app folder
    from medsmile_operators import (
        ImageFileLoaderOperator,
        MaskFileWriterOperator,
        SliceBundleInferenceOperator,
        bundle_metadata,
        ensure_scripts_importable,
        output_classes,
        resolve_bundle,
    )

logger = logging.getLogger(__name__)

OVERRIDES_ENV = "MEDSMILE_CONFIG_OVERRIDES"
SERIES_DESCRIPTION = "MedSMILE AI segmentation, research use, not for clinical use"


def is_dicom_input(input_path: Path) -> bool:
    """True when the input holds DICOM and nothing else the bundle reads (then the DICOM SEG route is taken)."""
    from scripts.image_io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, _has_dicom_preamble, _lower_suffix

    files = [input_path] if input_path.is_file() else [p for p in input_path.rglob("*") if p.is_file()]
    files = [p for p in files if not p.name.startswith(".")]
    if any(_lower_suffix(p.name) in IMAGE_SUFFIXES + NIFTI_SUFFIXES for p in files):
        return False
    return any(_has_dicom_preamble(str(p)) for p in files)


def file_inputs(input_path: Path) -> list[str]:
    from scripts.image_io import list_inputs

    return [str(input_path)] if input_path.is_file() else list_inputs(input_path)


def segment_descriptions(metadata: dict) -> list[SegmentDescription]:
    """One DICOM SEG segment per foreground class (1..C-1) of metadata.json's output ``channel_def``."""
    classes = output_classes(metadata)
    if len(classes) < 2:
        raise ValueError("metadata.json: the network output channel_def must name background and >= 1 class")
    return [
        SegmentDescription(
            segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_name="MedSMILE"[:64],
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=str(metadata.get("version", ""))[:64],
        )
        for index, name in classes.items()
        if index > 0
    ]


class MedSmileSegApp(Application):
    """DICOM series or image files in, DICOM SEG or PNG/NIfTI masks out, with the MedSMILE bundle's TorchScript model.

    Args:
        series_rules: JSON selection rules for ``DICOMSeriesSelectorOperator`` (default: every series; the SDK
            converts and segments the first selected series of the first study).
        slice_axis: axis along which non-DICOM volumes (NIfTI) are cut, as the bundle's ``--slice_axis``.
        config_overrides: inference.json ids to override, e.g. ``{"image_size": 518}`` (default: the size recorded
            with the model); default: the JSON object in ``$MEDSMILE_CONFIG_OVERRIDES``.
    """

    def __init__(self, *args, series_rules: str = "", slice_axis: int = 2, config_overrides: dict | None = None, **kw):
        self._series_rules = series_rules
        self._slice_axis = slice_axis
        if config_overrides is None and os.environ.get(OVERRIDES_ENV):
            config_overrides = json.loads(os.environ[OVERRIDES_ENV])
            if not isinstance(config_overrides, dict):
                raise ValueError(f"${OVERRIDES_ENV} must hold a JSON object, e.g. '{{\"image_size\": 518}}'")
        self._config_overrides = config_overrides
        self.mode: str | None = None
        super().__init__(*args, **kw)

    def compose(self):
        # parse_args + AppContext rather than init_app_context: the latter also reconfigures the root logger
        args = parse_args(self.argv)
        app_context = AppContext({k: v for k, v in vars(args).items() if v})
        input_path = Path(app_context.input_path).expanduser().resolve()
        output_path = Path(app_context.output_path).expanduser().resolve()
        bundle = resolve_bundle(app_context.model_path, app_context.workdir or None)
        ensure_scripts_importable(bundle)
        metadata = bundle_metadata(bundle)
        output_path.mkdir(parents=True, exist_ok=True)
        logger.info("MedSMILE app: input %s, output %s, bundle %s", input_path, output_path, bundle)

        infer = SliceBundleInferenceOperator(
            self,
            app_context=app_context,
            bundle_path=bundle,
            slice_axis=self._slice_axis,
            config_overrides=self._config_overrides,
            name="medsmile_inference",
        )
        if is_dicom_input(input_path):
            self.mode = "dicom"
            if not input_path.is_dir():
                raise ValueError(f"{input_path}: DICOM input must be a folder")
            loader = DICOMDataLoaderOperator(
                self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader"
            )
            selector = DICOMSeriesSelectorOperator(self, rules=self._series_rules, name="series_selector")
            to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            writer = DICOMSegmentationWriterOperator(
                self,
                segment_descriptions=segment_descriptions(metadata),
                custom_tags={"SeriesDescription": SERIES_DESCRIPTION},
                output_folder=output_path,
                model_info=ModelInfo(
                    creator=str(metadata.get("authors", "")),
                    name=str(metadata.get("name", "MedSMILE")),
                    version=str(metadata.get("version", "")),
                ),
                omit_empty_frames=False,  # one SEG frame per source slice, empty or not
                name="dicom_seg_writer",
            )
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, infer, {("image", "image")})
            self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(infer, writer, {("pred", "seg_image")})
        else:
            self.mode = "files"
            paths = file_inputs(input_path)
            if not paths:
                raise ValueError(f"{input_path}: no image, NIfTI or DICOM input found")
            root = input_path if input_path.is_dir() else input_path.parent
            loader = ImageFileLoaderOperator(
                self,
                CountCondition(self, len(paths)),
                paths=paths,
                dataset_root=root,
                slice_axis=self._slice_axis,
                name="file_loader",
            )
            writer = MaskFileWriterOperator(self, output_folder=output_path, name="mask_writer")
            self.add_flow(loader, infer, {("image", "image")})
            self.add_flow(infer, writer, {("pred", "seg_image")})


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: SDK logging set-up, then the app (argv as ``sys.argv``: program name first)."""
    from monai.deploy.core.arg_parser import set_up_logging

    argv = list(sys.argv if argv is None else argv)
    set_up_logging(parse_args(argv).log_level)
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    MedSmileSegApp([sys.executable, *argv]).run()


if __name__ == "__main__":
    main()
