"""EVA speed and bound tightness, measured side by side in one process.

(a) Speed: time per image of EVA (CROWN, 8x8 grid, default eps: one shared relaxation per image, 65 region
    bounds from it) over the time per image of Sobol at its defaults (grid 8, N 32: 2080 forward rows per
    image), both on the default 1-Lipschitz CNN (``align.models.lip_vgg``, ``--classes`` outputs, exported to
    plain layers with ``export_plain`` as both run at inference; EVA exports a deel-torchlip model itself) at
    32x32. One warm-up call each, then the median of ``--repeats`` interleaved rounds. Target: ratio <= 0.5.
    Also shown: Sobol on the unexported deel-torchlip model (what a user passing the training module gets),
    EVA with one CROWN propagation per (image, region) box (``relaxation="per_box"``) and EVA with IBP.
(b) Tightness: the adversarial-overlap upper bounds over the full L-inf ball (IBP and CROWN, each with plain
    interval boxes and with Lipschitz boxes; the Lipschitz certificate; best) against the largest margin PGD
    finds in the same ball (a lower bound of the true value), as the mean gap ``bound - PGD`` and its ratio
    to IBP's, at eps = 1/255 and the default 8/255. Models: ``lip_vgg`` and ``small_cnn`` (ReLU, BatchNorm,
    max pooling) trained for ``--train-seconds`` each on ``datamodules.ShortcutShapesDataModule`` (8
    classes), so margins are those of a fitted model.
(c) Faithfulness on a shortcut: ``small_cnn`` trained for ``--train-seconds`` on shortcut data where the
    watermark always names the class and nothing is augmented (``shortcut_prob=1, augment=False``: the
    model reads the watermark, see its accuracy on the ``flipped`` split). On ``--images`` val images: the
    rank of the watermark cell among the 64 grid cells by mean map value (1 = most important; a faithful
    map puts it first), the Deletion AUC with the mean colour as baseline (lower is better), and Spearman
    with the human map (the object: high means "looks at the object", which this model does not do).

    python benchmarks/bench_eva.py [--images 4] [--repeats 3] [--classes 10] [--threads N] [--train-seconds 60]
        [--skip a b c]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from deel import torchlip
from torch import Tensor, nn

import torch.nn.functional as F

from align.models import export_plain, lip_vgg, small_cnn
from datamodules.shortcut import ShortcutShapesDataModule
from explain import EVA, Saliency, Sobol
from explain.attributions.eva import DEFAULT_EPS, adversarial_overlap_bound
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
    best = torch.full((len(x),), -float("inf"))
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


def train(model: nn.Module, data: ShortcutShapesDataModule, seconds: float, lipschitz: bool) -> float:
    """Fit ``model`` for ``seconds`` (Adam; tau-cross-entropy for the Lipschitz net); returns val accuracy."""
    loss_fn = torchlip.TauCrossEntropyLoss(tau=16.0) if lipschitz else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3 if lipschitz else 1e-3)
    model.train()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in data.train_dataloader():
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.perf_counter() - start >= seconds:
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
    eva, eva_ibp = EVA(plain, bound="crown"), EVA(plain, bound="ibp")
    eva_per_box = EVA(plain, bound="crown", relaxation="per_box")
    sobol = Sobol(plain)
    sobol_lip = Sobol(model)
    times = median_times(
        {
            "eva_crown": lambda: eva(images, targets),
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
    print(f"    EVA crown, one propagation per box        : {per_image['eva_per_box']:.3f} s/image")
    print(f"    EVA ibp (per box)                         : {per_image['eva_ibp']:.3f} s/image")
    print(f"    Sobol (grid 8, N 32, 2080 rows/image)     : {per_image['sobol']:.3f} s/image")
    print(f"    Sobol on the unexported torchlip model    : {per_image['sobol_torchlip']:.3f} s/image")
    ratio = per_image["eva_crown"] / per_image["sobol"]
    print(f"    ratio EVA(crown) / Sobol = {ratio:.3f}   (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    print(f"    ratio EVA(ibp)   / Sobol = {per_image['eva_ibp'] / per_image['sobol']:.3f}")


def tightness(args: argparse.Namespace) -> None:
    data = ShortcutShapesDataModule(num_classes=8, image_size=32, train_size=2000, val_size=200, batch_size=64)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    images, labels = batch["image"][: args.images], batch["label"][: args.images]
    print(f"(b) tightness: mean over {args.images} val images of (bound - PGD); PGD = largest margin found")
    for name, builder, lipschitz in (("lip_vgg", lip_vgg, True), ("small_cnn", small_cnn, False)):
        torch.manual_seed(0)
        model = builder(8)
        accuracy = train(model, data, args.train_seconds, lipschitz) if args.train_seconds > 0 else float("nan")
        model = export_plain(model) if lipschitz else model.eval()
        with torch.no_grad():
            clean = max_margin(model, images, labels)
        print(f"    {name}: trained {args.train_seconds:.0f}s, val accuracy {accuracy:.2f}, "
              f"mean clean margin max_c f_c - f_y = {clean.mean():.4f}")
        # (name, method, Lipschitz boxes)
        methods = [("ibp", "ibp", False), ("crown", "crown", False), ("ibp+lipbox", "ibp", True),
                   ("crown+lipbox", "crown", True)]
        methods += [("lipschitz", "lipschitz", True), ("best", "best", True)] if lipschitz else [("best", "best", True)]
        for eps in (1 / 255, DEFAULT_EPS):
            attack = pgd(model, images, labels, eps)
            gaps = {}
            for label, method, boxes in methods:
                bound = adversarial_overlap_bound(model, images, labels, eps, method=method, batch_size=16,
                                                  lipschitz_boxes=boxes)
                assert (attack <= bound + 1e-4).all(), f"unsound {label} bound on {name}"
                gaps[label] = (bound - attack).mean().item()
            text = ", ".join(f"{m} {gaps[m]:.4g} (x{gaps[m] / gaps['ibp']:.3g})" for m, _, _ in methods)
            print(f"      eps={eps * 255:.0f}/255: PGD {attack.mean():.4f}; gap (ratio to IBP): {text}")


def watermark_rank(maps: Tensor, watermark: Tensor, grid: int = 8) -> Tensor:
    """Rank (1 = first) of the grid cell that holds the watermark among the ``grid^2`` cells, by mean map."""
    cells = F.adaptive_avg_pool2d(maps[:, None], grid).flatten(1)
    mark = F.adaptive_avg_pool2d(watermark[None, None].float(), grid).flatten().argmax()
    return 1 + (cells > cells[:, mark : mark + 1]).sum(1)


def faithfulness(args: argparse.Namespace) -> None:
    data = ShortcutShapesDataModule(shortcut_prob=1.0, augment=False, train_size=2000, val_size=200, batch_size=64)
    data.setup("fit")
    torch.manual_seed(0)
    model = small_cnn(data.num_classes)
    train(model, data, args.train_seconds, lipschitz=False)
    flipped = data.test_dataloader()[1]
    with torch.no_grad():
        hits = [(model(b["image"]).argmax(1) == b["label"]).float() for b in flipped]
    batch = next(iter(data.val_dataloader()))
    count = max(args.images, 8)
    images, labels, human = batch["image"][:count], batch["label"][:count], batch["heatmap"][:count]
    print(f"(c) faithfulness: small_cnn trained {args.train_seconds:.0f}s on watermark-coded classes, accuracy on "
          f"the flipped split {torch.cat(hits).mean():.2f} (low: it reads the watermark); {count} val images")
    explainers = {
        "Saliency": Saliency(model),
        "Sobol": Sobol(model),
        "EVA crown (shared)": EVA(model, eps=1 / 255),
        "EVA crown (per box)": EVA(model, eps=1 / 255, relaxation="per_box"),
        "random": lambda x, y: torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0)),
    }
    print(f"    {'map':22s} {'s/image':>8s} {'watermark rank':>15s} {'deletion AUC':>13s} {'spearman':>9s}")
    for name, explainer in explainers.items():
        start = time.perf_counter()
        maps = explainer(images, labels)
        seconds = (time.perf_counter() - start) / count
        rank = watermark_rank(maps, data.watermark_mask()).float().mean()
        mean_colour = images.mean((2, 3), keepdim=True)
        deletion = auc(deletion_curve(model, images, labels, maps, steps=16, baseline=mean_colour))
        rho = per_image_spearman(maps, human).mean()
        print(f"    {name:22s} {seconds:8.3f} {rank:15.1f} {deletion.mean():13.3f} {rho:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10, help="outputs of the timed lip_vgg")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-seconds", type=float, default=60.0, help="training per model for (b); 0: random")
    parser.add_argument("--skip", choices=["a", "b", "c"], nargs="*", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    if "a" not in args.skip:
        speed(args)
    if "b" not in args.skip:
        tightness(args)
    if "c" not in args.skip:
        faithfulness(args)


if __name__ == "__main__":
    main()
