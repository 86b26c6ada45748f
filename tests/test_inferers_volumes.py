"""configs/inference.json on 3-D volumes: slice by slice (SliceInferer), NIfTI out with the input's geometry."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from test_model_files import run_inference


class BrightProbe(torch.nn.Module):
    """(B, 3, H, W) in [0, 1] -> 2-class log-probabilities: class 1 where the grey level is above 0.5. 2-D only."""

    def forward(self, x):
        logit = 12.0 * (x.mean(dim=1, keepdim=True) - 0.5)
        return torch.log_softmax(torch.cat([-logit, logit], dim=1), dim=1)


@pytest.fixture
def volume(tmp_path):
    """(X, Y, Z) = (56, 50, 3) int16 NIfTI, oblique-free but non-trivial affine; a bright blob on slice 1 only."""
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (56, 50, 3))
    xx, yy = np.mgrid[0:56, 0:50]
    blob = (xx - 30) ** 2 + (yy - 20) ** 2 < 10**2
    data[..., 1][blob] = 900
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 5]
    folder = tmp_path / "volumes"
    folder.mkdir()
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), folder / "vol.nii.gz")
    return {"dir": folder, "affine": affine, "blob": blob}


def tiny_model(tiny_encoder, folder, image_size=56):
    """A random-init network as a run exports it (models/model.pt + network.json), without training."""
    from scripts.model_files import NETWORK_FILE
    from scripts.network import Mask2FormerDinov2

    spec = {"num_classes": 2, "hidden_dim": 32, "num_queries": 4, "decoder_layers": 1, "pixel_decoder_layers": 1}
    spec["feature_pyramid"] = "project_first"  # as network.json records it
    torch.manual_seed(0)
    network = Mask2FormerDinov2(encoder_config=tiny_encoder, **spec)
    folder.mkdir()
    torch.save(network.state_dict(), folder / "model.pt")
    with open(os.path.join(tiny_encoder, "config.json")) as f:
        encoder_config = json.load(f)
    (folder / NETWORK_FILE).write_text(json.dumps({**spec, "encoder_config": encoder_config, "image_size": image_size}))
    return folder


def test_inference_json_segments_a_volume_slice_by_slice(tiny_encoder, volume, tmp_path):
    models = tiny_model(tiny_encoder, tmp_path / "models")
    out = tmp_path / "pred"
    run_inference(models, volume["dir"], out)
    written = nib.load(out / "vol_seg.nii.gz")  # before: ValueError "expected a 2-D channel-first image"
    assert written.shape == (56, 50, 3)
    np.testing.assert_allclose(written.affine, volume["affine"], atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}

    # a network that sees the blob: slices without it come back empty, the blob slice holds it
    probe = tmp_path / "probe.ts"
    torch.jit.save(torch.jit.trace(BrightProbe().eval(), torch.rand(1, 3, 56, 56)), str(probe))
    run_inference(
        models, volume["dir"], tmp_path / "probe_pred", network=f"$torch.jit.load({str(probe)!r})", handlers=[]
    )
    mask = np.asarray(nib.load(tmp_path / "probe_pred" / "vol_seg.nii.gz").dataobj)
    assert mask[..., 0].sum() == 0 and mask[..., 2].sum() == 0
    dice = 2 * (mask[..., 1].astype(bool) & volume["blob"]).sum() / (mask[..., 1].sum() + volume["blob"].sum())
    assert dice > 0.9
