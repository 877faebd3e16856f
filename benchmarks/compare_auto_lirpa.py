"""Our margin bounds against auto_LiRPA's on the same network, images and boxes (issue 12's reference).

The network is ``bench_eva.py``'s ``relu_cnn`` (4 conv + linear, plain ReLU, 32 px, 4 classes), trained the same
way (seed 0, ``--train-steps`` Adam steps on ``ShortcutShapesDataModule``); its weights and the images go to
``--weights`` (reused when the file exists). For every eps the script bounds ``max_{c != y} f_c - f_y`` over the
L-inf box ``[x - eps, x + eps]`` (unclamped, as ``bench_eva.py``) with our ``margin_upper_bounds`` (``ibp``,
``crown-ibp``, ``crown``, ``alpha-crown``) and with auto_LiRPA's ``compute_bounds`` on the same margin
specification ``C`` (``IBP``, ``CROWN-IBP``, ``CROWN``, ``CROWN-Optimized`` = alpha-CROWN), one image at a time,
and prints per method the mean gap to PGD (the largest margin a 8-restart, 40-step attack finds: a lower bound of
the true value), wall and CPU seconds per image, and the ratio of the gaps ours / auto_LiRPA. ``exact`` is the
largest difference of the per-class bounds with our Lipschitz boxes off (then both compute the same
relaxation, so it is round-off).

auto_LiRPA is not a dependency of the project. To run this script, put a copy on the path: its newest snapshot
(``git archive HEAD auto_LiRPA | tar x -C DIR`` from a clone of Verified-Intelligence/auto_LiRPA) plus two
small packages it imports (``pip install --target DIR_DEPS appdirs graphviz``), then::

    PYTHONPATH=$PWD python benchmarks/compare_auto_lirpa.py --lirpa-path DIR DIR_DEPS [--images 8] [--eps 1 4]
        [--train-steps 400] [--weights /tmp/relu_cnn.pt] [--fixture tests/explain/data/auto_lirpa_reference.json]

``--fixture`` also writes the small reference file of ``tests/explain/test_bounds_reference.py``: a tiny ReLU CNN
(seeded random weights) and auto_LiRPA's IBP / CROWN-IBP / CROWN / CROWN-Optimized margin bounds on a few boxes,
each bounded on its own, so that CI (without auto_LiRPA) checks our bounds against auto_LiRPA's numbers;
``--fixture-blocks`` and ``--fixture-pool`` write the same for EfficientNet-Lite operators and for max pooling.

``--pool-cnn`` instead runs issue 21's max-pooling CNN (``bench_eva.pool_cnn``, trained ``--pool-steps``) at
``--pool-eps`` (0.05): full CROWN by us (auto_LiRPA's intermediate boxes, the default), by auto_LiRPA (patches mode)
and by us with ``tight_boxes=True``, alternating in one process, and prints the time ratio ours / auto_LiRPA and the
largest bound difference::

    PYTHONPATH=$PWD python benchmarks/compare_auto_lirpa.py --lirpa-path DIR DIR_DEPS --pool-cnn --images 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
from torch import Tensor, nn

from benchmarks.bench_eva import pgd, relu_cnn, train, trained_pool_cnn
from datamodules.shortcut import ShortcutShapesDataModule
from explain.bounds import METHODS, build_graph, margin_spec, margin_upper_bounds

#: our method -> auto_LiRPA's ``compute_bounds(method=...)`` of the same algorithm
PAIRS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}


def trained_network(path: str, steps: int, count: int) -> tuple[nn.Module, Tensor, Tensor]:
    """``relu_cnn(4)`` trained as in ``bench_eva.py`` and ``count`` val images with labels, from ``path`` when it
    exists, else trained and saved there."""
    model = relu_cnn(4)
    if os.path.exists(path):
        saved = torch.load(path)
        model.load_state_dict(saved["state_dict"])
        print(f"loaded relu_cnn weights and images from {path} ({saved['note']})")
        return model.eval(), saved["images"][:count], saved["labels"][:count]
    data = ShortcutShapesDataModule(num_classes=4, image_size=32, train_size=2000, val_size=200, batch_size=64)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    torch.manual_seed(0)  # as bench_eva.py's tightness(): the data, the seed, the network, the training
    model = relu_cnn(4)
    accuracy = train(model, data, 0.0, lipschitz=False, steps=steps)
    note = f"trained {steps} steps, seed 0, val accuracy {accuracy:.2f}"
    torch.save({"state_dict": model.state_dict(), "images": batch["image"], "labels": batch["label"], "note": note},
               path)
    print(f"relu_cnn {note}; weights and images saved to {path}")
    return model.eval(), batch["image"][:count], batch["label"][:count]


class AutoLirpa:
    """auto_LiRPA's bounds of the margin specification on a network (one ``BoundedModule``)."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], alpha_iterations: int, num_classes: int = 4,
                 conv_mode: str = "patches") -> None:
        from auto_LiRPA import BoundedModule

        # conv_mode "patches" is auto_LiRPA's default: stated, since the speed comparison is against it
        self.module = BoundedModule(model, torch.zeros(1, *shape), device="cpu", verbose=False,
                                    bound_opts={"conv_mode": conv_mode})
        self.module.set_bound_opts({"optimize_bound_args": {"iteration": alpha_iterations}, "verbosity": 0})
        self.num_classes = num_classes

    def upper(self, lower: Tensor, upper: Tensor, targets: Tensor, method: str) -> Tensor:
        """Upper bounds [n, K-1] of ``f_c - f_y`` over ``[lower, upper]`` by auto_LiRPA's ``method``, one box per
        call: in a batch auto_LiRPA bounds by CROWN the neurons unstable in any of its boxes (``get_sparse_C``
        takes the union), so the bound of a box depends on the others (by up to 7e-5 on the fixtures at eps 0.1)."""
        if len(targets) > 1:
            return torch.cat([self.upper(lower[i : i + 1], upper[i : i + 1], targets[i : i + 1], method)
                              for i in range(len(targets))])
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        x = BoundedTensor((lower + upper) / 2, PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper))
        # auto_LiRPA's usual form: the lower bound of the robustness margins f_y - f_c (its alpha-CROWN optimises
        # lower bounds), so max f_c - f_y = -min f_y - f_c
        spec = -margin_spec(targets, self.num_classes)
        with torch.enable_grad() if method == "CROWN-Optimized" else torch.no_grad():  # the slopes need gradients
            bound, _ = self.module.compute_bounds(x=(x,), C=spec, method=method, bound_upper=False)
        bound = -bound
        return bound.detach()


def timed_bounds(fn, images: Tensor, labels: Tensor, eps: float) -> tuple[Tensor, float, float]:
    """Per-class bounds [n, K-1] of every image's box, one image at a time; wall and CPU seconds per image."""
    start, cpu = time.perf_counter(), time.process_time()
    bounds = torch.cat([fn(x[None] - eps, x[None] + eps, y[None]) for x, y in zip(images, labels)])
    return bounds, (time.perf_counter() - start) / len(images), (time.process_time() - cpu) / len(images)


def compare(args: argparse.Namespace) -> None:
    model, images, labels = trained_network(args.weights, args.train_steps, args.images)
    graph = build_graph(model)
    lirpa = AutoLirpa(model, tuple(images.shape[1:]), args.alpha_iterations)
    pairs = dict(PAIRS) if args.lirpa_alpha else {**PAIRS, "alpha-crown": "CROWN"}
    ours_methods = [m for m in pairs if m in METHODS]
    print(f"{len(images)} images, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    for eps in [e / 255 for e in args.eps]:
        attack = pgd(model, images, labels, eps)
        print(f"eps={eps * 255:g}/255: PGD mean {attack.mean():.4f}; mean gap (bound - PGD), "
              "wall s/image, CPU s/image")
        for method in ours_methods:
            ours, ours_wall, ours_cpu = timed_bounds(
                lambda lo, hi, y: margin_upper_bounds(graph, lo, hi, y, method), images, labels, eps)
            theirs, their_wall, their_cpu = timed_bounds(
                lambda lo, hi, y: lirpa.upper(lo, hi, y, pairs[method]), images, labels, eps)
            plain = torch.cat([margin_upper_bounds(graph, x[None] - eps, x[None] + eps, y[None], method,
                                                   lipschitz_boxes=False) for x, y in zip(images, labels)])
            for name, bound in (("ours", ours), ("auto_LiRPA", theirs)):
                assert (bound.amax(1) >= attack - 1e-4).all(), f"{name} {method} bound below PGD"
            gap_ours = (ours.amax(1) - attack).mean().item()
            gap_theirs = (theirs.amax(1) - attack).mean().item()
            exact = (plain - theirs).abs().max().item()
            print(f"  {method:11s} ours {gap_ours:9.4g} ({ours_wall:6.2f} s, {ours_cpu:6.2f} cpu-s)   "
                  f"auto_LiRPA {pairs[method]:15s} {gap_theirs:9.4g} ({their_wall:6.2f} s, {their_cpu:6.2f} cpu-s)"
                  f"   ratio {gap_ours / gap_theirs:6.3f}   max|diff| {exact:.2g}")


def speed_pool_cnn(args: argparse.Namespace) -> None:
    """Full CROWN on issue 21's CNN (``bench_eva.pool_cnn`` trained ``--pool-steps`` Adam steps on 3-class shortcut
    data, seed 0) at ``--pool-eps``, one image at a time: ours (auto_LiRPA's intermediate boxes, the default; rows as
    patches; no Lipschitz boxes, which auto_LiRPA has not), auto_LiRPA's CROWN (``conv_mode="patches"``) and ours
    with ``tight_boxes=True``, the three alternating (one warm-up each, then ``--rounds`` rounds over the images, the
    order rotating per image). Prints seconds per image (wall and CPU), the ratio ours / auto_LiRPA, the largest
    ``|ours - theirs|`` (absolute, and relative to the largest bound) and the range of ``tight - theirs``."""
    model, images, labels, note = trained_pool_cnn(args.pool_steps, args.images, args.pool_weights)
    graph = build_graph(model)
    lirpa = AutoLirpa(model, tuple(images.shape[1:]), args.alpha_iterations, num_classes=3)
    eps = args.pool_eps
    sides = {
        "auto_LiRPA": lambda lo, hi, y: lirpa.upper(lo, hi, y, "CROWN"),
        "ours": lambda lo, hi, y: margin_upper_bounds(graph, lo, hi, y, "crown", lipschitz_boxes=False),
        "ours, tight_boxes": lambda lo, hi, y: margin_upper_bounds(graph, lo, hi, y, "crown", lipschitz_boxes=False,
                                                                   tight_boxes=True),
    }
    print(f"{note}; {len(images)} images x {args.rounds} rounds, eps {eps}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    wall, cpu = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0.0)
    bounds: dict[str, list[Tensor]] = {name: [] for name in sides}
    names = list(sides)
    with torch.no_grad():
        for fn in sides.values():  # warm-up
            fn(images[:1] - eps, images[:1] + eps, labels[:1])
        for round_ in range(args.rounds):
            for index, (x, y) in enumerate(zip(images, labels)):
                lower, upper, y = x[None] - eps, x[None] + eps, y[None]
                shift = (index + round_) % len(names)
                for name in names[shift:] + names[:shift]:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    bound = sides[name](lower, upper, y)
                    wall[name] += time.perf_counter() - start
                    cpu[name] += time.process_time() - start_cpu
                    if round_ == 0:
                        bounds[name].append(bound)
    runs = len(images) * args.rounds
    theirs = torch.cat(bounds["auto_LiRPA"])
    for name in names:
        line = f"  {name:18s} {wall[name] / runs:7.3f} s/image ({cpu[name] / runs:7.3f} CPU-s)"
        if name != "auto_LiRPA":
            diff = torch.cat(bounds[name]) - theirs
            line += (f"   ratio to auto_LiRPA {wall[name] / wall['auto_LiRPA']:.3f} wall, "
                     f"{cpu[name] / cpu['auto_LiRPA']:.3f} CPU;   {name} - auto_LiRPA in [{diff.min():.3g}, "
                     f"{diff.max():.3g}], max |diff| / max |bound| = {diff.abs().max() / theirs.abs().max():.2g}")
        print(line)
    print(f"  (bounds up to {theirs.abs().max():.3g}; load average {os.getloadavg()[0]:.2f})")


def tiny_network() -> nn.Sequential:
    """The fixture's network: 3 conv + linear on 3x8x8, seeded random weights rounded to 3 decimals (the JSON
    file then holds them exactly in a few KB)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 4),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.mul(1000).round().div(1000))
    return model.eval()


def blocks_network() -> nn.Sequential:
    """The second fixture's network: EfficientNet-Lite operators auto_LiRPA also bounds (TF "same" padding,
    BatchNorm, depthwise convolution, a residual sum, global average pooling; ReLU, not ReLU6, whose relaxation
    differs), seeded random weights and statistics rounded to 3 decimals."""
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.models._efficientnet_blocks import InvertedResidual

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dSame(3, 4, 3, stride=2), BatchNormAct2d(4, act_layer=nn.ReLU),
        InvertedResidual(4, 4, exp_ratio=2.0, act_layer=nn.ReLU), nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                tensor.normal_(0, 0.2)
            if tensor.is_floating_point():
                tensor.copy_(tensor.mul(1000).round().div(1000))
    return model.eval()


def pool_network() -> nn.Sequential:
    """The third fixture's network: max pooling after a ReLU (its input box is the ReLU's box in auto_LiRPA) and
    after a convolution (every entry bounded by CROWN), as issue 21's CNN on 3x8x8; seeded random weights rounded
    to 3 decimals."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.MaxPool2d(2),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 4),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.mul(1000).round().div(1000))
    return model.eval()


def static_padding_twin(model: nn.Sequential, size: int) -> nn.Sequential:
    """``model`` with each timm ``Conv2dSame`` (padding computed from the input size, which auto_LiRPA cannot
    trace) replaced by the same zero padding for inputs of ``size`` px and a plain convolution with its weights."""
    from timm.layers import Conv2dSame

    from explain.bounds.linear import Conv2d as ConvNode

    layers = []
    for layer in model:
        if type(layer) is Conv2dSame:
            pads = ConvNode(layer, layer.weight, layer.bias, "", same=True).same_pads((size, size))
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, 0,
                              layer.dilation, layer.groups, layer.bias is not None)
            plain.load_state_dict(layer.state_dict())
            layers.append(nn.Sequential(nn.ZeroPad2d(pads), plain))
            size = (size + pads[2] + pads[3] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
        else:
            layers.append(layer)
    return nn.Sequential(*layers).eval()


def write_fixture(path: str, alpha_iterations: int, model: nn.Module | None = None, conv_mode: str = "matrix",
                  methods: tuple[str, ...] = tuple(PAIRS.values()),
                  radii: tuple[float, ...] = (0.02, 0.05, 0.1)) -> None:
    """auto_LiRPA's bounds of the tiny network (or ``model``) on 3 boxes at ``radii`` by ``methods``, with the
    weights, as JSON."""
    model = tiny_network() if model is None else model
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 8, 8, generator=generator).mul(100).round().div(100)
    labels = torch.tensor([0, 2, 3])
    # matrix mode by default: in patches mode auto_LiRPA 0.7.1 fails on a grouped convolution after a BatchNorm
    # (a shape error); the bounds do not depend on the mode
    lirpa = AutoLirpa(static_padding_twin(model, 8), (3, 8, 8), alpha_iterations, conv_mode=conv_mode)
    radii = list(radii)
    bounds = {
        method: [_rounded(lirpa.upper(images - eps, images + eps, labels, method), 6) for eps in radii]
        for method in methods
    }
    fixture = {
        "note": "written by benchmarks/compare_auto_lirpa.py --fixture from auto_LiRPA "
                f"{sys.modules['auto_LiRPA'].__version__}: upper bounds [box, class c != y] of f_c - f_y, each box "
                "bounded on its own",
        "state_dict": {name: _rounded(value, 3) for name, value in model.state_dict().items()},
        "images": _rounded(images, 2),
        "labels": labels.tolist(),
        "radii": radii,
        "alpha_iterations": alpha_iterations,
        "bounds": bounds,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as file:
        json.dump(fixture, file, separators=(",", ":"))
    print(f"fixture written to {path} ({os.path.getsize(path)} bytes)")


def _rounded(values: Tensor, decimals: int) -> list:
    """Nested lists of ``values`` rounded to ``decimals`` (short JSON)."""
    return values.double().mul(10**decimals).round().div(10**decimals).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lirpa-path", nargs="*", default=[], help="folders put first on sys.path (auto_LiRPA)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--eps", type=float, nargs="*", default=[1, 4], help="radii, in 1/255")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--weights", default="/tmp/relu_cnn_compare_auto_lirpa.pt")
    parser.add_argument("--alpha-iterations", type=int, default=20, help="auto_LiRPA's CROWN-Optimized steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lirpa-alpha", action="store_true",
                        help="compare alpha-crown with auto_LiRPA's CROWN-Optimized (else with its CROWN)")
    parser.add_argument("--fixture", default=None, help="also write the test fixture there")
    parser.add_argument("--fixture-blocks", default=None,
                        help="also write the fixture of blocks_network() there (EfficientNet-Lite operators)")
    parser.add_argument("--fixture-pool", default=None,
                        help="also write the fixture of pool_network() there (max pooling, auto_LiRPA's patches mode)")
    parser.add_argument("--skip-compare", action="store_true", help="only write the fixture")
    parser.add_argument("--pool-cnn", action="store_true",
                        help="instead: full CROWN on issue 21's max-pooling CNN, ours vs auto_LiRPA (patches): time "
                             "ratio and bound difference")
    parser.add_argument("--pool-eps", type=float, default=0.05, help="radius of --pool-cnn (input units)")
    parser.add_argument("--pool-steps", type=int, default=300, help="training steps of --pool-cnn's network")
    parser.add_argument("--pool-weights", default="/tmp/pool_cnn_bench_eva.pt",
                        help="where --pool-cnn keeps its trained network (shared with bench_eva.py --pool-cnn)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the images of --pool-cnn")
    args = parser.parse_args()
    sys.path[:0] = args.lirpa_path
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        import auto_LiRPA  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"auto_LiRPA is not importable ({error}); see this script's docstring") from error
    if args.fixture:  # at 0.2 more than 90% of a layer is unstable: auto_LiRPA bounds all its neurons by CROWN
        write_fixture(args.fixture, args.alpha_iterations, radii=(0.02, 0.05, 0.1, 0.2))
    if args.fixture_blocks:
        write_fixture(args.fixture_blocks, args.alpha_iterations, blocks_network())
    if args.fixture_pool:
        # auto_LiRPA 0.7.1's CROWN-Optimized fails on it (an assertion on its ReLU slopes after max pooling)
        write_fixture(args.fixture_pool, args.alpha_iterations, pool_network(), conv_mode="patches",
                      methods=("IBP", "CROWN-IBP", "CROWN"))
    if args.pool_cnn:
        speed_pool_cnn(args)
    elif not args.skip_compare:
        compare(args)


if __name__ == "__main__":
    main()
