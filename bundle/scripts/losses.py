"""Training losses for the Mask2Former network: its own set loss on semantic label maps, plus CE + Dice.

Supervising only the class-normalised semantic map (CE + Dice on ``network(x)``) lets a freshly initialised
Mask2Former sit for many iterations at a constant prediction (every pixel background): the gradient that reaches
each query's mask through the normalisation is weak. Mask2Former's own loss (Hungarian matching of queries to the
classes present, class CE, per-query mask BCE and Dice on sampled points, on every decoder layer) supervises the
query masks directly and escapes that plateau within a few dozen iterations; measured in docs/README.md.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


def semantic_to_instances(label: torch.Tensor, num_classes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(B, 1, H, W) label maps -> per image, binary masks (n, H, W) and class ids (n,) of the classes present."""
    masks, classes = [], []
    for item in label[:, 0].long():
        present = [c for c in range(num_classes) if (item == c).any()]
        classes.append(torch.tensor(present, dtype=torch.long, device=label.device))
        masks.append(torch.stack([(item == c).float() for c in present]))
    return masks, classes


class Mask2FormerSemanticLoss(nn.Module):
    """``loss(pred, label)`` for a SupervisedTrainer: Mask2Former's set loss of the network's last training forward
    (weights from its config: class 2, mask 5, dice 5, no-object 0.1) + ``semantic_weight`` x CE + Dice on ``pred``."""

    def __init__(self, network: nn.Module, semantic_weight: float = 1.0):
        super().__init__()
        self.network = network
        self.semantic_weight = semantic_weight
        self.semantic = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        out = self.network.last_query_outputs
        if out is None:
            raise RuntimeError("Mask2FormerSemanticLoss needs the network's forward in training mode first")
        m2f = self.network.mask2former
        mask_labels, class_labels = semantic_to_instances(label, self.network.num_classes)
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
