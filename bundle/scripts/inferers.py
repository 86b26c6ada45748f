"""Test-time flip averaging for the segmentation network.

A round's network is trained with random horizontal and vertical flips, so each mirrored view of an image is an
equally valid input; averaging the class probabilities of the four views (identity, horizontal, vertical, both)
smooths the single-view errors of a network trained on noisy pseudo-labels. The pipeline uses it for the pool
predictions that become the next round's labels (``flip_average_predictions``) and inference.json can use it too
(its own ``flip_average_predictions``). ``PlaneInferer`` lets inference.json take 3-D volumes: slice by slice with
MONAI's ``SliceInferer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SimpleInferer, SliceInferer

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


class PlaneInferer(Inferer):
    """The 2-D network on 2-D batches ``(B, C, H, W)`` and, slice by slice along spatial axis ``slice_axis``, on
    volumes ``(B, C, X, Y, Z)`` (MONAI's ``SliceInferer``; ``roi_size`` is the in-plane size the pre-processing
    resized to, so each slice is one window). ``inner`` (default ``SimpleInferer``; e.g. ``FlipAveragingInferer``)
    runs the network on each 2-D batch."""

    def __init__(
        self, roi_size: Sequence[int], slice_axis: int = 2, inner: Inferer | None = None, sw_batch_size: int = 8
    ):
        super().__init__()
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        self.inner = inner if inner is not None else SimpleInferer()
        self.slices = SliceInferer(
            spatial_dim=slice_axis,
            roi_size=tuple(int(s) for s in roi_size),
            sw_batch_size=sw_batch_size,
            progress=False,
        )

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim == 4:
            return self.inner(inputs, network, *args, **kwargs)
        if inputs.ndim == 5:
            return self.slices(inputs, lambda x: self.inner(x, network, *args, **kwargs))
        raise ValueError(
            f"expected a batch of 2-D images (B, C, H, W) or volumes (B, C, X, Y, Z), got {tuple(inputs.shape)}"
        )
