"""Check that MONAI Label serves this bundle and gives the bundle's own segmentation.

Three stages, each in the interpreter that a user would have:

1. (project python) Make a bundle folder the way MONAI Label receives one (``configs/``, ``scripts/``,
   ``models/model.pt`` + ``models/network.json``): copy ``bundle/configs`` and ``bundle/scripts`` into a work folder
   and train a tiny model there with ``configs/medsmile.json`` (random-init tiny DINOv2, generated images, the
   tests' sizes from ``benchmarks/tiny_bundle.py``; inference.json reads that image_size from models/network.json,
   as MONAI Label will; class head and mask embedder then scaled so that the masks are not a single class, see
   ``sharpen``). ``--bundle DIR``
   takes an existing trained bundle folder instead. Then run the bundle's own ``configs/inference.json`` with
   ``python -m monai.bundle run`` on test images (RGB and grey 8-bit PNG, 16-bit grey PNG, JPEG; sizes that are not
   multiples of 14), and, from the same config's objects, the class probabilities before ``AsDiscreted``.
2. (MONAI Label virtual environment, ``--venv``) In-process, as the server does:
   a. stock ``BundleInferTask(bundle, {})`` called once per image (what ``POST /infer/<model>`` runs): the label
      map after MONAI Label's post transforms, and the file its writer makes (or the writer's error);
   b. the same task with the postprocessing cut before ``AsDiscreted``: class probabilities at the input size;
   c. the sample app ``bundle/docs/monailabel/app`` through ``MONAILabelApp.infer`` on the datastore's image ids:
      the label file the server would send back.
3. (project python) Compare with the bundle's ``<name>_seg.png`` and probabilities: exact equality of the label
   maps, foreground pixel counts, largest probability difference. PASS needs (a) label maps, (c) files and (b)
   probabilities (within ``--atol``) to match; the stock writer's file (a) is reported separately and is required
   only with ``--require-stock-writer``.

The probabilities are compared as well as the masks: they vary over the whole image, so they catch a flipped or
transposed geometry even where a model's mask is a single class (as with a degenerate model).

Usage (from the repository root; ``bundle/docs/monailabel/README.md`` says how to build the venv)::

    python benchmarks/monailabel_check.py --venv /tmp/mlvenv            # trains a tiny model first (~1 min)
    python benchmarks/monailabel_check.py --venv /tmp/mlvenv --bundle path/to/trained/bundle

Exit code 0 on PASS, 1 on FAIL, 2 when the venv is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_SRC = os.path.join(REPO, "bundle")
ML_DOCS = os.path.join(BUNDLE_SRC, "docs", "monailabel")
MODEL_NAME = "medsmile"
# weight scale that makes the tiny model's output informative (see sharpen)
SHARPEN = 30.0
# name -> (height, width, kind): sizes that are not multiples of the patch size, every 2-D type MONAI Label lists
TEST_IMAGES = {
    "rgb_a": (61, 83, "rgb"),
    "rgb_b": (100, 70, "rgb"),
    "grey8": (77, 77, "grey8"),
    "grey16": (64, 90, "grey16"),
    "photo": (72, 96, "jpeg"),
}


def log(msg: str) -> None:
    print(f"[monailabel_check] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# stage 1: project python
# ----------------------------------------------------------------------------------------------------------------
def _tiny():
    """benchmarks/tiny_bundle.py (the script runs where pytest is absent: it must not import the tests)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from benchmarks import tiny_bundle

    return tiny_bundle


def write_test_images(folder: str, seed: int = 7) -> None:
    import numpy as np
    from PIL import Image

    blob_image = _tiny().blob_image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (h, w, kind) in TEST_IMAGES.items():
        rgb, _ = blob_image(rng, h, w)
        if kind == "grey8":
            rgb = rgb.mean(-1).astype(np.uint8)
        elif kind == "grey16":
            rgb = (rgb.mean(-1) * 200 + rng.normal(0, 50, (h, w))).clip(0, 65535).astype(np.uint16)
        Image.fromarray(rgb).save(os.path.join(folder, f"{name}.{'jpg' if kind == 'jpeg' else 'png'}"))


def train_tiny_bundle(work: str) -> str:
    """A bundle folder under ``work`` with configs/ and scripts/ from the repository and a tiny trained model."""
    helpers = _tiny()
    bundle = os.path.join(work, MODEL_NAME)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(BUNDLE_SRC, "configs"), os.path.join(bundle, "configs"), ignore=ignore)
    shutil.copytree(os.path.join(BUNDLE_SRC, "scripts"), os.path.join(bundle, "scripts"), ignore=ignore)

    encoder = helpers.make_tiny_encoder(os.path.join(work, "tiny_dinov2"))
    data = helpers.write_blob_dataset(
        os.path.join(work, "train_data"), [(40, 60), (50, 50), (64, 48), (30, 70), (56, 56), (45, 52)]
    )

    overrides = {  # inference.json, hence MONAI Label, reads the training image_size from models/network.json
        **helpers.TINY_OVERRIDES,
        "num_rounds": 1,
        "output_dir": os.path.join(work, "run"),
        "model_path": os.path.join(bundle, "models", "model.pt"),
        "encoder_weights": encoder,
        **data,
        "log_level": "WARNING",
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/medsmile.json", "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    subprocess.run(cmd, cwd=bundle, check=True)
    sharpen(os.path.join(bundle, "models", "model.pt"))
    return bundle


def sharpen(model_path: str, factor: float = SHARPEN) -> None:
    """Scale the class head and the mask embedder of a trained state dict in place. A model this small trained this
    briefly outputs about 0.5 everywhere (one class, probabilities within 1e-3); scaled, its label maps hold both
    classes and follow the image, which a flipped or transposed geometry could not match by chance."""
    import torch

    state = torch.load(model_path, weights_only=True)
    for key in state:
        if key.startswith("mask2former.class_predictor.") or (".mask_embedder." in key and key.endswith(".weight")):
            state[key] = state[key] * factor
    torch.save(state, model_path)


def bundle_inference(bundle: str, images: str, out: str) -> None:
    """The bundle's own inference.json, run with MONAI's bundle runner as the README says."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", "."]
    cmd += ["--dataset_dir", images, "--output_dir", out]
    subprocess.run(cmd, cwd=bundle, check=True)


def bundle_probabilities(bundle: str, images: str, out: str) -> None:
    """Class probabilities at each input's size from inference.json's own objects: preprocessing, network_def with
    models/model.pt, inferer, then postprocessing up to (without) its first AsDiscreted. Run in a subprocess."""
    import numpy as np
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import AsDiscreted, Compose

    sys.path.insert(0, bundle)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.update({"bundle_root": bundle, "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(os.path.join(bundle, "models", "model.pt"), weights_only=True))
    network.eval()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = list(parser.get_parsed_content("postprocessing").transforms)
    post = Compose(post[: next((i for i, t in enumerate(post) if isinstance(t, AsDiscreted)), len(post))])
    os.makedirs(out, exist_ok=True)
    for fname in sorted(os.listdir(images)):
        d = pre({"image": os.path.join(images, fname)})
        with torch.no_grad():
            d["pred"] = inferer(d["image"][None], network)[0]
        d = post(d)
        np.save(os.path.join(out, f"{os.path.splitext(fname)[0]}_prob.npy"), d["pred"].numpy())


# ----------------------------------------------------------------------------------------------------------------
# stage 2: MONAI Label venv (imports only what that venv has)
# ----------------------------------------------------------------------------------------------------------------
def _to_numpy(x):
    import numpy as np

    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def monailabel_worker(bundle: str, images: str, out: str) -> None:
    import importlib.metadata as md
    import logging

    import numpy as np

    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, ML_DOCS)
    import torchvision_shim

    sys.path.remove(ML_DOCS)
    stand_in = torchvision_shim.install()
    from monai.transforms import AsDiscreted
    from monailabel.tasks.infer.basic_infer import CallBackTypes
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.transform.post import Restored

    os.makedirs(out, exist_ok=True)
    versions = {}
    for pkg in ("monailabel", "monai", "torch", "torchvision", "numpy", "transformers", "pytorch-ignite", "itk"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    if stand_in:
        versions["torchvision"] = f"stand-in for monailabel's import (real one: {stand_in})"
    report = {"versions": versions, "python": sys.version.split()[0], "images": {}, "app": {}}

    # a. stock BundleInferTask, as the monaibundle app builds it
    t0 = time.time()
    task = BundleInferTask(bundle, {})
    info = task.info() if task.is_valid() else {}
    report["task"] = {
        "valid": task.is_valid(),
        "build_s": round(time.time() - t0, 2),
        "type": str(info.get("type")),
        **{k: info.get(k) for k in ("labels", "dimension", "version")},
        "model_path": task.get_path() if task.is_valid() else None,
        "network": type(task.network).__name__ if task.is_valid() and task.network is not None else None,
    }
    if not task.is_valid():
        raise SystemExit("MONAI Label's BundleInferTask rejected the bundle")

    # b. the same task with the bundle's postprocessing cut before AsDiscreted (MONAI Label's Restored kept)
    class ProbabilityTask(BundleInferTask):
        def post_transforms(self, data=None):
            post = list(super().post_transforms(data))
            cut = next((i for i, t in enumerate(post) if isinstance(t, AsDiscreted)), len(post))
            return post[:cut] + [t for t in post[cut:] if isinstance(t, Restored)]

    soft = ProbabilityTask(bundle, {})

    for fname in sorted(os.listdir(images)):
        name = os.path.splitext(fname)[0]
        path = os.path.join(images, fname)
        entry = {"image_suffix": os.path.splitext(fname)[1].lower()}

        def keep(data, name=name):
            np.save(os.path.join(out, f"{name}_post.npy"), _to_numpy(data["pred"]))
            return data

        t0 = time.time()
        try:
            label_file, result = task({"image": path}, {CallBackTypes.POST_TRANSFORMS: keep})
            kept = os.path.join(out, f"{name}_stock{os.path.splitext(label_file)[1]}")
            shutil.move(label_file, kept)
            entry["stock_file"] = kept
        except Exception as err:  # noqa: BLE001 - the writer's error; the callback kept the label map before it
            entry["stock_writer_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
        entry["infer_s"] = round(time.time() - t0, 2)
        _, data = soft({"image": path, "skip_writer": True})
        np.save(os.path.join(out, f"{name}_prob.npy"), _to_numpy(data["pred"]))
        report["images"][name] = entry

    # c. the sample app, as the server's POST /infer/<model>?image=<id> runs it
    app_dir, studies = os.path.join(out, "app"), os.path.join(out, "studies")
    os.makedirs(os.path.join(app_dir, "model"))
    shutil.copy(os.path.join(ML_DOCS, "app", "main.py"), app_dir)
    os.symlink(os.path.abspath(bundle), os.path.join(app_dir, "model", MODEL_NAME))
    shutil.copytree(images, studies)
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import app_instance

    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    t0 = time.time()
    app = app_instance(app_dir, studies, {"models": MODEL_NAME})
    report["app"]["build_s"] = round(time.time() - t0, 2)
    report["app"]["models"] = sorted(app.info()["models"])
    report["app"]["datastore_images"] = sorted(app.datastore().list_images())
    for image_id in report["app"]["datastore_images"]:
        t0 = time.time()
        result = app.infer({"model": MODEL_NAME, "image": image_id})
        label = result["file"]
        kept = os.path.join(out, f"{image_id}_app{os.path.splitext(label)[1]}")
        shutil.move(label, kept)
        report["app"][image_id] = {"file": kept, "infer_s": round(time.time() - t0, 2)}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)


# ----------------------------------------------------------------------------------------------------------------
# stage 3: comparison (project python)
# ----------------------------------------------------------------------------------------------------------------
def read_label_file(path: str):
    """A written label map as (rows, columns[, ...]): PIL for PNG/JPEG, ITK for what PIL does not read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        return np.asarray(Image.open(path))
    except UnidentifiedImageError:
        import itk

        return np.asarray(itk.array_from_image(itk.imread(path)))


def compare(bundle_out: str, probs_out: str, ml_out: str, atol: float) -> tuple[dict, list[dict]]:
    import numpy as np
    from PIL import Image

    with open(os.path.join(ml_out, "report.json")) as f:
        report = json.load(f)
    rows = []
    for name in sorted(report["images"]):
        ref = np.asarray(Image.open(os.path.join(bundle_out, f"{name}_seg.png"))).astype(np.int64)
        row = {"image": name, "size_hxw": list(ref.shape), "bundle_fg_px": int((ref > 0).sum())}
        row["jpeg_image"] = report["images"][name]["image_suffix"] in (".jpg", ".jpeg")
        # MONAI order (1, X, Y) -> image rows/columns (Y, X)
        post = np.load(os.path.join(ml_out, f"{name}_post.npy"))
        row["monailabel_pred_shape"] = list(post.shape)
        post = np.squeeze(post, 0).T.astype(np.int64) if post.ndim == 3 else post.T.astype(np.int64)
        row["label_equal"] = post.shape == ref.shape and bool(np.array_equal(post, ref))
        if post.shape == ref.shape:
            row["label_diff_px"] = int((post != ref).sum())
            row["monailabel_fg_px"] = int((post > 0).sum())
        prob_ml = np.load(os.path.join(ml_out, f"{name}_prob.npy"))
        prob_ref = np.load(os.path.join(probs_out, f"{name}_prob.npy"))
        if prob_ml.shape == prob_ref.shape:
            row["prob_max_abs_diff"] = float(np.abs(prob_ml - prob_ref).max())
            row["prob_fg_range"] = [round(float(prob_ref[1].min()), 4), round(float(prob_ref[1].max()), 4)]
            row["prob_equal"] = row["prob_max_abs_diff"] <= atol
            # the bundle's mask is the argmax of these probabilities (sanity of the reference itself)
            row["bundle_mask_is_argmax"] = bool(np.array_equal(prob_ref.argmax(0).T, ref))
        else:
            row["prob_equal"], row["prob_shapes"] = False, [list(prob_ml.shape), list(prob_ref.shape)]
        for kind, path in (
            ("stock_file", report["images"][name].get("stock_file")),
            ("app_file", report["app"].get(name, {}).get("file")),
        ):
            if not path:
                row[f"{kind}_equal"] = False
                continue
            written = read_label_file(path)
            row[f"{kind}_shape"] = list(written.shape)
            row[f"{kind}_equal"] = written.shape == ref.shape and bool(np.array_equal(written.astype(np.int64), ref))
            if written.shape == ref.shape and not row[f"{kind}_equal"]:
                row[f"{kind}_diff_px"] = int((written.astype(np.int64) != ref).sum())
            if path.lower().endswith((".jpg", ".jpeg")):
                row[f"{kind}_is_jpeg"] = True
        if "stock_writer_error" in report["images"][name]:
            row["stock_writer_error"] = report["images"][name]["stock_writer_error"]
        rows.append(row)
    return report, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=os.environ.get("MONAILABEL_VENV", "/tmp/mlvenv"), help="MONAI Label venv")
    parser.add_argument("--bundle", help="an existing bundle folder with models/model.pt (default: train a tiny one)")
    parser.add_argument("--images", help="a folder of 2-D .png/.jpg test images (default: generated ones)")
    parser.add_argument("--work", help="work folder, kept (default: a temporary folder, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest allowed probability difference")
    parser.add_argument(
        "--require-stock-writer", action="store_true", help="FAIL unless the stock writer's files match"
    )
    parser.add_argument("--worker", nargs=3, metavar=("BUNDLE", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--bundle-probs", nargs=3, metavar=("BUNDLE", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        monailabel_worker(*args.worker)
        return 0
    if args.bundle_probs:
        bundle_probabilities(*args.bundle_probs)
        return 0

    venv_python = os.path.join(args.venv, "bin", "python")
    if not os.path.isfile(venv_python):
        log(f"FAIL: no MONAI Label venv at {args.venv} (see bundle/docs/monailabel/README.md)")
        return 2
    work = args.work or tempfile.mkdtemp(prefix="monailabel_check_")
    os.makedirs(work, exist_ok=True)
    timings = {}
    start = time.time()
    try:
        t0 = time.time()
        if args.bundle:
            bundle = os.path.abspath(args.bundle)
        else:
            log("stage 1: training a tiny model with configs/medsmile.json (project python)")
            bundle = train_tiny_bundle(work)
            timings["train_s"] = round(time.time() - t0, 1)
        for f in ("models/model.pt", "models/network.json", "configs/inference.json", "configs/metadata.json"):
            if not os.path.isfile(os.path.join(bundle, f)):
                log(f"FAIL: {bundle} lacks {f}")
                return 1
        images = os.path.join(work, "test_images")
        if args.images:
            os.makedirs(images)
            for fname in sorted(os.listdir(args.images)):
                if os.path.splitext(fname)[1].lower() in (".png", ".jpg", ".jpeg"):
                    shutil.copy(os.path.join(args.images, fname), images)
        else:
            write_test_images(images)
        t0 = time.time()
        bundle_out, probs_out = os.path.join(work, "bundle_inference"), os.path.join(work, "bundle_probs")
        bundle_inference(bundle, images, bundle_out)
        me = os.path.abspath(__file__)
        subprocess.run([sys.executable, me, "--bundle-probs", bundle, images, probs_out], cwd=bundle, check=True)
        timings["bundle_inference_s"] = round(time.time() - t0, 1)

        log(f"stage 2: MONAI Label's BundleInferTask and the sample app in {args.venv}")
        t0 = time.time()
        ml_out = os.path.join(work, "monailabel")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        subprocess.run([venv_python, me, "--worker", bundle, images, ml_out], check=True, env=env)
        timings["monailabel_s"] = round(time.time() - t0, 1)

        report, rows = compare(bundle_out, probs_out, ml_out, args.atol)
        timings["total_s"] = round(time.time() - start, 1)
        log(f"MONAI Label venv: python {report['python']}, {json.dumps(report['versions'])}")
        log(f"BundleInferTask: {json.dumps(report['task'], default=str)}")
        log(f"sample app: models {report['app']['models']}, datastore images {report['app']['datastore_images']}")
        for row in rows:
            log(json.dumps(row))
        log(f"timings: {json.dumps(timings)}")
        n = len(rows)
        counts = {k: sum(bool(r.get(k)) for r in rows) for k in ("label_equal", "prob_equal", "app_file_equal")}
        # MONAI Label writes a label with its image's suffix: for a JPEG image that is a lossy JPEG, never exact
        lossless = [r for r in rows if not r["jpeg_image"]]
        stock = sum(bool(r.get("stock_file_equal")) for r in lossless)
        stock_ok = stock == len(lossless)
        max_diff = max(r.get("prob_max_abs_diff", float("inf")) for r in rows)
        ok = all(v == n for v in counts.values()) and (stock_ok or not args.require_stock_writer)
        errors = sorted({r["stock_writer_error"] for r in rows if "stock_writer_error" in r})
        log(
            f"stock BundleInferTask writer: {'PASS' if stock_ok else 'FAIL'} ({stock}/{len(lossless)} written label "
            f"files equal the bundle's; JPEG images not counted: their label is written as a lossy JPEG; "
            f"errors: {errors})"
        )
        log(
            f"{'PASS' if ok else 'FAIL'}: label maps after MONAI Label's post transforms equal the bundle's "
            f"inference.json masks for {counts['label_equal']}/{n} images; probabilities within {args.atol} for "
            f"{counts['prob_equal']}/{n} (largest difference {max_diff:.3g}); sample app /infer files equal for "
            f"{counts['app_file_equal']}/{n}; {timings['total_s']} s"
        )
        return 0 if ok else 1
    finally:
        if args.keep or args.work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
