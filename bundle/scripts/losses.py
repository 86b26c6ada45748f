"""Training losses for the Mask2Former network: its own set loss on semantic label maps, plus CE + Dice.

Supervising only the class-normalised semantic map (CE + Dice on ``network(x)``) lets a freshly initialised
Mask2Former sit for many iterations at a constant prediction (every pixel background): the gradient that reaches
each query's mask through the normalisation is weak. Mask2Former's own loss (Hungarian matching of queries to the
classes present, class CE, per-query mask BCE and Dice on sampled points, on every decoder layer) supervises the
query masks directly and escapes that plateau within a few dozen iterations; measured in benchmarks/README.md.

Pixels labelled ``IGNORE_LABEL`` (the least certain pixels of a pseudo-label, ``ignore_uncertain_pixels``) give no
CE / Dice term, and in the set loss their mask target is the network's own detached class probability.

``bootstrap`` b (soft bootstrapping, Reed et al., ICLR 2015 workshop): every target becomes (1 - b) x the one-hot
pseudo-label + b x the network's own detached class probability, so a pseudo-label the network consistently
disagrees with pulls less; b = 0 is the plain loss.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn

IGNORE_LABEL = 255  # pseudo-label value of a pixel left out of the loss


def check_bootstrap(bootstrap: float) -> float:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, float)) or not 0 <= bootstrap < 1:
        raise ValueError(f"bootstrap_targets={bootstrap!r} must be a number in [0, 1)")
    return float(bootstrap)


class SemanticDiceCELoss(nn.Module):
    """CE + soft Dice on (B, C, H, W) logits against (B, 1, H, W) labels, skipping ``IGNORE_LABEL`` pixels; with no
    ignored pixel and ``bootstrap`` 0 it equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``."""

    def __init__(self, num_classes: int, bootstrap: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.bootstrap = check_bootstrap(bootstrap)
        self.dice = MaskedDiceLoss(softmax=True)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, (tuple, list)):  # (log_probs, query outputs) of network.WithQueryOutputs
            pred = pred[0]
        label = label[:, 0].long()
        valid = label != IGNORE_LABEL
        if not valid.any():
            return pred.sum() * 0.0  # nothing to learn from this batch; keeps the graph
        target = F.one_hot(label.where(valid, 0), self.num_classes).permute(0, 3, 1, 2).float()
        if self.bootstrap:
            target = (1 - self.bootstrap) * target + self.bootstrap * pred.detach().softmax(dim=1)
        ce = F.cross_entropy(pred, target, reduction="none")[valid].mean()  # probability targets: no ignore_index
        return ce + self.dice(pred, target, mask=valid[:, None].float())


def semantic_to_instances(
    label: torch.Tensor,
    num_classes: int,
    fill: torch.Tensor | None = None,
    bootstrap: float = 0.0,
    present: list[list[int]] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(B, 1, H, W) label maps -> per image, binary masks (n, H, W) and class ids (n,) of the classes present.

    ``fill`` (B, C, H, W): mask values at ``IGNORE_LABEL`` pixels (default 0); with ``bootstrap`` b, every other
    pixel's mask value becomes (1 - b) x its binary value + b x ``fill``. ``present``: per image, the classes that
    are there (default: those with a labelled pixel); a class present only under ignored pixels is then still an
    object, whose mask there is ``fill``."""
    masks, classes = [], []
    for b, item in enumerate(label[:, 0].long()):
        image_classes = [c for c in range(num_classes) if (item == c).any()] if present is None else list(present[b])
        classes.append(torch.tensor(image_classes, dtype=torch.long, device=label.device))
        ignored = item == IGNORE_LABEL
        per_class = []
        for c in image_classes:
            mask = (item == c).float()
            if fill is not None:
                own = fill[b, c].to(mask.dtype)
                mask = ((1 - bootstrap) * mask + bootstrap * own).where(~ignored, own)
            per_class.append(mask)
        masks.append(torch.stack(per_class))
    return masks, classes


class Mask2FormerSemanticLoss(nn.Module):
    """``loss(pred, label)`` for a SupervisedTrainer whose network is ``network.WithQueryOutputs``: ``pred`` is
    ``(log_probs, per-query outputs)`` of one forward; Mask2Former's set loss of those outputs (weights from its
    config: class 2, mask 5, dice 5, no-object 0.1) + ``semantic_weight`` x CE + Dice on the log-probabilities;
    ``bootstrap`` mixes the network's own detached prediction into both (module docstring). ``network`` gives the
    set-loss criterion and the class count."""

    def __init__(self, network: nn.Module, semantic_weight: float = 1.0, bootstrap: float = 0.0):
        super().__init__()
        self.network = network
        self.semantic_weight = semantic_weight
        self.semantic = SemanticDiceCELoss(network.num_classes, bootstrap)  # checks bootstrap
        self.bootstrap = self.semantic.bootstrap

    def forward(
        self, pred: tuple, label: torch.Tensor, rows: slice | torch.Tensor | None = None, present=None
    ) -> torch.Tensor:
        """``rows``: the log-probabilities and ``label`` are these rows of the forward's batch, whose per-query outputs
        ``pred`` holds whole (a forward shared by several streams, consistency.py); Mask2Former's outputs are per
        image, so this is the loss of a forward of them alone. ``present``: per image, the classes there (default:
        the labelled ones; see ``semantic_to_instances``)."""
        if not isinstance(pred, (tuple, list)) or len(pred) != 2:
            raise TypeError(
                "Mask2FormerSemanticLoss needs (log_probs, query outputs): train network.WithQueryOutputs(network)"
            )
        pred, out = pred
        if rows is not None:
            out = query_output_rows(out, rows)
        m2f = self.network.mask2former
        needs_fill = self.bootstrap or (label == IGNORE_LABEL).any()
        fill = pred.detach().softmax(dim=1) if needs_fill else None
        mask_labels, class_labels = semantic_to_instances(
            label, self.network.num_classes, fill, self.bootstrap, present
        )
        losses = m2f.get_loss_dict(
            masks_queries_logits=out.masks_queries_logits,
            class_queries_logits=out.class_queries_logits,
            mask_labels=mask_labels,
            class_labels=class_labels,
            auxiliary_predictions=out.auxiliary_logits,
        )
        loss = m2f.get_loss(losses)
        if self.semantic_weight:
            loss = loss + self.semantic_weight * self.semantic(pred, label)
        return loss


# the ``loss`` option's choices: which class medsmile.json's ``loss_function`` part builds
LOSSES = {"mask2former": Mask2FormerSemanticLoss, "dicece": SemanticDiceCELoss}


def loss_class(name: str) -> type[nn.Module]:
    """The loss class ``loss`` names (medsmile.json's ``loss_function`` target), refused by name when unknown."""
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} must be one of {tuple(LOSSES)}")
    return LOSSES[name]


def query_output_rows(out, rows: slice | torch.Tensor) -> SimpleNamespace:
    """The per-query outputs Mask2Former's loss reads (class and mask logits, auxiliary layers) for ``rows`` of the
    batch."""
    return SimpleNamespace(
        class_queries_logits=out.class_queries_logits[rows],
        masks_queries_logits=out.masks_queries_logits[rows],
        auxiliary_logits=[{k: v[rows] for k, v in layer.items()} for layer in (out.auxiliary_logits or [])] or None,
    )
