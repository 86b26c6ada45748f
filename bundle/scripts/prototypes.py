"""Round 0 of MedSMILE: class prototypes from the labelled reference(s) and transductive soft labels.

docs/METHOD.md, "Round 0": prototype p_c = L2-normalised mean of the reference's patch features over class-c cells
(label resized to the token grid, nearest); S_c = F_u . p_c; bilinear upsampling to the image size; softmax over
classes. The bundle offers one step the paper lacks (``foreground_contrast``, off by default): a foreground cell must
also stand out within its own image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def check_reference_label(
    label: torch.Tensor, num_classes: int, name: str = "reference label", allow_empty: bool = False
) -> None:
    """Every class 0..C-1 must be present and nothing else: a prototype needs at least one pixel of its class.
    ``allow_empty``: an all-background label passes too (K-shot: an image marked "nothing here", which the rounds
    learn absence from and round 0 leaves out)."""
    values = torch.unique(label).tolist()
    outside = [v for v in values if v < 0 or v >= num_classes]
    if outside:
        raise ValueError(f"{name}: values {outside} are outside 0..{num_classes - 1} (num_classes={num_classes})")
    missing = [c for c in range(num_classes) if c not in values]
    if missing and not (allow_empty and values == [0]):
        raise ValueError(f"{name}: classes {missing} are absent; every class 0..{num_classes - 1} must appear")


def rotated_views(image: torch.Tensor, label: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference (image (..., X, Y), label (X, Y)) and its 90, 180 and 270 degree rotations, label rotated alike.

    Why: DINOv2's patch tokens carry where they sit and which way the scene faces, so with one labelled image the
    place and orientation of its lesion become cues for the class (a polyp on the reference's right labels the
    right side of pool images). Extra views show the same lesion and background in four orientations; with
    ``flip_average`` they cover all eight symmetries of the square. Measured in benchmarks/README.md."""
    return [(image.rot90(k, (-2, -1)), label.rot90(k, (-2, -1))) for k in range(4)]


def class_prototypes(
    features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], num_classes: int
) -> torch.Tensor:
    """(C, D) L2-normalised class prototypes pooled over one or more references.

    Args:
        features: per reference, L2-normalised patch features (D, h, w).
        labels: per reference, its label map (H, W) at image resolution, values 0..C-1.
    """
    sums = None
    for feat, label in zip(features, labels, strict=True):
        h, w = feat.shape[-2:]
        grid = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        onehot = F.one_hot(grid, num_classes).float()  # (h, w, C)
        if (onehot.sum((0, 1)) == 0).any():
            # a class smaller than one token cell vanishes under nearest resizing: use area fractions instead
            onehot = F.interpolate(
                F.one_hot(label.long(), num_classes).permute(2, 0, 1)[None].float(), (h, w), mode="area"
            )[0]
            onehot = onehot.permute(1, 2, 0)
            logger.warning("a class covers less than one token cell of the reference; prototypes use area weights")
        part = torch.einsum("dhw,hwc->cd", feat, onehot)
        sums = part if sums is None else sums + part
    return F.normalize(sums, dim=1)


def prototype_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine maps S_c = F_u . p_c: (B, D, h, w) x (C, D) -> (B, C, h, w)."""
    return torch.einsum("bdhw,cd->bchw", features, prototypes)


def foreground_contrast_scores(scores: torch.Tensor, contrast: float | None) -> torch.Tensor:
    """Cosine maps (B, C, h, w) in which a foreground class wins a cell only if it also stands out in its own image.

    Each foreground class c >= 1 is lowered by t = max(0, mean + ``contrast`` x std) of its margin S_c - S_0 over the
    image's cells, so after the argmax a cell is class c only where S_c - S_0 > t (and c beats the other classes by
    the same adjusted scores). ``None`` returns the scores unchanged (the paper's plain argmax).

    Why: a prototype's fixed decision (S_c > S_0) labels whole images foreground when their background looks more
    like the reference's lesion than like the reference's own background (red mucosa in Kvasir: 45 % of each pool
    image labelled polyp against 16 % true). The lesion still stands out within such an image, and the threshold
    never falls below the plain argmax, so images whose background is already rejected keep their labels.
    Measured in benchmarks/README.md (round-0 and round-1 Dice on Kvasir, CVC, ISIC 2017, BUSI).
    """
    if contrast is None:
        return scores
    margin = (scores[:, 1:] - scores[:, :1]).flatten(2)  # (B, C-1, h*w)
    threshold = (margin.mean(2) + contrast * margin.std(2)).clamp_min(0)
    return torch.cat([scores[:, :1], scores[:, 1:] - threshold[..., None, None]], dim=1)


def soft_labels(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of cosine maps (B, C, h, w) to ``size`` and softmax over classes -> PL^(0)."""
    up = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    return up.softmax(dim=1)


# ---------------------------------------------------------------- reference guidance
SMALL_REFERENCE_FRACTION = 0.02  # measured in benchmarks/results/round0_variants.md ("Reference size")


def small_reference_warning(labels: Sequence[torch.Tensor], num_classes: int) -> str | None:
    """A warning when a foreground class covers less than ``SMALL_REFERENCE_FRACTION`` of its image in every
    reference (label maps (H, W)), else None.

    Why: a class that covers a few token cells gives a prototype made of a handful of patches, mostly its border
    with the background. Every Kvasir pool image as the reference in turn: below 2 % the round-0 Dice was about a
    quarter lower than the median reference's and 2 of 10 such references fell under half of it (BUSI and ISIC
    references that small did not lose). Another labelled image (K-shot) adds cells to the prototype."""
    small = []
    for c in range(1, num_classes):
        largest = max(float((label == c).float().mean()) for label in labels)
        if largest < SMALL_REFERENCE_FRACTION:
            small.append(f"class {c} covers {largest:.2%}")
    if not small:
        return None
    return (
        f"the reference's labelled structure is small ({', '.join(small)} of the image, below "
        f"{SMALL_REFERENCE_FRACTION:.0%}): on the benchmark's Kvasir pools such references gave round-0 labels about a "
        "quarter worse and 2 of 10 collapsed (benchmarks/results/round0_variants.md). Label one of the next "
        "suggestions of `run suggest` "
        "(suggestions/ranking.csv) that shows the structure large and clear too, and give both as reference_image / "
        "reference_label lists (K-shot)"
    )


# ---------------------------------------------------------------- absence (``presence_threshold``)
def foreground_margin(scores: torch.Tensor) -> torch.Tensor:
    """(B, h, w) best foreground score minus the background score of (B, C, h, w) class scores."""
    return scores[:, 1:].amax(1) - scores[:, 0]


def presence_scores(scores: torch.Tensor) -> torch.Tensor:
    """(B,) how strongly each image shows a foreground class: its largest foreground-minus-background margin."""
    return foreground_margin(scores).flatten(1).amax(1)


def reference_presence_threshold(
    reference_scores: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], quantile: float
) -> float:
    """The margin a pool image's best cell must pass to count as showing the structure: the ``quantile`` of the
    margins of the references' own background cells (label resized to the score grid, nearest).

    Why: round 0's argmax labels some cells foreground in every image. The reference is the one image whose cells are
    known: an image whose most lesion-like cell is no more lesion-like than (nearly) all of the reference's background
    holds no lesion that round 0 can find. Measured in benchmarks/results/round0_variants.md.

    Args:
        reference_scores: per reference view, its (C, h, w) class scores (after ``foreground_contrast_scores``);
        labels: per view, its (H, W) label map.
    """
    background = []
    for scores, label in zip(reference_scores, labels, strict=True):
        grid = F.interpolate(label[None, None].float(), size=scores.shape[-2:], mode="nearest")[0, 0]
        background.append(foreground_margin(scores[None])[0][grid == 0])
    return float(torch.quantile(torch.cat(background).float(), quantile))


def smooth_presence(presence: torch.Tensor, cases: Sequence[int], window: int = 3) -> torch.Tensor:
    """Per-image presence scores (N,) with each volume's slices median-filtered along the slice axis.

    ``cases``: the case (volume) of each image, its slices in order and next to each other (``ImagePool.items``).
    A 2-D image (a case of one slice) keeps its score. Why: neighbouring slices of a volume show the structure or
    not together; a median over ``window`` slices drops a lone slice that flickers on (or off) and keeps the slice
    where the structure starts or ends (a median filter keeps monotone runs)."""
    out = presence.clone()
    cases = torch.as_tensor(list(cases))
    half = window // 2
    for case in torch.unique(cases):
        index = torch.nonzero(cases == case).flatten()
        if len(index) < 2:
            continue
        values = presence[index]
        padded = torch.cat([values[:1].repeat(half), values, values[-1:].repeat(half)])  # edge slices repeat
        out[index] = padded.unfold(0, window, 1).median(1).values
    return out


def suppress_foreground(scores: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) scores in which images flagged ``absent`` (B,) lose every cell to the background: each foreground
    score is capped just below the background's, which bilinear upsampling keeps (it is linear), so the argmax is
    background everywhere while the other images' scores stay as they were."""
    capped = torch.minimum(scores[:, 1:], scores[:, :1] - 1e-3)
    return torch.where(absent.view(-1, 1, 1, 1), torch.cat([scores[:, :1], capped], dim=1), scores)


# ---------------------------------------------------------------- linear-probe round 0 (``round0_classifier``)
ROUND0_CLASSIFIERS = ("prototypes", "linear_probe")
PROBE_WEIGHT_DECAY = 0.1  # on the squared weights (features scaled to components of order 1); chosen among 1e-4..1
PROBE_POOL_KEEP = 0.5  # fraction of the pool cells a class wins, by logit margin, that refit the probe
PROBE_CELLS_PER_IMAGE = 256  # pool cells sampled per image for the refit (bounds its memory for any pool size)


def reference_cells(features: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per class, the (n_c, D) patch features (D, h, w) whose token cell ``label`` (H, W) assigns to it (nearest
    resize; a class smaller than one cell keeps the cell holding most of its pixels)."""
    h, w = features.shape[-2:]
    grid = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    flat = features.reshape(features.shape[0], -1).T
    cells = []
    for c in range(num_classes):
        mask = (grid == c).flatten()
        if not mask.any():
            area = F.interpolate((label == c)[None, None].float(), (h, w), mode="area").flatten()
            mask = area == area.max()
        cells.append(flat[mask])
    return cells


class LinearProbe(torch.nn.Module):
    """Class logits of patch features: (B, D, h, w) -> (B, C, h, w), a 1x1 linear map on sqrt(D)-scaled features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scaled = features * features.shape[1] ** 0.5
        return torch.einsum("bdhw,cd->bchw", scaled, self.weight.to(features)) + self.bias.to(features).view(
            1, -1, 1, 1
        )


def fit_linear_probe(
    cells: Sequence[torch.Tensor], weight_decay: float = PROBE_WEIGHT_DECAY, max_iter: int = 100
) -> LinearProbe:
    """Class-balanced multinomial logistic regression on labelled cells (one (n_c, D) tensor per class), by L-BFGS.

    Why: a mean prototype weighs every feature dimension alike; a linear classifier fitted to the reference's cells
    learns which dimensions separate its lesion from its background. Each class weighs alike whatever its cell
    count (a lesion is often a few percent of the image). Under heavy ``weight_decay`` the weights tend to the
    difference of the balanced class means, i.e. back towards the prototypes.
    """
    cells = [c.float().cpu() for c in cells]
    x = torch.cat(cells) * cells[0].shape[1] ** 0.5
    y = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(cells)])
    counts = torch.tensor([float(len(c)) for c in cells])
    class_weight = counts.sum() / (len(cells) * counts.clamp_min(1))
    weight = torch.zeros(len(cells), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(cells), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, weight=class_weight) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(weight.detach(), bias.detach())


def sample_cells(features: torch.Tensor, count: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B * count, D) random token cells of (B, D, h, w) features, ``count`` per image without replacement; all
    cells when ``count`` is None or at least h * w."""
    flat = features.flatten(2).transpose(1, 2)  # (B, h*w, D)
    if count is None or count >= flat.shape[1]:
        return flat.reshape(-1, flat.shape[2])
    picks = torch.stack([torch.randperm(flat.shape[1], generator=generator)[:count] for _ in range(len(flat))])
    return torch.gather(flat, 1, picks.to(flat.device)[..., None].expand(-1, -1, flat.shape[2])).reshape(
        -1, flat.shape[2]
    )


def refit_on_pool(
    probe: LinearProbe,
    reference: Sequence[torch.Tensor],
    pool_cells: torch.Tensor,
    keep: float = PROBE_POOL_KEEP,
    weight_decay: float = PROBE_WEIGHT_DECAY,
) -> LinearProbe:
    """The probe refitted on the reference's cells plus the pool's confident cells: per class, the ``keep``
    fraction of the pool cells it wins with the largest top-1 minus top-2 logit margin.

    Why: one reference shows each class in one appearance; the pool's confident cells show it in many (lighting,
    anatomy, scanner), the transductive step the paper's prototypes lack."""
    pool_cells = pool_cells.float().cpu()
    logits = probe(pool_cells.T[None, :, :, None])[0, :, :, 0].T  # (M, C)
    top2 = logits.topk(2, dim=1).values
    margin, assign = top2[:, 0] - top2[:, 1], logits.argmax(1)
    cells = []
    for c, own in enumerate(reference):
        won, won_margin = pool_cells[assign == c], margin[assign == c]
        if len(won):
            won = won[won_margin >= torch.quantile(won_margin, 1 - keep)]
        cells.append(torch.cat([won, own.float().cpu()]))
    return fit_linear_probe(cells, weight_decay)
