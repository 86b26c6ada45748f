"""A minimal MONAI Label app that serves local MONAI bundles (such as MedSMILE) with MONAI Label's own
``BundleInferTask``; no model-zoo download, so it works offline.

Layout MONAI Label expects (``start_server.sh`` beside this folder sets it up)::

    <app_dir>/main.py            this file
    <app_dir>/model/<name>/      a bundle: configs/inference.json, configs/metadata.json, scripts/, models/model.pt

Start: ``monailabel start_server --app <app_dir> --studies <images> --conf models <name>[,<name2>]``.
Each name becomes an inference model of that name; training is not offered (the MedSMILE pipeline trains with
``configs/medsmile.json``, not with a MONAI Label ``train.json``).

Why not MONAI Label's stock ``monaibundle`` app unchanged: for a 2-D bundle, ``BundleInferTask`` hands its writer
the bundle's channel-first label ``(1, X, Y)`` (``Restored`` only drops the channel of 4-D arrays), and the writer
then saves a 3-D image (a 2-D PNG input gives an ``X x 1`` PNG); a float label map cannot be written as PNG at all.
MONAI Label's own 2-D bundle task (endoscopy tool tracking) appends a ``SqueezeDimd`` for this; ``Bundle2DInferTask``
below does the same and casts to ``uint8``. It is a no-op once the bundle's postprocessing ends in a 2-D ``uint8``
label (see README.md beside this folder).
"""

from __future__ import annotations

import logging
import os

import monailabel
import numpy as np
import torch
from monai.transforms import MapTransform
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

logger = logging.getLogger(__name__)


class Label2Dd(MapTransform):
    """A 2-D label map as MONAI Label's writer needs it: ``(1, X, Y)`` -> ``(X, Y)``, and ``uint8`` (PNG)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.ndim == 3 and label.shape[0] == 1:
                label = label[0]
            if label.dtype not in (torch.uint8, np.uint8) and 0 <= float(label.min()) <= float(label.max()) < 256:
                label = label.to(torch.uint8) if torch.is_tensor(label) else label.astype(np.uint8)
            d[key] = label
        return d


class TrainedModelConstants(BundleConstants):
    """MONAI Label's bundle file names, but the metadata of the trained model: ``models/metadata.json``, which a
    MedSMILE run writes beside its model with its classes (``channel_def``: MONAI Label's label names), when present;
    else ``configs/metadata.json`` (which describes the default 2-class model)."""

    def __init__(self, path: str):
        self.path = path

    def metadata_json(self) -> str:
        run_file = os.path.join(self.path, "models", "metadata.json")
        return os.path.join(os.pardir, "models", "metadata.json") if os.path.isfile(run_file) else "metadata.json"


class Bundle2DInferTask(BundleInferTask):
    """``BundleInferTask`` whose last post transform makes a 2-D bundle's label writable (3-D bundles untouched),
    and which writes the label of a JPEG image as PNG (MONAI Label takes the image's suffix: a JPEG label map is
    lossy and no longer holds class indices) unless the request names ``result_extension``. Labels, dimension and
    description come from the trained model's metadata (``TrainedModelConstants``)."""

    def __init__(self, path, conf, **kwargs):
        super().__init__(path, conf, const=TrainedModelConstants(path), **kwargs)

    def post_transforms(self, data=None):
        post = list(super().post_transforms(data))
        if self.dimension == 2:
            post.append(Label2Dd(keys=self.key_pred))
        return post

    def writer(self, data, extension=None, dtype=None):
        image = data.get("image_path")
        lossy = isinstance(image, str) and image.lower().endswith((".jpg", ".jpeg"))
        if extension is None and not data.get("result_extension") and lossy:
            extension = ".png"
        return super().writer(data, extension=extension, dtype=dtype)


class LocalBundleApp(MONAILabelApp):
    """Inference tasks for the bundles named in ``--conf models`` (folders under ``<app_dir>/model``)."""

    def __init__(self, app_dir, studies, conf):
        names = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        if not names:
            raise ValueError("pass the bundle folder name(s) under <app_dir>/model with --conf models <name>")
        self.bundles = {}
        for name in names:
            path = os.path.join(app_dir, "model", name)
            if not os.path.isfile(os.path.join(path, "configs", "inference.json")):
                raise FileNotFoundError(f"{path} is not a bundle (no configs/inference.json)")
            self.bundles[name] = path
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - local bundles ({monailabel.__version__})",
            description="MONAI bundles served from <app_dir>/model",
            version=monailabel.__version__,
        )

    def init_infers(self):
        infers = {}
        for name, path in self.bundles.items():
            task = Bundle2DInferTask(path, self.conf)
            if not task.is_valid():
                raise RuntimeError(f"MONAI Label rejected bundle {path} (see the warning above: model file missing?)")
            logger.info(f"+++ Adding Inferer:: {name} => {path}")
            infers[name] = task
        return infers

    def init_strategies(self):
        return {"random": Random(), "first": First()}
