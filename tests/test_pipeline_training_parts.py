"""The round's parts as configuration (medsmile.json's network_def, optimizer, lr_scheduler, loss_function,
train_handlers): swapped in JSON they change what both round trainers build, they are recorded so that a swap is a
changed run, and runs recorded before they existed still resume with the defaults."""

from __future__ import annotations

import csv
import functools
import json
import os
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_OVERRIDES, chain
from ignite.engine import Events
from monai.bundle import ConfigParser, run
from monai.handlers import StatsHandler
from PIL import Image

import scripts.pipeline as pipeline_module
from scripts.losses import Mask2FormerSemanticLoss, SemanticDiceCELoss
from scripts.network import Mask2FormerDinov2, network_from_file
from scripts.training import call_with, train_round

CONFIG = os.path.join(BUNDLE_ROOT, "configs", "medsmile.json")
PARTS = ("network_def", "optimizer", "lr_scheduler", "loss_function", "train_handlers")


class SmallerHead(Mask2FormerDinov2):
    """A network_def target other than Mask2FormerDinov2 itself (network.json must name it)."""


def run_medsmile(tiny_encoder, data, out, **overrides):
    args = {
        "output_dir": str(out / "run"),
        "model_path": str(out / "models" / "model.pt"),
        "encoder_weights": tiny_encoder,
        "export_torchscript": False,
        **TINY_OVERRIDES,
        "num_rounds": 1,
        **{k: data[k] for k in ("dataset_dir", "reference_image", "reference_label")},
        **overrides,
    }
    run(config_file=CONFIG, bundle_root=BUNDLE_ROOT, **args)


def test_call_with_passes_only_the_runtime_values_the_part_takes_and_the_config_left_open():
    def part(a, b, c=0):
        return a, b, c

    assert call_with(functools.partial(part, c=5), 1, b=2, c=3, d=4) == (1, 2, 5)  # c bound by the config, no d
    assert call_with(part, 1, b=2, d=4) == (1, 2, 0)


def test_loss_option_selects_the_default_loss_class_and_an_unknown_one_is_refused_by_name():
    parser = ConfigParser()
    parser.read_config(CONFIG)
    default = parser.get_parsed_content("loss_function")
    assert default.func is Mask2FormerSemanticLoss and default.keywords == {"bootstrap": 0.0}
    parser.update({"loss": "dicece", "bootstrap_targets": 0.25})
    assert parser.get_parsed_content("loss_function", reset=True).func is SemanticDiceCELoss
    loss = call_with(parser.get_parsed_content("loss_function"), network=None, num_classes=3)
    assert loss.num_classes == 3 and loss.bootstrap == 0.25
    parser.update({"loss": "focal"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("loss_function", reset=True)
    assert "loss='focal' must be one of ('mask2former', 'dicece')" in chain(err.value)


def test_a_network_def_that_is_not_a_mask2former_dinov2_is_refused(tmp_path):
    pipeline = pipeline_module.MedSMILEPipeline(
        str(tmp_path), str(tmp_path / "m.pt"), network_def=functools.partial(torch.nn.Identity)
    )
    with pytest.raises(TypeError, match="network_def built a Identity: the rounds need a scripts.network"):
        pipeline._new_network(SimpleNamespace(path=str(tmp_path)))


def test_network_json_names_a_swapped_network_class_and_rebuilds_it(tiny_encoder, tmp_path):
    part = functools.partial(SmallerHead, num_classes=2, num_queries=3, hidden_dim=32, decoder_layers=1)
    pipeline = pipeline_module.MedSMILEPipeline(str(tmp_path), str(tmp_path / "m.pt"), network_def=part)
    spec = {"num_classes": 2, "encoder_config": tiny_encoder, **pipeline._decoder_kwargs()}
    assert spec["_target_"] == "test_pipeline_training_parts.SmallerHead"
    assert spec["feature_pyramid"] == "project_first"  # left at its default: written, not assumed by the reader
    (tmp_path / "network.json").write_text(json.dumps(spec))
    rebuilt = network_from_file(tmp_path / "network.json")
    assert type(rebuilt).__name__ == "SmallerHead" and rebuilt.mask2former.config.num_queries == 3
    # the default network_def writes network.json as before: no target, Mask2FormerDinov2's arguments
    default = pipeline_module.MedSMILEPipeline(str(tmp_path), str(tmp_path / "m.pt"), num_queries=5)
    assert default._decoder_kwargs() == {
        "num_queries": 5,
        "decoder_layers": 4,
        "hidden_dim": 128,
        "pixel_decoder_layers": 2,
        "num_heads": 4,  # Mask2FormerDinov2's default, written too
        "feature_pyramid": "project_first",
        "mask_loss_points": 4096,
    }


def test_train_round_builds_the_given_optimizer_and_schedule(tiny_encoder, tmp_path):
    torch.manual_seed(0)
    net = Mask2FormerDinov2(2, tiny_encoder, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1)
    images = (torch.rand(4, 3, 56, 56) * 255).to(torch.uint8)
    labels = torch.zeros(4, 1, 56, 56, dtype=torch.uint8)
    labels[:, :, 14:42, 14:42] = 1
    items = [{"image": images[i], "label": labels[i], "index": i} for i in range(4)]
    sgd = functools.partial(torch.optim.SGD, momentum=0.9)
    linear = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.5)
    info = train_round(
        net, items, 2, 2, 1e-3, 0.0, 1.0, torch.device("cpu"), str(tmp_path), freeze_backbone=True,
        optimizer=sgd, lr_scheduler=linear,
    )  # fmt: skip
    assert info["iterations"] == 4
    (checkpoint,) = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    state = torch.load(tmp_path / checkpoint, weights_only=True)
    (group,) = state["optimizer"]["param_groups"]  # the frozen backbone's group is left out
    assert group["momentum"] == 0.9 and "nesterov" in group  # torch.optim.SGD's settings, not AdamW's
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert state["lr"]["total_iters"] == 4 and state["lr"]["end_factor"] == 0.5  # the round's 4 iterations
    assert group["lr"] == pytest.approx(1e-3 * 0.5)  # the head learning rate (None: learning_rate), annealed


@pytest.mark.slow
@pytest.mark.parametrize("round_training", ["pseudo_labels", "consistency"])
def test_json_overrides_swap_the_optimizer_network_and_handlers(
    tiny_encoder, png_dataset, tmp_path, monkeypatch, round_training
):
    steps = {"SGD": 0, "AdamW": 0}
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        real = cls.step

        def counted(self, *args, _real=real, _name=cls.__name__, **kwargs):
            steps[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", counted)
    attached = []
    real_attach = StatsHandler.attach
    monkeypatch.setattr(
        StatsHandler, "attach", lambda self, engine: (attached.append(type(engine).__name__), real_attach(self, engine))
    )

    swapped = {"optimizer#_target_": "torch.optim.SGD", "optimizer#momentum": 0.9, "network_def#num_queries": 3}
    run_medsmile(tiny_encoder, png_dataset, tmp_path, round_training=round_training, **swapped)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    iterations = summary["rounds"][1]["training"]["iterations"]
    assert steps == {"SGD": iterations, "AdamW": 0}
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]
    assert recorded["optimizer"] == {"_target_": "torch.optim.sgd.SGD", "weight_decay": 0.01, "momentum": 0.9}
    assert recorded["network_def"]["num_queries"] == 3 and recorded["num_queries"] == TINY_OVERRIDES["num_queries"]
    if round_training == "consistency":  # the round's model is the teacher: an average of the SGD-trained students
        assert summary["rounds"][1]["training"]["consistency_epochs"]
    # the trained network has network_def's 3 queries, and inference.json rebuilds it from network.json
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["mask2former.model.transformer_module.queries_features.weight"].shape[0] == 3
    assert json.loads((tmp_path / "models" / "network.json").read_text())["num_queries"] == 3
    network_from_file(tmp_path / "models" / "network.json").load_state_dict(state)
    # the loss log (train_handlers#0) was attached to the round's trainer, the prediction log (val_handlers#0) to its
    # pool evaluator; the TensorBoard one is _disabled_
    assert sorted(attached) == ["SupervisedEvaluator", "SupervisedTrainer"] and recorded["train_handlers"] == [
        {"_target_": "monai.handlers.stats_handler.StatsHandler"}
    ]

    # a swapped optimizer is a changed run: the finished round is not reused with the default AdamW
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder, png_dataset, tmp_path, round_training=round_training, **{"network_def#num_queries": 3}
        )
    assert "different configuration (changed: ['optimizer'])" in chain(err.value)
    # switching a train handler off is not: the same run resumes, nothing retrained
    attached.clear()
    steps.update(SGD=0)
    run_medsmile(
        tiny_encoder,
        png_dataset,
        tmp_path,
        round_training=round_training,
        **swapped,
        **{"train_handlers#0#_disabled_": True},
    )
    assert steps["SGD"] == 0 and attached == []


@pytest.mark.slow
def test_run_recorded_before_the_parts_existed_resumes_with_the_defaults(tiny_encoder, png_dataset, tmp_path):
    run_medsmile(tiny_encoder, png_dataset, tmp_path)
    record_file = tmp_path / "run" / "run_config.json"
    record = json.loads(record_file.read_text())
    assert record["config"]["loss_function"] == {
        "_target_": "scripts.losses.Mask2FormerSemanticLoss",
        "bootstrap": 0.0,
    }
    label_file = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    old = {k: v for k, v in record["config"].items() if k not in PARTS}  # as written before this change
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    run_medsmile(tiny_encoder, png_dataset, tmp_path)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    # such a run trained with AdamW: another optimizer (or weight decay inside it) is a change and is refused
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, png_dataset, tmp_path, **{"optimizer#_target_": "torch.optim.SGD"})
    assert "different configuration (changed: ['optimizer'])" in chain(err.value)
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, png_dataset, tmp_path, **{"optimizer#weight_decay": 0.1})
    assert "different configuration (changed: ['optimizer'])" in chain(err.value)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before


def test_every_option_is_written_once_in_medsmile_json_with_its_note(tmp_path):
    """The pipeline's options are the arguments of medsmile.json's pipeline item, each with a note; their defaults
    are its values (bundle_options); a misspelt option is refused by name instead of silently ignored."""
    with open(CONFIG) as f:
        config = json.load(f)
    names = [k for k in config["pipeline"] if k != "_target_"]
    assert [k for k in names if k not in config["hyperparameter_notes"]] == []
    assert set(pipeline_module.OPTION_RULES) <= set(names) and set(pipeline_module.ADDED_OPTIONS) <= set(names)
    defaults = pipeline_module.bundle_options()
    assert {k: defaults[k] for k in ("num_queries", "head_learning_rate", "refine", "feature_layers")} == {
        k: config[k] for k in ("num_queries", "head_learning_rate", "refine", "feature_layers")
    }
    assert defaults["inference_config"] == os.path.join(BUNDLE_ROOT, "configs", "inference.json")
    pipeline = pipeline_module.MedSMILEPipeline(str(tmp_path), str(tmp_path / "m.pt"), num_queries=5)
    assert pipeline.num_queries == 5 and pipeline.epochs == config["epochs"]
    assert pipeline.cfg["network_def"]["num_queries"] == 5  # the training parts see the given options
    with pytest.raises(ValueError, match=r"unknown pipeline option\(s\) \['num_querys'\]: the options are"):
        pipeline_module.MedSMILEPipeline(str(tmp_path), str(tmp_path / "m.pt"), num_querys=5)


class CountingHandler:
    """A val_handlers entry: counts the pool evaluator's iterations and keeps its metrics at the end."""

    made: ClassVar[list[CountingHandler]] = []

    def __init__(self):
        self.engines, self.iterations, self.metrics = [], 0, None
        CountingHandler.made.append(self)

    def attach(self, engine) -> None:
        self.engines.append(type(engine).__name__)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.end)

    def count(self, engine) -> None:
        self.iterations += 1

    def end(self, engine) -> None:
        self.metrics = dict(engine.state.metrics)


@pytest.mark.slow
def test_val_handlers_from_json_run_on_each_round_pool_evaluator_after_its_own(tiny_encoder, png_dataset, tmp_path):
    CountingHandler.made.clear()
    handlers = [
        {"_target_": "test_pipeline_training_parts.CountingHandler"},
        {"_target_": "test_pipeline_training_parts.CountingHandler", "_disabled_": True},
    ]
    run_medsmile(tiny_encoder, png_dataset, tmp_path, num_rounds=2, round_training="pseudo_labels", refine=True,
                 val_handlers=handlers)  # fmt: skip
    (counter,) = CountingHandler.made  # the _disabled_ one was never built
    # one pool evaluator per round, 6 pool images in batches of 4: 2 iterations each
    assert counter.engines == ["SupervisedEvaluator"] * 2 and counter.iterations == 4
    # attached after the round's own handlers: their metrics of the last round are there at its end
    with open(tmp_path / "run" / "round_2" / "uncertainty.csv") as f:
        rows = list(csv.DictReader(f))
    assert counter.metrics["mean_pixel_entropy"] == pytest.approx(
        np.mean([float(r["mean_pixel_entropy"]) for r in rows])
    )
    assert counter.metrics["refined_images"] == sum(int(r["refined"]) for r in rows)


@pytest.mark.slow
def test_pool_transforms_are_recorded_and_a_run_recorded_before_them_resumes(
    tiny_encoder, png_dataset, tmp_path, monkeypatch, caplog
):
    # the default MetricsSaver switched on: the last round's prediction metrics in output_dir
    run_medsmile(tiny_encoder, png_dataset, tmp_path, **{"val_handlers#1#_disabled_": False})
    saved = dict(
        line.split(",") for line in (tmp_path / "run" / "prediction_metrics" / "metrics.csv").read_text().splitlines()
    )
    with open(tmp_path / "run" / "round_1" / "uncertainty.csv") as f:
        entropies = [float(r["mean_pixel_entropy"]) for r in csv.DictReader(f)]
    assert float(saved["mean_pixel_entropy"]) == pytest.approx(np.mean(entropies), rel=1e-5)
    record_file = tmp_path / "run" / "run_config.json"
    record = json.loads(record_file.read_text())
    assert record["config"]["pool_transforms"] == [
        {"_target_": "scripts.transforms.IntensityToRGBd", "keys": "image"},
        {"_target_": "scripts.transforms.ResizePlanesd", "keys": "image", "mode": "bilinear", "anti_aliasing": True},
    ]
    label_file = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    # as 0.5.0 wrote it: no pool_transforms, no val_handlers; it resumes with the default steps, nothing recomputed
    old = {k: v for k, v in record["config"].items() if k not in ("pool_transforms", "val_handlers")}
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    run_medsmile(tiny_encoder, png_dataset, tmp_path)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    # other steps are a changed run
    nearest = {"pool_transforms#1#mode": "nearest", "pool_transforms#1#anti_aliasing": False}
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, png_dataset, tmp_path, **nearest)
    assert "different configuration (changed: ['pool_transforms'])" in chain(err.value)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before

    # in a new run they make the pool's images: nearest sampling of the PNG, pixel i of 56 from floor(i * 50 / 56)
    pools = []
    real_load = pipeline_module.ImagePool.load
    monkeypatch.setattr(
        pipeline_module.ImagePool, "load", lambda *a, **k: pools.append(real_load(*a, **k)) or pools[-1]
    )
    run_medsmile(tiny_encoder, png_dataset, tmp_path / "nearest", pool_store="memory", **nearest)
    (pool,) = pools
    index = [case.name for case in pool.cases].index("img_1")  # 50 x 50
    image = np.asarray(Image.open(png_dataset["dataset_dir"] + "/img_1.png")).transpose(2, 1, 0)  # MONAI (C, X, Y)
    rows = np.floor(np.arange(56) * 50 / 56).astype(int)
    assert np.array_equal(pool.train_images[index].numpy(), image[:, rows][:, :, rows])
    # the model says where it is loaded that the configs' preprocessing is not the one it was trained with
    assert "pool_transforms" not in json.loads((tmp_path / "run" / "model" / "network.json").read_text())
    swapped = tmp_path / "nearest" / "run" / "model" / "network.json"
    assert json.loads(swapped.read_text())["pool_transforms"][1] == {
        "_target_": "scripts.transforms.ResizePlanesd",
        "keys": "image",
        "mode": "nearest",
        "anti_aliasing": False,
    }
    caplog.clear()
    network_from_file(swapped)
    assert f"{swapped}: this model was trained with its own pool_transforms (IntensityToRGBd, ResizePlanesd)" in (
        caplog.text
    )
