"""EVA speed, bound tightness and faithfulness, measured side by side in one process.

(a) Speed: time per image of EVA (full CROWN, 8x8 grid, default eps: one shared relaxation per image, 65 region
    bounds from it) over the time per image of Sobol at its defaults (grid 8, N 32: 2080 forward rows per
    image), both on the default 1-Lipschitz CNN (``align.models.lip_vgg``, ``--classes`` outputs, exported to
    plain layers with ``export_plain`` as both run at inference; EVA exports a deel-torchlip model itself) at
    32x32. One warm-up call each, then the median of ``--repeats`` interleaved rounds. Target: ratio <= 0.5.
    Also shown: EVA with CROWN-IBP (the cheap method), with one full-CROWN propagation per (image, region) box
    (``relaxation="per_box"``) and with IBP, and Sobol on the unexported deel-torchlip model.
(b) Tightness: the adversarial-overlap upper bound over the full L-inf ball by every method (IBP, CROWN-IBP,
    full CROWN, alpha-CROWN, the Lipschitz certificate on 1-Lipschitz networks, best) against the largest
    margin PGD finds in the same ball (a lower bound of the true value): the gap ``bound - PGD`` (mean over
    ``--images`` val images) and the seconds per image, at eps = 1/255, 4/255 and 8/255. Models, each trained for
    ``--train-seconds`` on ``datamodules.ShortcutShapesDataModule`` (4 classes, 32 px), none for certification:
    ``relu_cnn`` (4 conv + linear, plain ReLU: the issue's network kind), ``bn_cnn`` (``small_cnn``: BatchNorm,
    max pooling), ``lip_vgg`` and ``lip_resnet`` (1-Lipschitz, via ``export_plain``). Every bound is checked
    to be >= PGD.
(c) Faithfulness on a shortcut: ``relu_cnn`` trained for ``--train-seconds`` on shortcut data where the
    watermark always names the class and nothing is augmented (``shortcut_prob=1, augment=False``: the model
    reads the watermark, see its accuracy on the ``flipped`` split). On ``--images`` val images: the rank of the
    watermark cell among the 64 grid cells by mean map value (1 = most important; a faithful map puts it
    first), the Deletion AUC with the mean colour as baseline (lower is better), and Spearman with the human map
    (the object: high means "looks at the object", which this model does not do), for EVA with full CROWN
    (shared relaxation and per box) and CROWN-IBP, against Saliency, Sobol and a random map.

(d) A real network (``--real efficientnet_lite0``: ImageNet weights, 224 px; ``--real resnet18``: for a GPU): the
    estimate of full CROWN's cost, the time of EVA with ``bound="auto"`` per image, and its overlap bound against PGD.
(e) ``--pool-cnn``: EVA's time per image at its defaults on issue 21's max-pooling CNN (``pool_cnn``, trained
    ``--train-steps``, default 300), eps ``--pool-eps`` (0.05), 8x8 grid (target <= 2 s per image on 2 cores).

    python benchmarks/bench_eva.py [--images 8] [--repeats 3] [--classes 10] [--threads N] [--train-seconds 60 | --train-steps N]
        [--skip a b c] [--models relu_cnn bn_cnn lip_vgg lip_resnet] [--eps 1 4 8]
    python benchmarks/bench_eva.py --real efficientnet_lite0 --images 2 --threads 2      # (d) only
    python benchmarks/bench_eva.py --pool-cnn --images 24 --threads 2                      # (e) only

On a GPU (the lead's runs) pass ``--device cuda``: the models, images and bounds move there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from deel import torchlip
from torch import Tensor, nn

import torch.nn.functional as F

from align.models import export_plain, lip_resnet, lip_vgg, small_cnn
from datamodules.shortcut import ShortcutShapesDataModule
from explain import EVA, Saliency, Sobol
from explain.attributions.eva import DEFAULT_EPS
from explain.bounds import build_graph, margin_upper_bounds
from explain.metrics.functional.alignment import per_image_spearman
from explain.metrics.functional.fidelity import auc, deletion_curve


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function: one warm-up call each, then interleaved rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def max_margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    others = logits.scatter(1, y[:, None], -float("inf"))
    return others.amax(1) - logits.gather(1, y[:, None])[:, 0]


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, restarts: int = 8, steps: int = 40) -> Tensor:
    """Largest ``max_{c != y} f_c - f_y`` found in the L-inf ball by sign-gradient ascent (random starts)."""
    best = torch.full((len(x),), -float("inf"), device=x.device)
    for restart in range(restarts):
        delta = torch.zeros_like(x) if restart == 0 else (torch.rand_like(x) * 2 - 1) * eps
        for step in range(steps):
            delta.requires_grad_(True)
            value = max_margin(model, x + delta, y)
            best = torch.maximum(best, value.detach())
            (grad,) = torch.autograd.grad(value.sum(), delta)
            delta = (delta.detach() + eps / 4 * 0.93**step * grad.sign()).clamp(-eps, eps)
        with torch.no_grad():
            best = torch.maximum(best, max_margin(model, x + delta, y))
    return best


def train(model: nn.Module, data: ShortcutShapesDataModule, seconds: float, lipschitz: bool,
          steps: int | None = None) -> float:
    """Fit ``model`` for ``steps`` optimizer steps if given, else ``seconds`` (Adam; tau-cross-entropy for the
    Lipschitz net); returns val accuracy."""
    loss_fn = torchlip.TauCrossEntropyLoss(tau=16.0) if lipschitz else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3 if lipschitz else 1e-3)
    model.train()
    start, done = time.perf_counter(), 0
    finished = lambda: done >= steps if steps is not None else time.perf_counter() - start >= seconds  # noqa: E731
    while not finished():
        for batch in data.train_dataloader():
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if finished():
                break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            correct += (model(batch["image"]).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    return correct / total


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = lip_vgg(args.classes).eval()
    plain = export_plain(model)
    images = torch.rand(args.images, 3, 32, 32)
    targets = torch.randint(0, args.classes, (args.images,))
    eva, eva_ibp, eva_cheap = EVA(plain, bound="crown"), EVA(plain, bound="ibp"), EVA(plain, bound="crown-ibp")
    eva_per_box = EVA(plain, bound="crown", relaxation="per_box")
    sobol = Sobol(plain)
    sobol_lip = Sobol(model)
    times = median_times(
        {
            "eva_crown": lambda: eva(images, targets),
            "eva_crown_ibp": lambda: eva_cheap(images, targets),
            "eva_per_box": lambda: eva_per_box(images, targets),
            "eva_ibp": lambda: eva_ibp(images, targets),
            "sobol": lambda: sobol(images, targets),
            "sobol_torchlip": lambda: sobol_lip(images, targets),
        },
        args.repeats,
    )
    per_image = {name: value / args.images for name, value in times.items()}
    print(f"(a) speed, lip_vgg({args.classes}) at 32x32, {args.images} images, {torch.get_num_threads()} threads")
    print(f"    EVA crown (8x8 grid, eps={DEFAULT_EPS:.4f}, shared relaxation): {per_image['eva_crown']:.3f} s/image")
    print(f"    EVA crown-ibp (shared relaxation)         : {per_image['eva_crown_ibp']:.3f} s/image")
    print(f"    EVA crown, one propagation per box        : {per_image['eva_per_box']:.3f} s/image")
    print(f"    EVA ibp (per box)                         : {per_image['eva_ibp']:.3f} s/image")
    print(f"    Sobol (grid 8, N 32, 2080 rows/image)     : {per_image['sobol']:.3f} s/image")
    print(f"    Sobol on the unexported torchlip model    : {per_image['sobol_torchlip']:.3f} s/image")
    ratio = per_image["eva_crown"] / per_image["sobol"]
    print(f"    ratio EVA(crown) / Sobol = {ratio:.3f}   (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    print(f"    ratio EVA(ibp)   / Sobol = {per_image['eva_ibp'] / per_image['sobol']:.3f}")


def relu_cnn(num_classes: int = 4) -> nn.Sequential:
    """A plain ReLU CNN, 4 conv + linear at 32 px (auto_LiRPA's ``cnn_4layer`` kind)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, num_classes),
    )


def pool_cnn(num_classes: int = 3) -> nn.Sequential:
    """Issue 21's CNN at 32 px: conv 3->16, ReLU, max-pool, conv 16->32, ReLU, max-pool, linear 2048->64, ReLU,
    linear 64->classes."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def trained_pool_cnn(steps: int, count: int, path: str | None = None) -> tuple[nn.Module, Tensor, Tensor, str]:
    """``pool_cnn(3)`` trained ``steps`` Adam steps on 3-class shortcut data (seed 0) and ``count`` val images with
    their labels (at most 64), read from ``path`` when it holds that training, else trained (and saved there)."""
    if path and os.path.exists(path):
        saved = torch.load(path)
        if saved["steps"] == steps:
            model = pool_cnn(3)
            model.load_state_dict(saved["state_dict"])
            return model.eval(), saved["images"][:count], saved["labels"][:count], saved["note"]
    data = ShortcutShapesDataModule(num_classes=3, image_size=32, train_size=2000, val_size=200, batch_size=64)
    data.setup("fit")
    torch.manual_seed(0)
    model = pool_cnn(3)
    accuracy = train(model, data, 0.0, lipschitz=False, steps=steps)
    batch = next(iter(data.val_dataloader()))
    note = f"pool_cnn trained {steps} steps (seed 0, val accuracy {accuracy:.2f})"
    if path:
        torch.save({"state_dict": model.state_dict(), "images": batch["image"], "labels": batch["label"],
                    "steps": steps, "note": note}, path)
    return model.eval(), batch["image"][:count], batch["label"][:count], note


def pool_eva(args: argparse.Namespace) -> None:
    """(e) EVA at its defaults on issue 21's CNN (:func:`pool_cnn`, ``--train-steps`` steps, default 300), eps
    ``--pool-eps``: ``EVA(model, grid_size=8, eps)`` per image (one warm-up call, then ``--images`` images one at a
    time), wall and CPU seconds, also with ``lipschitz_boxes=False``; and the maps of the two agree."""
    model, images, labels, note = trained_pool_cnn(args.train_steps or 300, args.images, args.pool_weights)
    eps = args.pool_eps
    print(f"(e) EVA on {note}, eps {eps}, 8x8 grid, {len(images)} images, {torch.get_num_threads()} threads")
    for options in ({}, {"lipschitz_boxes": False}):
        explainer = EVA(model, eps=eps, grid_size=8, **options)
        explainer(images[:1], labels[:1])  # warm-up (the bound graph, the Lipschitz constants)
        start, cpu = time.perf_counter(), time.process_time()
        for x, y in zip(images, labels):
            explainer(x[None], y[None])
        wall, cpu = (time.perf_counter() - start) / len(images), (time.process_time() - cpu) / len(images)
        print(f"  EVA({', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}): {wall:.3f} s per image, "
              f"{cpu:.3f} CPU-s per image; bound {explainer.last_bound!r}")


MODELS = {
    "relu_cnn": (relu_cnn, False),
    "bn_cnn": (lambda k: small_cnn(k, widths=(8, 16, 32), depth=1), False),
    "lip_vgg": (lip_vgg, True),
    "lip_resnet": (lip_resnet, True),
}


def tightness(args: argparse.Namespace) -> None:
    data = ShortcutShapesDataModule(num_classes=4, image_size=32, train_size=2000, val_size=200, batch_size=64)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    images, labels = batch["image"][: args.images].to(args.device), batch["label"][: args.images].to(args.device)
    print(f"(b) tightness: mean over {len(images)} val images of (bound - PGD); PGD = largest margin found; "
          f"wall and CPU (all threads: independent of other load) s/image of each bound; "
          f"{torch.get_num_threads()} threads, {args.device}")
    for name in args.models:
        builder, lipschitz = MODELS[name]
        torch.manual_seed(0)
        model = builder(4)
        accuracy = train(model, data, args.train_seconds, lipschitz, args.train_steps)
        model = (export_plain(model) if lipschitz else model.eval()).to(args.device)
        with torch.no_grad():
            clean = max_margin(model, images, labels)
        print(f"    {name}: trained {_training(args)}, val accuracy {accuracy:.2f}, "
              f"mean clean margin max_c f_c - f_y = {clean.mean():.4f}")
        methods = ["ibp", "crown-ibp", "crown", "alpha-crown"] + (["lipschitz", "best"] if lipschitz else ["best"])
        graph = build_graph(model)  # built once, its Lipschitz constants computed by a warm-up call (not timed)
        margin_upper_bounds(graph, images[:1], images[:1], labels[:1], "ibp")
        for eps in [e / 255 for e in args.eps]:
            attack = pgd(model, images, labels, eps)
            cells = []
            for method in methods:
                start, cpu = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    bound = torch.cat([
                        margin_upper_bounds(graph, x - eps, x + eps, y, method).amax(1)
                        for x, y in zip(images.split(4), labels.split(4))
                    ])
                seconds = (time.perf_counter() - start) / len(images)
                cpu = (time.process_time() - cpu) / len(images)
                assert (attack <= bound + 1e-4).all(), f"unsound {method} bound on {name}"
                cells.append(f"{method} {(bound - attack).mean().item():.4g} ({seconds:.2f} s, {cpu:.2f} cpu-s)")
            print(f"      eps={eps * 255:.0f}/255: PGD {attack.mean():.4f}; gap (wall s/image, CPU s/image): "
                  f"{', '.join(cells)}")


def watermark_rank(maps: Tensor, watermark: Tensor, grid: int = 8) -> Tensor:
    """Rank (1 = first) of the grid cell that holds the watermark among the ``grid^2`` cells, by mean map."""
    cells = F.adaptive_avg_pool2d(maps[:, None], grid).flatten(1)
    mark = F.adaptive_avg_pool2d(watermark[None, None].float(), grid).flatten().argmax()
    return 1 + (cells > cells[:, mark : mark + 1]).sum(1)


def faithfulness(args: argparse.Namespace) -> None:
    data = ShortcutShapesDataModule(shortcut_prob=1.0, augment=False, train_size=2000, val_size=200, batch_size=64)
    data.setup("fit")
    torch.manual_seed(0)
    model = relu_cnn(data.num_classes)
    train(model, data, args.train_seconds, lipschitz=False, steps=args.train_steps)
    flipped = data.test_dataloader()[1]
    with torch.no_grad():
        hits = [(model(b["image"]).argmax(1) == b["label"]).float() for b in flipped]
    batch = next(iter(data.val_dataloader()))
    count = args.images
    model = model.to(args.device)
    images, labels, human = (batch[key][:count].to(args.device) for key in ("image", "label", "heatmap"))
    print(f"(c) faithfulness: relu_cnn trained {_training(args)} on watermark-coded classes, accuracy on "
          f"the flipped split {torch.cat(hits).mean():.2f} (low: it reads the watermark); {count} val images")
    explainers = {
        "Saliency": Saliency(model),
        "Sobol": Sobol(model),
        "EVA crown (shared)": EVA(model, eps=1 / 255),
        "EVA crown (per box)": EVA(model, eps=1 / 255, relaxation="per_box"),
        "EVA crown-ibp (shared)": EVA(model, eps=1 / 255, bound="crown-ibp"),
        "EVA crown-ibp (per box)": EVA(model, eps=1 / 255, bound="crown-ibp", relaxation="per_box"),
        "random": lambda x, y: torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0)).to(x),
    }
    print(f"    {'map':24s} {'s/image':>8s} {'watermark rank':>15s} {'deletion AUC':>13s} {'spearman':>9s}")
    for name, explainer in explainers.items():
        start = time.perf_counter()
        maps = explainer(images, labels)
        seconds = (time.perf_counter() - start) / count
        rank = watermark_rank(maps, data.watermark_mask().to(maps.device)).float().mean()
        mean_colour = images.mean((2, 3), keepdim=True)
        deletion = auc(deletion_curve(model, images, labels, maps, steps=16, baseline=mean_colour))
        rho = per_image_spearman(maps, human).mean()
        print(f"    {name:24s} {seconds:8.3f} {rank:15.1f} {deletion.mean():13.3f} {rho:9.3f}")


def _training(args: argparse.Namespace) -> str:
    return f"{args.train_steps} steps" if args.train_steps is not None else f"{args.train_seconds:.0f}s"


def real_network(args: argparse.Namespace) -> None:
    """(d) EVA on a real ImageNet network at 224 px: ``tf_efficientnet_lite0`` with its ImageNet weights
    (``explain.networks.efficientnet_lite0``), or torchvision's ResNet-18 (random weights, no download) with
    ``--real resnet18`` (meant for a GPU: ``--device cuda``). Per photo: the estimate of full CROWN's cost, the time
    of ``EVA(bound="auto", grid_size=8, crown_classes=--crown-classes)`` at eps ``--real-eps``/255 of the pixel
    range, which bound ``auto`` took, and the overlap bound of the full ball by that method against PGD."""
    from explain.attributions.eva import AUTO_BUDGET_SECONDS, adversarial_overlap_bound
    from explain.networks import efficientnet_lite0, efficientnet_lite0_transform, sample_photos

    device = torch.device(args.device)
    if args.real == "resnet18":
        import torchvision

        model = torchvision.models.resnet18().eval()
        scale = 1 / 0.226  # ImageNet normalisation: 1/255 of the pixel range is about 4.4/255 in input units
    else:
        model = efficientnet_lite0()
        scale = 2.0  # its input is (pixel - 0.5) / 0.5
    model = model.to(device)
    transform = efficientnet_lite0_transform(224)
    photos = list(sample_photos().items())[: args.images]
    images = torch.stack([transform(photo) for _, photo in photos]).to(device)
    with torch.no_grad():
        labels = model(images).argmax(1)
    eps = args.real_eps / 255 * scale
    graph = build_graph(model)
    print(f"(d) {args.real} at 224 px, eps {args.real_eps}/255 of the pixel range ({eps:.4f} in input units), "
          f"8x8 grid, crown_classes {args.crown_classes}, device {device}, {torch.get_num_threads()} threads")
    for (name, _), x, y in zip(photos, images, labels):
        x, y = x[None], y[None]
        explainer = EVA(model, eps=eps, grid_size=8, crown_classes=args.crown_classes, batch_size=1)
        start = time.perf_counter()
        maps = explainer(x, y)  # the estimate included
        eva_time = time.perf_counter() - start
        estimate, method = explainer.last_estimate, explainer.last_bound
        bound = adversarial_overlap_bound(model, x, y, eps, method=method, crown_classes=args.crown_classes)
        attack = pgd(model, x, y, eps, restarts=2, steps=10)
        print(f"  {name:10s} {estimate.describe(1)} (auto budget {AUTO_BUDGET_SECONDS:.0f} s) -> bound {method!r}: "
              f"EVA {eva_time:.0f} s per image (the estimate included); overlap bound "
              f"{bound.item():.4g} >= PGD {attack.item():.4g}: {bool(bound >= attack)}; map range "
              f"[{maps.min().item():.3g}, {maps.max().item():.3g}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10, help="outputs of the timed lip_vgg")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-seconds", type=float, default=60.0, help="training per model for (b), (c); 0: random")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps instead of --train-seconds")
    parser.add_argument("--skip", choices=["a", "b", "c"], nargs="*", default=[])
    parser.add_argument("--models", choices=list(MODELS), nargs="*", default=list(MODELS), help="for (b)")
    parser.add_argument("--eps", type=float, nargs="*", default=[1, 4, 8], help="radii of (b), in 1/255")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", choices=["efficientnet_lite0", "resnet18"], default=None,
                        help="only (d): EVA on this ImageNet network at 224 px (resnet18: for a GPU, unmeasured)")
    parser.add_argument("--real-eps", type=float, default=1.0, help="radius of (d), in 1/255 of the pixel range")
    parser.add_argument("--crown-classes", type=int, default=10, help="classes given CROWN in (d)")
    parser.add_argument("--pool-cnn", action="store_true", help="only (e): EVA's time on issue 21's CNN")
    parser.add_argument("--pool-eps", type=float, default=0.05, help="radius of (e), input units")
    parser.add_argument("--pool-weights", default="/tmp/pool_cnn_bench_eva.pt",
                        help="where (e) keeps its trained CNN and images")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.real:
        real_network(args)
        return
    if args.pool_cnn:
        pool_eva(args)
        return
    if "a" not in args.skip:
        speed(args)
    if "b" not in args.skip:
        tightness(args)
    if "c" not in args.skip:
        faithfulness(args)


if __name__ == "__main__":
    main()
