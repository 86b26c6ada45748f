"""Ignite handlers of a MedSMILE round, each with ``attach(engine)`` like MONAI's own.

- GradientClipHandler: grad-norm clipping between backward and optimizer step of a SupervisedTrainer.
- PixelEntropyHandler: per-image mean pixel entropy of the evaluator's predictions (docs/METHOD.md, "Rounds" step 3).
- KNNRefinementHandler: once the pool is predicted, replaces the most uncertain labels by a KNN vote (step 4).

In a torchrun job each rank predicts its share of the pool: PixelEntropyHandler all-gathers every batch, so each
rank knows every uncertainty and rank 0 stores every probability map; KNNRefinementHandler runs on rank 0 alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from .losses import IGNORE_LABEL
from .refinement import (
    RefinementPlan,
    mark_uncertain_pixels,
    mean_pixel_entropy,
    plan_refinement,
    refine_soft_label,
)

logger = logging.getLogger(__name__)


class GradientClipHandler:
    """Clip the global gradient norm after ``loss.backward()`` and before ``optimizer.step()``."""

    def __init__(self, max_norm: float = 1.0):
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


@dataclass
class RoundPredictions:
    """What one round predicts for the pool: class probabilities at the training size, uncertainty, refinement.

    A refined image keeps the recipe of its KNN vote (neighbours and weights), not the voted map: the map is
    recomputed from the neighbours' raw labels when needed, so memory does not grow with the number refined.
    """

    probs: torch.Tensor  # (N, C, S, S) float16, or a pool_store.DiskArray of that shape
    uncertainty: np.ndarray  # (N,) mean pixel entropy, NaN until predicted
    refined: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # index -> (neighbours, weights)
    plan: RefinementPlan | None = None

    @classmethod
    def empty(cls, n: int, num_classes: int, size: int, probs=None) -> RoundPredictions:
        """``probs``: where to store the probability maps (default: a tensor in RAM)."""
        if probs is None:
            probs = torch.zeros((n, num_classes, size, size), dtype=torch.float16)
        return cls(probs, np.full(n, np.nan))

    def soft_label(self, i: int) -> torch.Tensor:
        """The round's label of image i as class probabilities: refined if it was refined, else the raw prediction."""
        if i in self.refined:
            neighbours, weights = self.refined[i]
            raw = self.probs[neighbours].argmax(1)
            return refine_soft_label(raw, torch.as_tensor(weights), self.probs.shape[1])
        return self.probs[i].float()

    def hard_labels(self, out=None, batch_size: int = 64, ignore_fraction: float = 0.0):
        """(N, S, S) uint8 labels for the next round, written into ``out`` (default: a new tensor) in batches; the
        ``ignore_fraction`` least certain pixels of each class in each image are set to ``IGNORE_LABEL``
        (mark_uncertain_pixels)."""
        n, _, height, width = self.probs.shape
        if out is None:
            out = torch.zeros((n, height, width), dtype=torch.uint8)
        for start in range(0, n, batch_size):
            probs = torch.as_tensor(self.probs[start : start + batch_size])
            out[start : start + batch_size] = mark_uncertain_pixels(
                probs.argmax(1).to(torch.uint8), probs, ignore_fraction, IGNORE_LABEL
            )
        for i in self.refined:
            soft = self.soft_label(i)[None]
            out[i] = mark_uncertain_pixels(soft.argmax(1).to(torch.uint8), soft, ignore_fraction, IGNORE_LABEL)[0]
        return out


class PixelEntropyHandler:
    """Stores each predicted image's class probabilities and its mean pixel entropy; at the end, the pool's mean in
    ``engine.state.metrics["mean_pixel_entropy"]`` (what medsmile.json's ``val_handlers`` log).

    Reads ``engine.state.output[PRED]`` (log-probabilities or logits, softmaxed here) and the batch's ``index`` key.
    """

    def __init__(self, predictions: RoundPredictions):
        self.predictions = predictions

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.publish)

    def publish(self, engine: Engine) -> None:
        engine.state.metrics["mean_pixel_entropy"] = float(np.nanmean(self.predictions.uncertainty))

    def __call__(self, engine: Engine) -> None:
        probs = engine.state.output[CommonKeys.PRED].detach().float().softmax(dim=1)
        index = torch.as_tensor(engine.state.batch["index"]).long().to(probs.device)
        if idist.get_world_size() > 1:
            probs, index = idist.all_gather(probs), idist.all_gather(index)
        probs, index = probs.cpu(), index.cpu()
        if idist.get_rank() == 0:
            self.predictions.probs[index] = probs.to(torch.float16)
        self.predictions.uncertainty[index.numpy()] = mean_pixel_entropy(probs).double().numpy()


class KNNRefinementHandler:
    """At the end of the prediction pass, refines the uncertain images from their certain neighbours.

    Images with U >= quantile(U, q) take the weighted vote of their K most similar certain images' raw labels
    (weights max(0, cos) on the global DINOv2 features); certain images keep their raw labels.
    """

    def __init__(
        self,
        predictions: RoundPredictions,
        global_features: np.ndarray,
        quantile: float = 0.9,
        k: int = 5,
        exact_limit: int = 50_000,
    ):
        self.predictions = predictions
        self.exact_limit = exact_limit
        self.global_features = global_features
        self.quantile = quantile
        self.k = k

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if idist.get_rank() != 0:  # rank 0 holds the gathered predictions and writes the round
            return
        preds = self.predictions
        if np.isnan(preds.uncertainty).any():
            raise RuntimeError("refinement needs every pool image predicted; some have no uncertainty")
        plan = plan_refinement(preds.uncertainty, self.global_features, self.quantile, self.k, self.exact_limit)
        for row, i in enumerate(plan.uncertain):
            valid = plan.neighbours[row] >= 0
            weights = plan.weights[row][valid]
            if float(torch.as_tensor(weights).sum()) > 0:  # else refine_soft_label gives None: the raw label stays
                preds.refined[int(i)] = (plan.neighbours[row][valid], weights)
        preds.plan = plan
        if engine is not None:
            engine.state.metrics["refined_images"] = len(preds.refined)
        logger.info(
            "refinement: %d of %d images uncertain (U >= %.4f), %d refined",
            len(plan.uncertain),
            len(preds.uncertainty),
            plan.threshold,
            len(preds.refined),
        )
