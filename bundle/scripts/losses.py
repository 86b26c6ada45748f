"""Training losses for the Mask2Former network: its own set loss on semantic label maps, plus CE + Dice.

Supervising only the class-normalised semantic map (CE + Dice on ``network(x)``) lets a freshly initialised
Mask2Former sit for many iterations at a constant prediction (every pixel background): the gradient that reaches
each query's mask through the normalisation is weak. Mask2Former's own loss (Hungarian matching of queries to the
classes present, class CE, per-query mask BCE and Dice on sampled points, on every decoder layer) supervises the
query masks directly and escapes that plateau within a few dozen iterations; measured in docs/README.md.

Pixels labelled ``IGNORE_LABEL`` (the least certain pixels of a pseudo-label, ``ignore_uncertain_pixels``) give no
CE / Dice term, and in the set loss their mask target is the network's own detached class probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn

IGNORE_LABEL = 255  # pseudo-label value of a pixel left out of the loss


class SemanticDiceCELoss(nn.Module):
    """CE + soft Dice on (B, C, H, W) logits against (B, 1, H, W) labels, skipping ``IGNORE_LABEL`` pixels; with no
    ignored pixel it equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dice = MaskedDiceLoss(softmax=True)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label[:, 0].long()
        valid = label != IGNORE_LABEL
        if not valid.any():
            return pred.sum() * 0.0  # nothing to learn from this batch; keeps the graph
        ce = F.cross_entropy(pred, label, ignore_index=IGNORE_LABEL)
        onehot = F.one_hot(label.where(valid, 0), self.num_classes).permute(0, 3, 1, 2).float()
        return ce + self.dice(pred, onehot, mask=valid[:, None].float())


def semantic_to_instances(
    label: torch.Tensor, num_classes: int, fill: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(B, 1, H, W) label maps -> per image, binary masks (n, H, W) and class ids (n,) of the classes present.

    ``fill`` (B, C, H, W): mask values at ``IGNORE_LABEL`` pixels (default 0)."""
    masks, classes = [], []
    for b, item in enumerate(label[:, 0].long()):
        present = [c for c in range(num_classes) if (item == c).any()]
        classes.append(torch.tensor(present, dtype=torch.long, device=label.device))
        ignored = item == IGNORE_LABEL
        per_class = []
        for c in present:
            mask = (item == c).float()
            if fill is not None and ignored.any():
                mask = mask.where(~ignored, fill[b, c].to(mask.dtype))
            per_class.append(mask)
        masks.append(torch.stack(per_class))
    return masks, classes


class Mask2FormerSemanticLoss(nn.Module):
    """``loss(pred, label)`` for a SupervisedTrainer: Mask2Former's set loss of the network's last training forward
    (weights from its config: class 2, mask 5, dice 5, no-object 0.1) + ``semantic_weight`` x CE + Dice on ``pred``."""

    def __init__(self, network: nn.Module, semantic_weight: float = 1.0):
        super().__init__()
        self.network = network
        self.semantic_weight = semantic_weight
        self.semantic = SemanticDiceCELoss(network.num_classes)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        out = self.network.last_query_outputs
        if out is None:
            raise RuntimeError("Mask2FormerSemanticLoss needs the network's forward in training mode first")
        m2f = self.network.mask2former
        fill = pred.detach().softmax(dim=1) if (label == IGNORE_LABEL).any() else None
        mask_labels, class_labels = semantic_to_instances(label, self.network.num_classes, fill)
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
