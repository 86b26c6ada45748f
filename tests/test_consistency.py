"""Consistency-regularised round training (scripts/consistency.py, issue 33), checked by hand on tiny inputs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, run_medsmile
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.engines.utils import IterationEvents
from monai.utils import set_determinism

from scripts import consistency as cons
from scripts import training
from scripts.consistency import (
    ConsistencyStep,
    confidence_mask,
    confident_cross_entropy,
    confident_round_loss,
    confident_targets,
    cutmix,
    cutmix_boxes,
    teacher_momentum,
)
from scripts.losses import IGNORE_LABEL, Mask2FormerSemanticLoss, SemanticDiceCELoss, semantic_to_instances
from scripts.network import Mask2FormerDinov2, WithQueryOutputs
from scripts.pipeline import MedSMILEPipeline
from scripts.token_cache import TOKEN_VIEWS, fill_token_views, token_training_transform
from scripts.training import train_round, training_items

SIZE = 56


def tiny_network(encoder: str, seed: int = 0) -> Mask2FormerDinov2:
    torch.manual_seed(seed)
    return Mask2FormerDinov2(
        2, encoder, encoder, num_queries=4, decoder_layers=2, hidden_dim=32, pixel_decoder_layers=1
    ).requires_grad_(True)


def tiny_pool(network, n: int = 6):
    """n uint8 images (a dark square on a bright background), their labels and their cached token views."""
    g = torch.Generator().manual_seed(1)
    images = (180 + 40 * torch.rand((n, 3, SIZE, SIZE), generator=g)).to(torch.uint8)
    labels = torch.zeros((n, SIZE, SIZE), dtype=torch.uint8)
    for i in range(n):
        y, x = 8 + 3 * i, 20 - 2 * i
        images[i, :, y : y + 20, x : x + 20] = 40
        labels[i, y : y + 20, x : x + 20] = 1
    tokens = torch.zeros(
        (n, len(TOKEN_VIEWS), network.pyramid.hidden_size, SIZE // 14, SIZE // 14), dtype=torch.float16
    )
    fill_token_views(network, images, tokens)
    return images, labels, tokens


def make_step(network, images, labels, tokens, **kwargs) -> ConsistencyStep:
    references = (tokens[:1], labels[:1])  # image 0 plays the reference
    return ConsistencyStep(network, references, tokens[1:], images[1:], bf16=False, **kwargs)


# ---------------------------------------------------------------- confidence mask
def test_confidence_mask_keeps_pixels_at_or_above_the_threshold():
    # 3 pixels, 2 classes: max probabilities 0.96 (class 0), 0.6 (class 0), 0.95 (class 1, exactly the threshold)
    probs = torch.tensor([[0.96, 0.6, 0.05], [0.04, 0.4, 0.95]]).view(1, 2, 1, 3)
    target, confident = confidence_mask(probs, 0.95)
    assert target.tolist() == [[[0, 0, 1]]]
    assert confident.tolist() == [[[True, False, True]]]
    assert confidence_mask(probs, 0.5)[1].all()


# ---------------------------------------------------------------- CutMix
def test_cutmix_pastes_the_previous_image_and_its_target_inside_the_box():
    images = torch.stack([torch.full((3, 4, 4), float(v)) for v in (10, 20, 30)])
    targets = torch.stack([torch.full((4, 4), v) for v in (0, 1, 2)])
    confident = torch.stack([torch.full((4, 4), v) for v in (True, False, True)])
    boxes = torch.zeros((3, 4, 4), dtype=torch.bool)
    boxes[0, 1:3, 0:2] = True  # image 0 takes image 2's pixels (the batch rolled by one) in rows 1-2, cols 0-1
    boxes[2, 0, 3] = True  # image 2 takes image 1's pixel (0, 3)
    mixed, mixed_target, mixed_confident = cutmix(images, targets, confident, boxes)

    expected0 = torch.full((4, 4), 10.0)
    expected0[1:3, 0:2] = 30.0
    for c in range(3):
        assert torch.equal(mixed[0, c], expected0)
    assert torch.equal(mixed[1], images[1])  # no box: unchanged
    expected2 = torch.full((4, 4), 30.0)
    expected2[0, 3] = 20.0
    for c in range(3):
        assert torch.equal(mixed[2, c], expected2)
    expected_t0 = torch.zeros((4, 4), dtype=torch.long)
    expected_t0[1:3, 0:2] = 2
    assert torch.equal(mixed_target[0], expected_t0)
    expected_t2 = torch.full((4, 4), 2)
    expected_t2[0, 3] = 1
    assert torch.equal(mixed_target[2], expected_t2)
    assert torch.equal(mixed_confident[0], torch.ones((4, 4), dtype=torch.bool))  # True from both images
    expected_c2 = torch.ones((4, 4), dtype=torch.bool)
    expected_c2[0, 3] = False  # image 1's pixels are not confident
    assert torch.equal(mixed_confident[2], expected_c2)


def test_cutmix_boxes_are_rectangles_of_the_drawn_size_inside_the_image():
    torch.manual_seed(0)
    boxes = cutmix_boxes(400, 40, prob=0.5, area=(0.02, 0.4), ratio=0.3)
    empty = 0
    for box in boxes:
        if not box.any():
            empty += 1
            continue
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert box.sum() == h * w, "a box is a filled rectangle"
        assert 0.3 * 0.7 <= h / w <= 1 / 0.3 / 0.7  # aspect ratio, up to the rounding of h and w to pixels
        assert 0.02 * 1600 * 0.6 <= h * w <= 0.4 * 1600 * 1.25
    assert 160 <= empty <= 240  # probability 0.5 of a box


# ---------------------------------------------------------------- EMA teacher
def test_teacher_is_the_mean_then_the_moving_average_of_the_student(tiny_encoder):
    network = tiny_network(tiny_encoder)
    images, labels, tokens = tiny_pool(network)
    step = make_step(network, images, labels, tokens, ema_momentum=0.6)
    param = network.mask2former.model.transformer_module.queries_embedder.weight
    teacher_param = step.teacher.mask2former.model.transformer_module.queries_embedder.weight
    start = param.detach().clone()

    def move_student(engine, batch):
        with torch.no_grad():
            param.copy_(start + engine.state.iteration)  # student after step t: start + t

    engine = Engine(move_student)
    step.attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(teacher_param.detach().clone()))
    engine.run([0, 0, 0], max_epochs=1)
    # Ignite's momentum is the student's share: max(1 - 0.6, 1 / t) -> 1, 1/2, 0.4
    assert [teacher_momentum(t, 0.6) for t in (1, 2, 3)] == [1.0, 0.5, pytest.approx(0.4)]
    torch.testing.assert_close(seen[0], start + 1)  # t=1: the student itself
    torch.testing.assert_close(seen[1], 0.5 * (start + 1) + 0.5 * (start + 2))  # = start + 1.5
    torch.testing.assert_close(seen[2], 0.6 * (start + 1.5) + 0.4 * (start + 3))  # = start + 2.1
    torch.testing.assert_close(seen[2], start + 2.1)


# ---------------------------------------------------------------- losses
def test_confident_cross_entropy_by_hand():
    probs = torch.tensor([[0.8, 0.3], [0.2, 0.7]]).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    confident = torch.tensor([[[True, False]]])
    # only pixel 0 counts, divided by both pixels: -log(0.8) / 2
    assert confident_cross_entropy(probs.log(), target, confident).item() == pytest.approx(-math.log(0.8) / 2)
    assert confident_cross_entropy(probs.log(), target, ~confident).item() == pytest.approx(-math.log(0.7) / 2)


def test_confident_targets_ignore_unsure_pixels_but_keep_the_classes_the_teacher_sees():
    target = torch.tensor([[[0, 1], [1, 0]], [[0, 0], [0, 0]]])
    confident = torch.tensor([[[True, False], [False, True]], [[True, True], [False, True]]])
    label, classes = confident_targets(target, confident)
    assert label.shape == (2, 1, 2, 2)
    assert label[0, 0].tolist() == [[0, IGNORE_LABEL], [IGNORE_LABEL, 0]]
    assert label[1, 0].tolist() == [[0, 0], [IGNORE_LABEL, 0]]
    assert classes == [[0, 1], [0]]  # image 0: class 1 has no confident pixel and is still an object
    # the set loss's object masks: class 1 of image 0 is the network's own probability where unsure, 0 elsewhere
    fill = torch.full((2, 2, 2, 2), 0.25)
    masks, ids = semantic_to_instances(label, 2, fill, present=classes)
    assert ids[0].tolist() == [0, 1] and ids[1].tolist() == [0]
    assert masks[0][1].tolist() == [[0.0, 0.25], [0.25, 0.0]]
    assert masks[0][0].tolist() == [[1.0, 0.25], [0.25, 1.0]]


def test_confident_round_loss_is_the_round_loss_on_confident_pixels_times_their_fraction():
    """With the pixel loss (CE + Dice): rows 1..2 of a forward of 3, image 2 has no confident pixel and is left out,
    image 1's unsure pixel is ignored; the result is scaled by 3 confident pixels of 8."""
    torch.manual_seed(0)
    log_probs = torch.randn(3, 2, 2, 2).log_softmax(1)
    target = torch.tensor([[[0, 1], [1, 1]], [[0, 1], [0, 1]]])
    confident = torch.tensor([[[True, True], [False, True]], [[False, False], [False, False]]])
    loss_function = SemanticDiceCELoss(2)
    got = confident_round_loss(loss_function, (log_probs, None), target, confident, slice(1, 3))
    label = torch.tensor([[[[0, 1], [IGNORE_LABEL, 1]]]])
    expected = loss_function(log_probs[1:2], label) * 3 / 8
    torch.testing.assert_close(got, expected)
    nothing = confident_round_loss(loss_function, (log_probs, None), target, confident & False, slice(1, 3))
    assert nothing.item() == 0.0


def test_set_loss_of_rows_of_a_shared_forward_is_the_loss_of_those_images_alone(tiny_encoder):
    network = tiny_network(tiny_encoder).train()
    _, labels, tokens = tiny_pool(network)
    grids, y = tokens[:4, 0].float(), labels[:4, None].long()
    loss = Mask2FormerSemanticLoss(network)
    pred, queries = network.forward_tokens(grids, with_queries=True)
    torch.manual_seed(0)  # the set loss samples random mask points: the same ones in both
    shared = loss((pred[1:3], queries), y[1:3], rows=slice(1, 3))
    alone = network.forward_tokens(grids[1:3], with_queries=True)
    torch.manual_seed(0)
    alone = loss(alone, y[1:3])
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)


def test_step_sums_the_streams_with_their_weights_and_puts_the_reference_in_every_batch(tiny_encoder):
    network = tiny_network(tiny_encoder)
    images, labels, tokens = tiny_pool(network)
    step = make_step(network, images, labels, tokens, pseudo_weight=0.3, consistency_weight=2.0, threshold=0.0)
    items = training_items(tokens, labels, [1, 2, 3, 4])
    loader = torch.utils.data.DataLoader(Dataset(items, transform=token_training_transform()), batch_size=2)
    engine = Engine(step)
    engine.register_events(*IterationEvents)  # what a SupervisedTrainer has
    engine.state.device = torch.device("cpu")
    engine.network = WithQueryOutputs(network, tokens=True)
    engine.optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    engine.optim_set_to_none = True
    engine.loss_function = Mask2FormerSemanticLoss(network)
    set_determinism(seed=0)
    step._epoch_started(engine)
    out = step(engine, next(iter(loader)))
    parts = {k: out[k].item() for k in ("loss_labelled", "loss_pseudo", "loss_strong", "loss_perturbed")}
    expected = (
        parts["loss_labelled"] + 0.3 * parts["loss_pseudo"] + 2.0 * (parts["loss_strong"] + parts["loss_perturbed"]) / 2
    )
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert all(v > 0 for v in parts.values())  # threshold 0: every pool pixel is a target
    assert out["confident_fraction"].item() == 1.0
    # rows: 1 reference, 2 pseudo-labelled, 2 strong, 2 perturbed; row 0 is one of the reference's mirrored views
    assert len(out["image"]) == 7
    assert any(torch.equal(out["image"][0], tokens[0, v].float()) for v in range(len(TOKEN_VIEWS)))


# ---------------------------------------------------------------- resume
class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_mid_round_restores_the_teacher(tiny_encoder, tmp_path, monkeypatch):
    def round_(ckpt_dir):
        network = tiny_network(tiny_encoder)
        images, labels, tokens = tiny_pool(network)
        step = make_step(network, images, labels, tokens)
        items = training_items(tokens[1:], labels[1:])
        args = (network, items, 3, 2, 1e-4, 0.01, 1.0, torch.device("cpu"), str(ckpt_dir))
        info = train_round(*args, freeze_backbone=True, head_learning_rate=1e-3, token_views=True, consistency=step)
        return info, step

    info, straight = round_(tmp_path / "straight")
    assert info["iterations"] == 3 * 2
    teacher = {k: v.clone() for k, v in straight.teacher.state_dict().items()}
    assert not all(torch.equal(v, straight.network.state_dict()[k]) for k, v in teacher.items())

    saved = {}

    class KillAfterEpoch2(training.CheckpointSaver):
        def interval_completed(self, engine):
            super().interval_completed(engine)
            if engine.state.epoch == 2:
                saved["teacher"] = {k: v.clone() for k, v in self.save_dict["teacher"].state_dict().items()}
                raise _Killed

    monkeypatch.setattr(training, "CheckpointSaver", KillAfterEpoch2)
    with pytest.raises(_Killed):
        round_(tmp_path / "killed")
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "killed").glob("*.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["trainer"]["iteration"] == 2 * 2  # 2 epochs of 2 steps
    for k, v in saved["teacher"].items():
        assert torch.equal(state["teacher"][k], v), k

    _, resumed = round_(tmp_path / "killed")
    for k, v in resumed.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), f"teacher {k} differs after resume"
    for k, v in resumed.network.state_dict().items():
        assert torch.equal(v, straight.network.state_dict()[k]), f"student {k} differs after resume"


# ---------------------------------------------------------------- pipeline
def test_unknown_round_training_is_refused_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match=r"round_training='offline' must be one of \('pseudo_labels', 'consistency'\)"):
        MedSMILEPipeline(output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "m.pt"), round_training="offline")
    with pytest.raises(ValueError, match="needs freeze_backbone=true, cache_backbone_tokens=true"):
        MedSMILEPipeline(
            output_dir=str(tmp_path / "run"), model_path="m.pt", round_training="consistency", freeze_backbone=False
        )
    with pytest.raises(ValueError, match=r"consistency_ema_momentum=0 must be a number in \(0, 1\)"):
        MedSMILEPipeline(output_dir=str(tmp_path / "run"), model_path="m.pt", consistency_ema_momentum=0)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tiny_pipeline_in_consistency_mode_keeps_the_teachers(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    teachers, students = [], []
    finished = ConsistencyStep.finished_teacher

    def spy(self):
        teacher = finished(self)
        teachers.append({k: v.clone() for k, v in teacher.state_dict().items()})
        students.append({k: v.clone() for k, v in self.network.state_dict().items()})
        return teacher

    monkeypatch.setattr(cons.ConsistencyStep, "finished_teacher", spy)
    run_medsmile(
        tiny_encoder,
        tmp_path,
        round_training="consistency",
        epochs=3,
        export_torchscript=False,
        **png_dataset["inputs"],
    )
    run = tmp_path / "run"
    assert len(teachers) == TINY_OVERRIDES["num_rounds"] == 2
    for r, (teacher, student) in enumerate(zip(teachers, students, strict=True), start=1):
        saved = torch.load(run / f"round_{r}" / "model.pt", weights_only=True)
        assert all(torch.equal(saved[k], v) for k, v in teacher.items()), f"round {r}: model.pt is not the teacher"
        assert not all(torch.equal(saved[k], v) for k, v in student.items())
        assert len(list((run / f"round_{r}" / "labels").iterdir())) == 6
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in teachers[-1].items())
    assert not (run / ".checkpoints").exists()
    summary = json.loads((run / "summary.json").read_text())
    logged = summary["rounds"][1]["training"]["consistency_epochs"]
    assert [e["epoch"] for e in logged] == [1, 2, 3]
    assert all(0 <= e["confident_fraction"] <= 1 and e["loss_labelled"] > 0 for e in logged)


@pytest.mark.slow
def test_two_processes_train_a_consistency_round_like_one(tiny_encoder, png_dataset, tmp_path):
    """torchrun, 2 CPU processes: each rank keeps the teacher of the DDP student (the same on both ranks, since DDP
    keeps the students equal); the run ends with the single-process run's files, iteration counts and, within the
    bound test_distributed.py measures for today's rounds, its labels."""
    from PIL import Image
    from test_distributed import medsmile_args, torchrun

    common = {
        **png_dataset["inputs"],
        "export_torchscript": False,
        "round_training": "consistency",
        "consistency_pool_images": 4,  # 2 per rank, so CutMix pairs two images on each
    }
    one = tmp_path / "one"
    run_medsmile(tiny_encoder, one, **common)
    two = tmp_path / "two"
    proc = torchrun(medsmile_args(tiny_encoder, two, common), 2, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (proc.stdout + proc.stderr).count("MedSMILE finished") == 1
    summaries = [json.loads((d / "run" / "summary.json").read_text()) for d in (one, two)]
    assert [s["processes"] for s in summaries] == [1, 2]
    assert [r.get("training", {}).get("iterations") for r in summaries[1]["rounds"]] == [
        r.get("training", {}).get("iterations") for r in summaries[0]["rounds"]
    ]
    for r in (1, 2):
        assert (two / "run" / f"round_{r}" / "model.pt").is_file()
        for path in sorted((one / "run" / f"round_{r}" / "labels").iterdir()):
            a = np.asarray(Image.open(path))
            b = np.asarray(Image.open(two / "run" / f"round_{r}" / "labels" / path.name))
            assert (a == b).mean() >= 0.9, f"round {r} {path.name}: pixel agreement {(a == b).mean():.3f}"
