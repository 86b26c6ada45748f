"""Self-supervised (MoCo-style) encoder fine-tuning: EMA, InfoNCE, teacher without gradients, training, output
folder, skip-if-done and resume, all on a tiny random DINOv2."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import list_data_collate
from monai.engines.utils import IterationEvents
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from scripts import encoder_finetune as ef
from scripts.encoder import load_dinov2, resolve_encoder

SMALL = {
    "batch_size": 4,
    "global_crop_size": 56,
    "local_crop_size": 28,
    "num_local_crops": 2,
    "projection_dim": 16,
    "learning_rate": 1e-4,
}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56
    )
    path = tmp_path_factory.mktemp("encoder") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(6, 3, 7, 7, generator=g), size=(56, 56), mode="bilinear")
    return (smooth * 255).round().to(torch.uint8)


def _views(augment, images: torch.Tensor, seed: int) -> dict:
    """A collated batch of multi-crop views of ``images``, the transform seeded with ``seed``."""
    augment.set_random_state(seed)
    return list_data_collate([augment({"image": image}) for image in images])


def _trainer(encoder_dir: str, loader, lr: float = 1e-3, momentum: float = 0.996):
    """A trainer (one epoch over ``loader``) and its teacher, as finetune_encoder builds them."""
    encoder = Dinov2Model.from_pretrained(encoder_dir, local_files_only=True).float()
    student = ef._student(encoder, 16, seed=0, device=torch.device("cpu"))
    hp = {"learning_rate": lr, "weight_decay": 0.05, "temperature": 0.2, "ema_momentum": momentum, "epochs": 1}
    return ef._make_trainer(student, loader, hp, torch.device("cpu"), ef._RunRecord({}))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# ------------------------------------------------------------------------------------------------ pieces


def test_ema_teacher_matches_formula(tiny_encoder, images, tmp_path):
    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[8.0, 2.0]]))
        student.bias.fill_(-3.0)
    ema = ef._ema_teacher(student, ema_momentum=0.75)
    teacher = ema.ema_model
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[4.0, -2.0]]))
        teacher.bias.fill_(1.0)
    engine = Engine(lambda engine, batch: None)
    ema.attach(engine)
    engine.run([0], max_epochs=1)  # one iteration: one EMA update
    # 0.75 * teacher + 0.25 * student (Ignite's EMAHandler momentum is the student's weight, 1 - 0.75)
    assert teacher.weight.tolist() == [[5.0, -1.0]]
    assert teacher.bias.tolist() == [0.0]
    assert student.weight.tolist() == [[8.0, 2.0]]  # the student is left alone
    # EMAHandler cannot freeze the teacher (1) or copy the student (0): refused up front, naming the option
    for momentum in (1.0, 0.0):
        with pytest.raises(ValueError, match=r"ema_momentum must be in \(0, 1\)"):
            ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "out"), ema_momentum=momentum, **SMALL)
    assert not (tmp_path / "out").exists()


def test_info_nce_hand_computation():
    query = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalised: (0.6, 0.8), (0, 1)
    key = torch.tensor([[2.0, 0.0], [0.0, -5.0]])  # normalised: (1, 0), (0, -1)
    t = 0.5
    # row 0: sims (0.6, -0.8), positive column 0; row 1: sims (0, -1), positive column 1
    loss0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(-0.8 / t)))
    loss1 = -math.log(math.exp(-1.0 / t) / (math.exp(0.0 / t) + math.exp(-1.0 / t)))
    got = ef.info_nce(query, key, temperature=t)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-6)


def test_moco_loss_pairs_views_with_the_other_global_view():
    g = torch.Generator().manual_seed(0)
    sg = [torch.randn(3, 4, generator=g) for _ in range(2)]
    tg = [torch.randn(3, 4, generator=g) for _ in range(2)]
    loc = [torch.randn(3, 4, generator=g)]
    nce = ef.info_nce
    expected_globals = (nce(sg[0], tg[1], 0.2) + nce(sg[1], tg[0], 0.2)) / 2
    assert ef.moco_loss(sg, [], tg, 0.2).item() == pytest.approx(expected_globals.item(), abs=1e-6)
    local_term = 0.5 * (nce(loc[0], tg[0], 0.2) + nce(loc[0], tg[1], 0.2))
    expected = (nce(sg[0], tg[1], 0.2) + nce(sg[1], tg[0], 0.2) + local_term) / 3
    assert ef.moco_loss(sg, loc, tg, 0.2).item() == pytest.approx(expected.item(), abs=1e-6)


def test_multicrop_shapes_range_and_determinism(images):
    augment = ef.multi_crop(56, 28, 3)
    glob, local = ef._split_views(_views(augment, images[:4], 5))
    assert [tuple(v.shape) for v in glob] == [(4, 3, 56, 56)] * 2
    assert [tuple(v.shape) for v in local] == [(4, 3, 28, 28)] * 3
    assert all(v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 for v in glob + local)
    again, _ = ef._split_views(_views(augment, images[:4], 5))
    assert torch.equal(glob[0], again[0])
    assert not torch.equal(glob[0], glob[1])


def test_multicrop_flips_left_right_never_up_down():
    # images are in MONAI spatial order (3, X, Y): the last axis runs from the top to the bottom of the image
    ramp = torch.linspace(20, 220, 56).round().to(torch.uint8)
    brighter_down = ramp.view(1, 1, 56).expand(4, 3, 56, 56)
    brighter_right = ramp.view(1, 56, 1).expand(4, 3, 56, 56)
    augment = ef.multi_crop(56, 28, 3)

    def increasing(views: dict, dim: int) -> list[bool]:  # per view and image: is the second half brighter?
        out = []
        for v in views.values():
            first, second = v.chunk(2, dim=dim)
            out += (first.mean(dim=(1, 2, 3)) < second.mean(dim=(1, 2, 3))).tolist()
        return out

    down = increasing(_views(augment, brighter_down, 3), dim=3)
    assert len(down) == 4 * 5 and all(down)  # never flipped up-down
    right = increasing(_views(augment, brighter_right, 3), dim=2)
    assert any(right) and not all(right)  # flipped left-right at random


# ------------------------------------------------------------------------------------------------ training step


def test_teacher_gets_no_gradient_and_moves_only_by_ema(tiny_encoder, images):
    batch = _views(ef.multi_crop(56, 28, 2), images[:4], 0)
    trainer, teacher = _trainer(tiny_encoder, [batch], momentum=0.9)  # one optimizer step
    teacher_before = _params(teacher)
    student_before = _params(trainer.network)
    assert all(torch.equal(teacher_before[k], student_before[k]) for k in student_before)  # same start
    trainer.run()
    student_after = _params(trainer.network)
    assert any(not torch.equal(student_after[k], student_before[k]) for k in student_after)
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        expected = 0.9 * teacher_before[name] + 0.1 * student_after[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    assert not teacher.training
    assert any(p.grad is not None for p in trainer.network.encoder.parameters())


def test_a_few_steps_lower_the_loss(tiny_encoder, images):
    batch = _views(ef.multi_crop(56, 28, 2), images[:4], 0)
    trainer, teacher = _trainer(tiny_encoder, [batch] * 8, lr=1e-3)  # 8 steps on the same views

    def loss() -> float:
        with torch.no_grad():
            return float(ef._views_loss(trainer.network, teacher, batch, trainer.loss_function))

    before = loss()
    trainer.run()
    after = loss()
    assert after < before - 0.05, (before, after)


def test_cosine_schedule_and_clipping_are_trainer_handlers(tiny_encoder, images, monkeypatch):
    monkeypatch.setattr(ef, "GRAD_CLIP_NORM", 1e-3)  # far below the natural gradient norm: every step is clipped
    batch = _views(ef.multi_crop(56, 28, 2), images[:4], 0)
    trainer, _ = _trainer(tiny_encoder, [batch] * 4, lr=1e-3)
    lrs, norms = [], []

    def grad_norm(engine) -> None:  # registered after the GradientClipHandler
        grads = [p.grad for p in engine.network.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: lrs.append([g["lr"] for g in e.optimizer.param_groups])
    )
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, grad_norm)
    trainer.run()
    # groups: encoder (no decay, decay), head (no decay, decay) at 10x; step k of 4: lr * (1 + cos(pi k / 4)) / 2
    for k, got in enumerate(lrs):
        factor = 0.5 * (1 + math.cos(math.pi * k / 4))
        assert got == pytest.approx([1e-3 * factor, 1e-3 * factor, 1e-2 * factor, 1e-2 * factor], rel=1e-9, abs=1e-15)
    assert len(lrs) == 4 and lrs[2][0] == pytest.approx(0.5e-3)
    assert norms == pytest.approx([1e-3] * 4, rel=1e-3)


def test_crop_sizes_must_be_multiples_of_the_patch(tiny_encoder, images, tmp_path):
    with pytest.raises(ValueError, match="local_crop_size"):
        ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "out"), **{**SMALL, "local_crop_size": 30})
    with pytest.raises(ValueError, match="at least 2 images"):
        ef.finetune_encoder(tiny_encoder, images[:1], str(tmp_path / "out"), **SMALL)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ finetune_encoder


def test_finetune_writes_a_loadable_folder_and_skips_when_done(tiny_encoder, images, tmp_path, monkeypatch):
    out, ckpt = tmp_path / "finetuned", tmp_path / "ckpt"
    result = ef.finetune_encoder(tiny_encoder, images, str(out), epochs=2, checkpoint_dir=str(ckpt), **SMALL)
    assert result == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "provenance.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folder left behind

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["kind"] == "moco-finetune"
    assert provenance["base"] == os.path.abspath(tiny_encoder)  # the tiny encoder has no provenance.json
    assert provenance["images"] == 6
    assert provenance["hyperparameters"]["epochs"] == 2
    assert provenance["hyperparameters"]["projection_dim"] == 16
    assert len(provenance["epoch_losses"]) == 2 and math.isfinite(provenance["final_loss"])
    assert provenance["wall_time_s"] > 0

    source = resolve_encoder(str(out))
    assert source.provenance["source_kind"] == "moco-finetune"
    tuned, start = load_dinov2(source), load_dinov2(tiny_encoder)
    tuned_sd, start_sd = tuned.state_dict(), start.state_dict()
    assert any(not torch.equal(tuned_sd[k], start_sd[k]) for k in start_sd)
    # the saved weights are the student's, as in the last epoch checkpoint
    last = torch.load(ckpt / "moco_checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    student = {k.removeprefix("encoder."): v for k, v in last["student"].items() if k.startswith("encoder.")}
    teacher = {k.removeprefix("encoder."): v for k, v in last["teacher"].items() if k.startswith("encoder.")}
    assert student.keys() == tuned_sd.keys()
    assert all(torch.equal(tuned_sd[k], student[k]) for k in tuned_sd)
    assert any(not torch.equal(teacher[k], student[k]) for k in student)

    def no_training(*args, **kwargs):
        raise AssertionError("finetune_encoder trained again")

    monkeypatch.setattr(ef, "_make_trainer", no_training)
    assert ef.finetune_encoder(tiny_encoder, images, str(out), epochs=2, **SMALL) == str(out)


def test_finetune_refuses_to_overwrite_a_foreign_folder(tiny_encoder, images):
    # the start encoder itself has no provenance; give a folder one of another kind
    foreign = os.path.join(os.path.dirname(tiny_encoder), "foreign")
    os.makedirs(foreign, exist_ok=True)
    with open(os.path.join(foreign, "provenance.json"), "w") as f:
        json.dump({"kind": "hub"}, f)
    with pytest.raises(ValueError, match="refusing"):
        ef.finetune_encoder(tiny_encoder, images, foreign, **SMALL)


def test_resume_continues_at_the_next_epoch(tiny_encoder, images, tmp_path):
    ckpt = tmp_path / "ckpt"
    ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "e1"), epochs=1, checkpoint_dir=str(ckpt), **SMALL)
    first = json.loads((tmp_path / "e1" / "provenance.json").read_text())
    ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "e2"), epochs=2, checkpoint_dir=str(ckpt), **SMALL)
    second = json.loads((tmp_path / "e2" / "provenance.json").read_text())
    assert first["resumed_from_epoch"] == 0 and first["epochs_trained_this_run"] == 1
    assert second["resumed_from_epoch"] == 1 and second["epochs_trained_this_run"] == 1
    assert second["epoch_losses"][0] == first["epoch_losses"][0] and len(second["epoch_losses"]) == 2
    assert sorted(os.listdir(ckpt)) == ["moco_checkpoint_epoch=1.pt", "moco_checkpoint_epoch=2.pt"]


def test_interrupted_run_resumes_to_the_same_weights(tiny_encoder, images, tmp_path, monkeypatch):
    full = ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "full"), epochs=2, **SMALL)

    ckpt = tmp_path / "ckpt"
    real_step = ef._moco_iteration
    calls = {"n": 0}

    def crash_in_epoch_2(engine, batch, teacher):
        calls["n"] += 1
        if calls["n"] > 2:  # 6 images, batch 4 -> 2 iterations per epoch
            raise KeyboardInterrupt("simulated interruption")
        return real_step(engine, batch, teacher)

    monkeypatch.setattr(ef, "_moco_iteration", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        ef.finetune_encoder(
            tiny_encoder, images, str(tmp_path / "resumed"), epochs=2, checkpoint_dir=str(ckpt), **SMALL
        )
    assert not (tmp_path / "resumed").exists()
    assert os.listdir(ckpt) == ["moco_checkpoint_epoch=1.pt"]
    monkeypatch.setattr(ef, "_moco_iteration", real_step)

    resumed = ef.finetune_encoder(
        tiny_encoder, images, str(tmp_path / "resumed"), epochs=2, checkpoint_dir=str(ckpt), **SMALL
    )
    provenance = json.loads((tmp_path / "resumed" / "provenance.json").read_text())
    assert provenance["resumed_from_epoch"] == 1 and provenance["epochs_trained_this_run"] == 1
    a, b = load_dinov2(full).state_dict(), load_dinov2(resumed).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_resume_refuses_a_checkpoint_of_other_images(tiny_encoder, images, tmp_path):
    ckpt = tmp_path / "ckpt"
    ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "a"), epochs=1, checkpoint_dir=str(ckpt), **SMALL)
    with pytest.raises(ValueError, match="different fine-tuning run"):
        ef.finetune_encoder(
            tiny_encoder, images.flip(-1), str(tmp_path / "b"), epochs=2, checkpoint_dir=str(ckpt), **SMALL
        )


def test_resume_refuses_a_checkpoint_of_the_old_recipe(tiny_encoder, images, tmp_path):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "a"), epochs=1, checkpoint_dir=str(ckpt), **SMALL)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    path = ckpt / "moco_checkpoint_epoch=1.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["lr_scheduler"]  # what the hand-written loop (recipe 1) saved: no scheduler, no recipe
    checkpoint["record"]["fingerprint"].pop("recipe")
    torch.save(checkpoint, path)
    with pytest.raises(
        ValueError, match=r"moco_checkpoint_epoch=1\.pt was written by a different fine-tuning run.*recipe"
    ):
        ef.finetune_encoder(tiny_encoder, images, str(tmp_path / "b"), epochs=2, checkpoint_dir=str(ckpt), **SMALL)
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ bundle config


def test_standalone_bundle_config(tiny_encoder, images, tmp_path):
    from monai.bundle import run

    data = tmp_path / "pngs"
    data.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(data / f"img{i}.png")
    bundle = os.path.join(os.path.dirname(__file__), os.pardir, "bundle")
    out = tmp_path / "out"
    run(
        run_id="run",
        config_file=os.path.join(bundle, "configs", "finetune_encoder.json"),
        bundle_root=bundle,
        dataset_dir=str(data),
        output_dir=str(out),
        encoder_weights=tiny_encoder,
        image_size=56,
        epochs=1,
        device="cpu",
        **SMALL,
    )
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["kind"] == "moco-finetune" and provenance["images"] == 6
    assert provenance["base"] == str(resolve_encoder(tiny_encoder).path)  # through scripts.encoder.resolve_encoder
    assert os.listdir(str(out) + "_checkpoints") == ["moco_checkpoint_epoch=1.pt"]
    load_dinov2(str(out))
