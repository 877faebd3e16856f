"""Speed of the Sobol attribution method, side by side in one process (warm-up, then the median of repeats).

(a) Sobol over the same number of bare forward passes at the same batch size: N(D+1) = 2080 rows per image
    at the defaults (grid 8, N 32), in chunks of ``--batch-size``, the bare side sending one ready-made input
    tensor through the model. Target: ratio <= 1.10. Also shown: a reference-style loop (one image at a time,
    N(D+2) forwards including the unused B block, masks upsampled for every batch, as the public torch code).
    Models: the default 1-Lipschitz CNN (``align.models.lip_vgg``, exported to plain layers for inference) and
    ``align.models.small_cnn``, 32x32 inputs.
(b) Sobol against captum's KernelShap with the same number of model evaluations (``n_samples`` = N(D+1)) and
    the same 8x8 grid as feature mask, on a model trained on ``datamodules.ShortcutShapesDataModule``
    (``small_cnn``, trained once for ``--train-steps`` and cached under ``.cache/bench_sobol/``): time ratio
    (target <= 1.0; the two run interleaved, 8 images per call) and the Deletion AUC of both maps
    (``explain.metrics.functional.fidelity``, on the softmax probability as in RISE and on the logit that
    both methods explain; lower is better; Saliency and a random map are shown for scale).

    python benchmarks/bench_sobol.py [--images 2] [--repeats 3] [--batch-size 256] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.models import export_plain, lip_vgg, small_cnn
from datamodules.shortcut import ShortcutShapesDataModule
from explain import Saliency, Sobol
from explain.metrics.functional.fidelity import auc, deletion_curve
from explain.sensitivity import total_sobol_indices

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench_sobol"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time of each function: one warm-up call each, then ``repeats`` rounds that call them in
    turn (interleaved, so a change of machine load hits every side alike)."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bare_forwards(model: nn.Module, rows: int, batch_size: int, shape: tuple[int, ...], device: torch.device):
    """The floor: ``rows`` inputs through the model, ``batch_size`` at a time, from one ready-made tensor."""
    inputs = torch.rand(batch_size, *shape, device=device)

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, rows, batch_size):
                model(inputs[: min(batch_size, rows - start)])

    return run


def reference_style_sobol(model, images, targets, grid_size=8, nb_design=32, batch_size=256) -> Tensor:
    """The public reference's loop, in torch: one image at a time, the A, B and C_i blocks (N(D+2) forwards),
    masks upsampled (nearest) for every batch, inpainting ``x M``; Jansen indices; bicubic map."""
    nb_dim = grid_size**2
    engine = torch.quasirandom.SobolEngine(2 * nb_dim, scramble=True, seed=0)
    points = engine.draw(nb_design).to(images.device)
    a, b = points[:, :nb_dim], points[:, nb_dim:]
    c = a.repeat(nb_dim, 1, 1)
    c[torch.arange(nb_dim), :, torch.arange(nb_dim)] = b.T
    masks = torch.cat([a, b, c.reshape(-1, nb_dim)]).view(-1, 1, grid_size, grid_size)
    maps = []
    with torch.no_grad():
        for image, target in zip(images, targets):
            scores = []
            for chunk in masks.split(batch_size):
                up = F.interpolate(chunk, size=image.shape[-2:], mode="nearest")
                scores.append(model(image[None] * up)[:, target])
            scores = torch.cat(scores)
            used = torch.cat([scores[:nb_design], scores[2 * nb_design :]])  # B is evaluated, never used
            st = total_sobol_indices(used, nb_dim, nb_design).view(1, 1, grid_size, grid_size)
            maps.append(F.interpolate(st, size=image.shape[-2:], mode="bicubic", align_corners=False)[0, 0])
    return torch.stack(maps)


def part_a(args, device: torch.device) -> None:
    print(f"(a) Sobol vs bare forwards: {args.images} images 3x32x32, grid 8, N 32, batch_size {args.batch_size}")
    torch.manual_seed(0)
    images = torch.rand(args.images, 3, 32, 32, device=device)
    targets = torch.arange(args.images, device=device) % 4
    models = {"lip_vgg (exported)": export_plain(lip_vgg(num_classes=4)), "small_cnn": small_cnn(num_classes=4)}
    for name, model in models.items():
        model = model.to(device).eval()
        sobol = Sobol(model, batch_size=args.batch_size)
        rows = args.images * sobol.nb_forwards
        times = median_times(
            {
                "sobol": lambda: sobol(images, targets),
                "bare": bare_forwards(model, rows, args.batch_size, (3, 32, 32), device),
                "reference": lambda: reference_style_sobol(model, images, targets, batch_size=args.batch_size),
            },
            device,
            args.repeats,
        )
        t_sobol, t_bare, t_ref = times["sobol"], times["bare"], times["reference"]
        gap = (sobol(images, targets) - reference_style_sobol(model, images, targets, batch_size=args.batch_size)).abs()
        print(
            f"  {name:20s} rows {rows:6d} | bare forwards {t_bare:7.3f} s | Sobol {t_sobol:7.3f} s | "
            f"ratio {t_sobol / t_bare:5.3f} (target <= 1.10) | reference-style loop {t_ref:7.3f} s "
            f"(Sobol is {t_ref / t_sobol:4.2f}x faster; max |map difference| {gap.max().item():.1e})"
        )


def trained_model(args, device: torch.device) -> tuple[nn.Module, ShortcutShapesDataModule]:
    """``small_cnn`` trained with Adam for ``--train-steps`` steps of 64 images (seeded, so the same weights on
    every machine), cached under ``.cache/bench_sobol/``."""
    data = ShortcutShapesDataModule(num_classes=4, image_size=32, batch_size=64, seed=0)
    torch.manual_seed(0)
    model = small_cnn(num_classes=4)
    path = CACHE / f"small_cnn_shortcut_{args.train_steps}steps.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        print(f"  model: small_cnn, weights cached at {path}")
    else:
        print(f"  training small_cnn on ShortcutShapesDataModule for {args.train_steps} steps (cached afterwards)")
        model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        start, steps = time.perf_counter(), 0
        while steps < args.train_steps:
            for batch in data.train_dataloader():
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(batch["image"].to(device)), batch["label"].to(device)).backward()
                optimizer.step()
                steps += 1
                if steps == args.train_steps:
                    break
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.cpu().state_dict(), path)
        print(f"  trained in {time.perf_counter() - start:.1f} s")
    model = model.to(device).eval()
    with torch.no_grad():
        for split, loader in zip(data.test_split_names, data.test_dataloader()):
            right = total = 0
            for batch in loader:
                right += (model(batch["image"].to(device)).argmax(1) == batch["label"].to(device)).sum().item()
                total += len(batch["label"])
            print(f"  accuracy on the {split} test split: {right / total:.3f}")
    return model, data


def part_b(args, device: torch.device) -> None:
    from captum.attr import KernelShap

    print(f"(b) Sobol vs captum KernelShap, same evaluations, same 8x8 grid, {args.shap_images} iid test images")
    model, data = trained_model(args, device)
    test = data.dataset("iid")
    batch = [test[i] for i in range(args.shap_images)]
    images = torch.stack([sample["image"] for sample in batch]).to(device)
    targets = torch.stack([sample["label"] for sample in batch]).to(device)
    sobol = Sobol(model, batch_size=args.batch_size)
    shap = KernelShap(model)
    feature_mask = torch.arange(64, device=device).view(1, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)

    def kernel_shap(x: Tensor, y: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # captum warns that it loops over the images itself
            attributions = shap.attribute(
                x,
                baselines=0.0,
                target=y,
                feature_mask=feature_mask,  # the Sobol grid: 64 cells of 4x4 pixels
                n_samples=sobol.nb_forwards,
                perturbations_per_eval=args.batch_size,
            )
        return attributions[:, 0]  # every channel of a cell shares its value

    methods = {"Sobol": sobol, "KernelShap": kernel_shap}
    for method in methods.values():  # warm-up
        method(images[:1], targets[:1])
    seconds = dict.fromkeys(methods, 0.0)
    maps: dict[str, list[Tensor]] = {name: [] for name in methods}
    for x, y in zip(images.split(8), targets.split(8)):  # interleaved, 8 images per call
        for name, method in methods.items():
            torch.manual_seed(0)
            sync(device)
            start = time.perf_counter()
            maps[name].append(method(x, y))
            sync(device)
            seconds[name] += time.perf_counter() - start
    print(
        f"  {sobol.nb_forwards} evaluations per image | Sobol {seconds['Sobol']:7.3f} s | "
        f"KernelShap {seconds['KernelShap']:7.3f} s | ratio Sobol/KernelShap "
        f"{seconds['Sobol'] / seconds['KernelShap']:5.3f} (target <= 1.0)"
    )
    all_maps = {name: torch.cat(value) for name, value in maps.items()}
    all_maps["Saliency"] = Saliency(model)(images, targets)
    all_maps["random"] = torch.rand(images.shape[0], 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    scorers = {"probability": nn.Sequential(model, nn.Softmax(-1)), "logit": model}
    print(f"  Deletion AUC ({args.steps} steps, baseline 0; lower is better), mean +- standard error:")
    print(f"    {'map':10s} " + " ".join(f"{name:>20s}" for name in scorers))
    areas = {
        name: {key: auc(deletion_curve(scorer, images, targets, value, steps=args.steps, batch_size=256))
               for key, scorer in scorers.items()}
        for name, value in all_maps.items()
    }

    def fmt(values: Tensor) -> str:
        return f"{values.mean().item():9.4f} +- {values.std().item() / math.sqrt(len(values)):.4f}"

    for name, by_score in areas.items():
        print(f"    {name:10s} " + " ".join(f"{fmt(values):>20s}" for values in by_score.values()))
    difference = {key: areas["Sobol"][key] - areas["KernelShap"][key] for key in scorers}
    print(f"    {'Sobol-KS':10s} " + " ".join(f"{fmt(values):>20s}" for values in difference.values()) + "  (paired)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images per Sobol call in (a)")
    parser.add_argument("--shap-images", type=int, default=32, help="images explained in (b)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="deletion steps")
    parser.add_argument("--train-steps", type=int, default=400, help="training steps of the model of (b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", choices=("a", "b"), help="skip one part")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.skip != "a":
        part_a(args, device)
    if args.skip != "b":
        part_b(args, device)


if __name__ == "__main__":
    main()
