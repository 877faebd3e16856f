"""EVA: Explaining using Verified perturbation Analysis (Fel et al. 2023, "Don't Lie to Me! Robust and
Efficient Explainability with Verified Perturbation Analysis", CVPR).

The adversarial overlap of an image ``x`` with label ``y`` over a set of perturbations ``B``,

    AO(x, B) = max_{delta in B} max_{c != y} f_c(x + delta) - f_y(x + delta),

is upper-bounded by verified perturbation analysis (:mod:`explain.bounds`) over the L-inf ball of radius
``eps``. The importance of a region ``u`` is how much the overlap drops when ``u`` may not move:

    EVA(u) = AO(x, B) - AO(x, B_u),   B_u = {delta in B : delta_u = 0}.

Regions are the cells of a ``grid_size`` x ``grid_size`` grid, or any integer label map (superpixels).

Bounds. The default is full CROWN (:mod:`explain.bounds.crown`): every nonlinear layer's input box comes from
a backward pass to the input, so the bounds stay within a fraction of a logit of a PGD attack on networks not
trained for certification, where CROWN with interval intermediate boxes (``bound="crown-ibp"``, the cheap
method) is vacuous (``benchmarks/bench_eva.py``). Only bounds that tight tell regions apart.

Relaxation shared by the regions (default). Every ``B_u`` is a subset of ``B``, so the intermediate boxes of
``B`` enclose every value reachable from ``B_u``, the linear relaxations built on them hold there too, and
CROWN's linear upper bound ``f_c - f_y <= <A_c, x> + b_c`` computed once on ``B`` holds on every ``B_u``. Its
maximum over ``B_u`` differs from its maximum over ``B`` only by the terms of the fixed pixels, so one bound
propagation per image gives all the region bounds (sound, and about 65 times cheaper than one propagation
per box at the 8 x 8 grid). The alternative, ``relaxation="per_box"``, propagates every (image, region) box
on its own, intermediate boxes included (the literal definition; ``batch_size`` boxes at a time).
``benchmarks/bench_eva.py`` (c) compares the two on a model that reads only a watermark: with CROWN-IBP the
per-box bounds were dominated by how far the interval boxes grow, which follows the image's structure rather
than what the model uses (the watermark ranked below average); with full CROWN both rank it first or second
of 64 cells (2 images; the per-box maps cost about 65 times the shared ones).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from explain.base import Explainer, check_images_targets, eval_mode, grad_enabled, model_device
from explain.batching import BatchSize
from explain.bounds import METHODS, BoundGraph, build_graph, check_graph
from explain.bounds.cost import LONG_BOUND_SECONDS, estimate_full_crown, progress_bar
from explain.bounds.crown import ROW_BUDGET
from explain.bounds.margin import ball_box
from explain.bounds.margin import margin_upper_bounds_of_balls, shared_crown_margins
from explain.registry import register_explainer
from explain.validation import in_interval, one_of, positive_int

__all__ = [
    "DEFAULT_EPS", "EVA", "RELAXATIONS", "adversarial_overlap_bound", "eva_maps", "grid_regions",
    "margin_upper_bounds_of_balls", "shared_crown_margins",  # bounds code, importable here as before
]

RELAXATIONS = ("shared", "per_box")
#: ``EVA(bound=...)``: the bound methods, and ``auto``: full CROWN when its estimated cost is within the budget
BOUNDS = ("auto", *METHODS)
#: ``bound="auto"`` picks full CROWN while its estimate (:func:`explain.bounds.cost.estimate_full_crown`) stays
#: within this many seconds per image on 2 CPU cores, else CROWN-IBP
AUTO_BUDGET_SECONDS = 60.0

logger = logging.getLogger(__name__)

#: Default radius for images in [0, 1]: 8/255, the usual L-inf budget of CIFAR-scale robustness work. Smaller
#: radii give tighter (less loose) bounds on deep networks; scale it if the images are normalised outside the model.
DEFAULT_EPS = 8 / 255


def grid_regions(height: int, width: int, grid_size: int, device: torch.device | None = None) -> Tensor:
    """Region ids [H, W] of a ``grid_size`` x ``grid_size`` grid (row-major; the nearest-neighbour upsampling
    of the grid, as Sobol's masks, so H and W need not be multiples of ``grid_size``)."""
    positive_int("grid_size", grid_size)
    rows = torch.arange(height, device=device) * grid_size // height
    cols = torch.arange(width, device=device) * grid_size // width
    return rows[:, None] * grid_size + cols[None, :]


def _check_eps(eps: float | Tensor) -> float:
    """The L-inf radius: a nonnegative number (a 0-dim tensor is read as its value)."""
    return in_interval("eps", eps.item() if isinstance(eps, Tensor) else eps, 0)


def _check_input_range(images: Tensor, input_range: tuple[float, float] | None) -> None:
    if input_range is None:
        return
    low, high = input_range
    if not low < high:
        raise ValueError(f"input_range must be (low, high) with low < high, got {input_range!r}")
    if images.min() < low or images.max() > high:
        raise ValueError(
            f"images lie in [{images.min().item():.4g}, {images.max().item():.4g}], outside input_range "
            f"{tuple(input_range)}: pass input_range=None or the range the images are in"
        )


def adversarial_overlap_bound(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int,
    eps: float,
    fixed: Tensor | None = None,
    method: str = "crown",
    *,
    input_range: tuple[float, float] | None = None,
    lipschitz_body: bool | None = None,
    batch_size: int | None = None,
    crown_classes: int | None = None,
    lipschitz_boxes: bool = True,
    row_budget: int = ROW_BUDGET,
    tight_boxes: bool = False,
) -> Tensor:
    """Upper bound [B] of ``max_{||delta||_inf <= eps, delta = 0 on fixed} max_{c != y} f_c(x+delta) - f_y(x+delta)``.

    Args:
        model: a network of supported layers (:data:`explain.bounds.SUPPORTED`); deel-torchlip networks are
            exported with ``vanilla_model`` on a copy. Its train/eval flags and ``.grad`` are left untouched.
        images: [B, C, H, W]; targets: [B] class indices (or an int).
        eps: L-inf radius, in the units of ``images``.
        fixed: optional bool [B, H, W] (or [H, W] for all images): cells that are not perturbed (any channel).
        method: ``crown`` (full CROWN: every nonlinear layer's input box from a backward pass to the input),
            ``alpha-crown`` (full CROWN with the ReLU lower slopes optimised per box: tighter, slower),
            ``crown-ibp`` (CROWN on interval intermediate boxes: cheaper, far looser on networks not trained for
            it), ``ibp``, ``lipschitz`` (1-Lipschitz body under a last linear layer: ``lipschitz_body=True`` or the
            model's ``lipschitz_body`` attribute), or ``best`` (per class, the smallest of the available bounds).
        input_range: optional (low, high): intersect the ball with the valid input range. Default None: the
            plain L-inf ball, as in the definition of the adversarial overlap.
        batch_size: boxes per bound computation (all at once when None).
        crown_classes: with many classes, run CROWN only for this many classes of largest IBP bound per
            box, the others keeping their IBP bound (see :func:`explain.bounds.margin_upper_bounds`).
        lipschitz_boxes: intersect the intermediate boxes with Lipschitz boxes computed from the weights
            (:mod:`explain.bounds.lipschitz`; sound for any network, far tighter on 1-Lipschitz ones).
        row_budget: memory of full CROWN's intermediate passes (elements per chunk of backward rows).
        tight_boxes: full CROWN's intermediate boxes also intersected with the interval boxes, and max pooling
            after a ReLU bounded by CROWN too: usually tighter, slower; the default gives auto_LiRPA's boxes
            (:mod:`explain.bounds.crown`).

    Raises:
        ValueError: a bad option, target or ``fixed`` mask, or images outside ``input_range``.
        UnsupportedLayerError: a layer without bound rules (named with its module path).
    """
    images, targets = check_images_targets(images, targets)
    eps, method = _check_eps(eps), one_of("method", method, METHODS)
    batch_size = positive_int("batch_size", batch_size, allow_none=True)
    _check_input_range(images, input_range)
    batch, _, height, width = images.shape
    if fixed is None:
        fixed = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
    fixed = torch.as_tensor(fixed, device=images.device)
    if fixed.dtype != torch.bool or fixed.shape[-2:] != (height, width) or fixed.ndim not in (2, 3):
        raise ValueError(f"fixed must be a bool tensor [B, H, W] or [H, W] with H, W = {height}, {width}; got "
                         f"{fixed.dtype} {tuple(fixed.shape)}")
    fixed = fixed.expand(batch, height, width)
    if fixed.shape[0] != batch:
        raise ValueError(f"fixed has {fixed.shape[0]} masks for {batch} images")
    out_device = images.device
    device = model_device(model, default=images.device)
    options = dict(methods=(method,), input_range=input_range, crown_classes=crown_classes,
                   lipschitz_boxes=lipschitz_boxes, row_budget=row_budget, tight_boxes=tight_boxes)
    with grad_enabled(), eval_mode(model):
        images, targets = images.detach().to(device).clone(), targets.to(device).clone()
        fixed = fixed.to(device)
        graph = build_graph(model, lipschitz_body=lipschitz_body)
        check_graph(graph, model, images)
        chunk = batch if batch_size is None else batch_size
        bounds = torch.cat([
            margin_upper_bounds_of_balls(graph, images[i : i + chunk], targets[i : i + chunk], fixed[i : i + chunk],
                                         eps, **options).amax(1)
            for i in range(0, batch, chunk)
        ])
    return bounds.detach().to(out_device)


def eva_maps(
    graph: BoundGraph,
    images: Tensor,
    targets: Tensor,
    regions: Tensor,
    eps: float,
    *,
    method: str = "crown",
    input_range: tuple[float, float] | None = None,
    batch_size: int | None = None,
    crown_classes: int | None = None,
    relaxation: str = "shared",
    lipschitz_boxes: bool = True,
    row_budget: int = ROW_BUDGET,
    tight_boxes: bool = False,
) -> Tensor:
    """EVA maps [B, H, W]: each pixel gets ``AO(x, B) - AO(x, B_u)`` of its region ``u``.

    ``regions`` [B, H, W] integer region ids (any values; a region is the set of pixels sharing an id).
    ``relaxation="shared"``: CROWN (``method`` crown or crown-ibp, and the CROWN part of best) propagates the
    full ball of each image once, ``batch_size`` images at a time, and bounds every region box from it (module
    docstring). IBP, the Lipschitz bound, alpha-CROWN (its slopes are optimised for one box) and CROWN with
    ``relaxation="per_box"`` bound every box on its own:
    the full balls and every region of every image form one list of boxes, bounded ``batch_size`` at a time
    (boxes of several images share a chunk).
    """
    eps, method = _check_eps(eps), one_of("method", method, METHODS)
    relaxation = one_of("relaxation", relaxation, RELAXATIONS)
    batch_size = positive_int("batch_size", batch_size, allow_none=True)
    batch, device = images.shape[0], images.device
    inverses = torch.stack([torch.unique(labels, return_inverse=True)[1] for labels in regions])
    counts = (inverses.flatten(1).amax(1) + 1).tolist()
    chunk = batch if batch_size is None else batch_size
    shared = relaxation == "shared" and method in ("crown", "crown-ibp", "best")
    options = dict(input_range=input_range, crown_classes=crown_classes, lipschitz_boxes=lipschitz_boxes,
                   row_budget=row_budget, tight_boxes=tight_boxes)
    margins = []  # [B, K-1] of the full balls, then [count_b, K-1] of the regions of each image
    if shared:
        parts = [shared_crown_margins(graph, images[i : i + chunk], targets[i : i + chunk], inverses[i : i + chunk],
                                      eps, full_crown=method != "crown-ibp", **options)
                 for i in range(0, batch, chunk)]
        per_region = [of_image for part in parts for of_image in part[1]]
        margins.append(torch.cat([*[part[0] for part in parts], *[r[:c] for r, c in zip(per_region, counts)]]))
    if method in ("crown", "crown-ibp"):
        per_box = () if shared else (method,)
    elif method == "best" and shared:  # the per-box bounds that "best" takes along with the shared CROWN
        per_box = ("ibp", "lipschitz") if graph.lipschitz_body else ("ibp",)
    else:
        per_box = (method,)
    if per_box:
        # boxes: the B full balls, then the regions of image 0, those of image 1, ... (region -1: nothing fixed)
        every = torch.arange(batch, device=device)
        image_index = torch.cat([every, torch.repeat_interleave(every, torch.tensor(counts, device=device))])
        region_index = torch.cat([torch.full((batch,), -1, device=device),
                                  *[torch.arange(count, device=device) for count in counts]])
        boxes = []
        for start in range(0, len(image_index), chunk):
            index, region = image_index[start : start + chunk], region_index[start : start + chunk]
            fixed = inverses[index] == region.view(-1, 1, 1)  # the masks are built chunk by chunk
            boxes.append(margin_upper_bounds_of_balls(graph, images[index], targets[index], fixed, eps,
                                                      methods=per_box, **options))
        margins.append(torch.cat(boxes))
    overlap = torch.stack(margins).amin(0).amax(1)
    full, per_region = overlap[:batch], overlap[batch:].split(counts)
    return torch.stack([(full[b] - per_region[b])[inverses[b]] for b in range(batch)])


@register_explainer("eva")
class EVA(Explainer):
    """EVA attribution maps: ``EVA(model, eps=8/255, grid_size=8, regions=None, bound="auto")(images, targets)``.

    ``regions``: None for the ``grid_size`` grid, or an integer label map [H, W] or [B, H, W] (superpixels)
    used for every call; a call may also pass its own: ``explainer(images, targets, regions=labels)``.
    ``bound``: ``auto`` (default: full CROWN when its estimated cost is at most :data:`AUTO_BUDGET_SECONDS` per
    image on 2 CPU cores, else CROWN-IBP; the estimate and the choice are logged) | ``crown`` (full CROWN) |
    ``alpha-crown`` (per box only) | ``crown-ibp`` | ``ibp`` | ``lipschitz`` | ``best`` (see
    :func:`adversarial_overlap_bound`). ``eps`` is in the units of the images (8/255 suits images in [0, 1];
    scale it with any normalisation done outside the model). ``relaxation``: ``"shared"`` (one CROWN
    propagation per image, valid for all its regions) or ``"per_box"`` (one per (image, region) box); see the
    module docstring. ``batch_size``: images (shared) or boxes (per box) bounded at once; each carries K-1
    backward rows through the network. ``lipschitz_boxes``: intersect the intermediate boxes with Lipschitz
    boxes (:mod:`explain.bounds.lipschitz`). ``row_budget``: memory of full CROWN's intermediate passes.
    ``tight_boxes``: full CROWN's intermediate boxes tighter than auto_LiRPA's (:func:`adversarial_overlap_bound`).

    ``crown_classes``: for many classes (ImageNet), run CROWN only for this many classes of largest IBP bound
    (the others keep their IBP bound; still sound).

    The Lipschitz bound depends on a box only through its number of free cells, so with
    ``bound="lipschitz"`` every region of equal size gets the same score. On a 1-Lipschitz network it is also
    the tightest bound by far, so ``bound="best"`` then gives (nearly) that same flat map: ``best`` serves the
    overlap bound (:func:`adversarial_overlap_bound`), ``crown`` the maps.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> EVA(model, eps=0.01, grid_size=4)(torch.rand(2, 3, 8, 8), torch.tensor([0, 2])).shape
    torch.Size([2, 8, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = DEFAULT_EPS,
        grid_size: int = 8,
        regions: Tensor | None = None,
        bound: str = "auto",
        input_range: tuple[float, float] | None = None,
        lipschitz_body: bool | None = None,
        crown_classes: int | None = None,
        relaxation: str = "shared",
        lipschitz_boxes: bool = True,
        batch_size: BatchSize = 16,
        seed: int | None = 0,
        row_budget: int = ROW_BUDGET,
        tight_boxes: bool = False,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.tight_boxes = bool(tight_boxes)
        self.relaxation = one_of("relaxation", relaxation, RELAXATIONS)
        self.lipschitz_boxes = bool(lipschitz_boxes)
        self.eps = _check_eps(eps)
        self.grid_size = positive_int("grid_size", grid_size)
        self.regions = None if regions is None else self._check_regions(regions)
        self.bound = one_of("bound", bound, BOUNDS)
        self.input_range = input_range
        self.lipschitz_body = lipschitz_body
        self.crown_classes = positive_int("crown_classes", crown_classes, allow_none=True)
        self.row_budget = positive_int("row_budget", row_budget)
        #: the bound the last call ran (``auto`` resolved) and full CROWN's cost estimate for it (None if not made)
        self.last_bound: str | None = None
        self.last_estimate = None
        self._graph: tuple[tuple, BoundGraph] | None = None

    @staticmethod
    def _check_regions(regions: Tensor) -> Tensor:
        regions = torch.as_tensor(regions)
        if regions.is_floating_point() or regions.is_complex() or regions.dtype == torch.bool:
            raise TypeError(f"regions must be an integer label map, got dtype {regions.dtype}")
        if regions.ndim not in (2, 3):
            raise ValueError(f"regions must be [H, W] or [B, H, W], got shape {tuple(regions.shape)}")
        return regions.long()

    def _regions_for(self, images: Tensor, regions: Tensor | None) -> Tensor:
        batch, _, height, width = images.shape
        regions = self.regions if regions is None else self._check_regions(regions)
        if regions is None:
            regions = grid_regions(height, width, self.grid_size, images.device)
        if regions.shape[-2:] != (height, width) or (regions.ndim == 3 and regions.shape[0] != batch):
            raise ValueError(
                f"regions of shape {tuple(regions.shape)} do not match images {tuple(images.shape)}: pass "
                f"[H, W] or [B, H, W] with H, W = {height}, {width} and B = {batch}"
            )
        return regions.to(images.device).expand(batch, height, width)

    def _bound_graph(self) -> BoundGraph:
        """The model's bound graph, rebuilt when a parameter or buffer changed since the last call (in-place
        updates such as optimizer steps bump a tensor's version counter), so that the export and the
        operator norms of the Lipschitz boxes are paid once per weight update, not once per call."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        key = (tuple((t.data_ptr(), t._version) for t in tensors), getattr(self.model, "lipschitz_body", None))
        if self._graph is None or self._graph[0] != key:
            self._graph = (key, build_graph(self.model, lipschitz_body=self.lipschitz_body))
        return self._graph[1]

    def explain(self, images: Tensor, targets: Tensor, regions: Tensor | None = None) -> Tensor:
        """Maps [B, H, W]; ``regions``: this call's label map (default: the one given at construction, or the
        grid)."""
        _check_input_range(images, self.input_range)
        graph = self._bound_graph()
        check_graph(graph, self.model, images)
        regions = self._regions_for(images, regions)
        method, rows = self._method_for(graph, images, regions)
        with progress_bar(rows, f"EVA full CROWN, {len(images)} images") if rows else nullcontext():
            return eva_maps(graph, images, targets, regions, eps=self.eps, method=method,
                            input_range=self.input_range, batch_size=self.batch_size, crown_classes=self.crown_classes,
                            relaxation=self.relaxation, lipschitz_boxes=self.lipschitz_boxes,
                            row_budget=self.row_budget, tight_boxes=self.tight_boxes)

    def _method_for(self, graph: BoundGraph, images: Tensor, regions: Tensor) -> tuple[str, int]:
        """The bound to run and, for a long full CROWN, its estimated rows (for the progress bar; else 0).

        Full CROWN's cost is estimated first (:func:`explain.bounds.cost.estimate_full_crown`, one interval pass
        and a probe row per layer). ``auto`` takes full CROWN within :data:`AUTO_BUDGET_SECONDS` per image,
        else CROWN-IBP, and logs the choice; an explicit ``crown`` above :data:`LONG_BOUND_SECONDS` logs its
        estimate and the cheaper options."""
        if self.bound not in ("auto", "crown", "alpha-crown", "best"):
            self.last_bound = self.bound
            return self.bound, 0
        lower, upper = ball_box(images, None, self.eps, self.input_range)
        estimate = estimate_full_crown(graph, lower, upper, self.tight_boxes)
        self.last_estimate = estimate
        boxes = 1 if self.relaxation == "shared" and self.bound != "alpha-crown" else int(regions[0].unique().numel()) + 1
        per_image = estimate.seconds * boxes / len(images)
        cheaper = ("bound='crown-ibp' (interval intermediate boxes: fast, much looser on networks not trained for "
                   "it), a smaller eps, or fewer classes with crown_classes=m")
        if self.bound == "auto":
            method = "crown" if per_image <= AUTO_BUDGET_SECONDS else "crown-ibp"
            if method == "crown-ibp":
                logger.warning("EVA bound='auto': %s (x%d boxes), above the %.0f s budget: using bound='crown-ibp'. "
                               "Pass bound='crown' to run full CROWN anyway.", estimate.describe(len(images)), boxes,
                               AUTO_BUDGET_SECONDS)
        else:
            method = self.bound
            if per_image > LONG_BOUND_SECONDS:
                logger.warning("EVA: %s (x%d boxes). Cheaper: %s.", estimate.describe(len(images)), boxes, cheaper)
        long = method != "crown-ibp" and per_image > LONG_BOUND_SECONDS
        self.last_bound = method
        return method, estimate.rows * boxes if long else 0

    def __repr__(self) -> str:
        return (f"EVA(model={type(self.model).__name__}, eps={self.eps:.4g}, grid_size={self.grid_size}, "
                f"bound={self.bound!r}, relaxation={self.relaxation!r}, batch_size={self.batch_size})")
