"""Test-time flip averaging for the segmentation network.

A round's network is trained with random horizontal and vertical flips, so each mirrored view of an image is an
equally valid input; averaging the class probabilities of the four views (identity, horizontal, vertical, both)
smooths the single-view errors of a network trained on noisy pseudo-labels. The pipeline uses it for the pool
predictions that become the next round's labels (``flip_average_predictions``) and inference.json can use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer

# the flips of the "flips" training augmentation, and their composition
DEFAULT_FLIPS: tuple[tuple[int, ...], ...] = ((-1,), (-2,), (-2, -1))


class FlipAveragingInferer(Inferer):
    """``network(x)`` averaged over mirrored copies of ``x`` in probability space.

    The network returns log-probabilities or logits over dim 1 (softmax gives probabilities); the result is the log
    of the mean probability, so ``softmax``/``argmax`` downstream see the averaged map, as they would a single view.
    """

    def __init__(self, flips: Sequence[Sequence[int]] = DEFAULT_FLIPS):
        super().__init__()
        self.flips = [tuple(int(d) for d in dims) for dims in flips]
        for dims in self.flips:
            if not dims or not set(dims) <= {-1, -2}:
                raise ValueError(f"flip dims {dims} must be spatial dims of a 2-D image: (-1,), (-2,) or (-2, -1)")

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        views = [((), network(inputs, *args, **kwargs))]
        views += [(dims, network(inputs.flip(dims), *args, **kwargs)) for dims in self.flips]
        return mean_of_flipped_views(views)


def mean_of_flipped_views(views) -> torch.Tensor:
    """Log of the mean class probability of mirrored views: ``views`` holds (dims, output of the view mirrored along
    dims), each output log-probabilities or logits over dim 1; each is mirrored back before averaging."""
    probs = 0
    for dims, output in views:
        output = output.float()
        probs = probs + (output.flip(dims) if dims else output).softmax(dim=1)
    probs = probs / len(views)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
