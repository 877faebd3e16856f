"""Time per MACO optimisation step: this project's ``maco`` against Horama's (serre-lab/Horama 0.3, the authors'
PyTorch toolbox), same model, image size, crops per step and model input size, in one process.

A step is timed as the interval between two consecutive calls of the objective (one full step: parameterisation,
crops, forward, backward, optimiser update), so neither side's setup is counted; median over the steps after
the warm-up, runs of the three variants interleaved (order rotated each repeat). Horama is run as its README
shows (an eval model with trainable parameters, so its ``loss.backward()`` also computes the weights' gradients)
and, as a stronger baseline, with the parameters frozen. Ours crops with one anti-aliased ``roi_align`` at the
model's input size (Horama: ``roi_align`` at twice the size, then a bicubic anti-aliased resize) and takes
gradients w.r.t. the phase and the image only, whatever the parameters' ``requires_grad``.

Crop sides: Horama's ``box_size=(0.20, 0.25)`` draws sides uniformly in [0.25, 0.30] of the image; ours is given
the same mean (0.275). The default model, resnet18 at 224 with 6 crops (Horama's default count), keeps a CPU run
to a few minutes; ``--model tiny`` shows the cost of the MACO machinery alone.

    python benchmarks/bench_maco.py                      # resnet18 (no weights), 512 px image, 6 crops at 224, CPU
    python benchmarks/bench_maco.py --model tiny         # MACO's own machinery only (a one-conv model)
    python benchmarks/bench_maco.py --device cuda --crops 16

Horama downloads its ImageNet spectrum at run time; here it finds a local file instead (the 1/f fallback
spectrum written to a temporary directory), so nothing is downloaded. The spectrum does not change the cost.
Horama 0.3's ``__init__`` also imports einops without declaring it: the ``[bench]`` extra installs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # Horama's progress bar

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from explain.featureviz import logit, maco, power_law_spectrum  # noqa: E402


class StepTimer:
    """Wraps an objective; records the time of each call (one call per optimisation step)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, crops):
        if crops.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return self.fn(crops)

    def step_times(self, warmup: int) -> list[float]:
        """Seconds of each step after ``warmup`` steps."""
        marks = self.times[warmup:]
        return [b - a for a, b in zip(marks, marks[1:])]


def run_ours(model, args, magnitude) -> list[float]:
    objective = logit(model, args.class_id)
    timer = StepTimer(objective)
    timer.model = model  # maco puts the objective's model in eval mode on its device
    maco(
        timer, args.image_size, steps=args.steps, magnitude=magnitude, crops_per_step=args.crops,
        input_size=args.input_size, noise=0.05, box_size=0.275, device=args.device, value_range=(0.0, 1.0),
    )
    return timer.step_times(args.warmup)


def run_horama(horama, model, args, spectrum_dir: str) -> list[float]:

    timer = StepTimer(lambda crops: model(crops)[:, args.class_id].mean())
    cwd = os.getcwd()
    os.chdir(spectrum_dir)  # horama loads ./spectrum_decorrelated.npy (downloads it when absent)
    try:
        horama.maco(
            timer, total_steps=args.steps, learning_rate=1.0, image_size=args.image_size,
            model_input_size=args.input_size, noise=0.05, values_range=(0.0, 1.0),
            crops_per_iteration=args.crops, box_size=(0.20, 0.25), device=args.device,
        )
    finally:
        os.chdir(cwd)
    return timer.step_times(args.warmup)


def build_model(name: str) -> torch.nn.Module:
    """A torchvision classifier with random weights, or ``tiny`` (one strided conv and a linear head), which
    isolates the cost of MACO's own machinery (parameterisation, crops, noise, optimiser) from the model's."""
    if name == "tiny":
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=4),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 10),
        )
    return getattr(torchvision.models, name)(weights=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier (random weights) or 'tiny'")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--crops", type=int, default=6, help="crops per step (Horama's default)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--class-id", type=int, default=1)
    args = parser.parse_args()
    if args.steps < args.warmup + 2:
        parser.error("--steps must be at least --warmup + 2")

    import horama
    torch.manual_seed(0)
    model = build_model(args.model).to(args.device).eval()
    magnitude = power_law_spectrum(args.image_size)
    print(
        f"model {args.model} on {args.device} ({torch.get_num_threads()} threads), image {args.image_size}px, "
        f"{args.crops} crops/step resized to {args.input_size}px, {args.steps - args.warmup - 1} timed steps/run"
    )

    times = {"ours": [], "horama": [], "horama (frozen params)": []}
    with tempfile.TemporaryDirectory() as spectrum_dir:
        np.save(Path(spectrum_dir) / "spectrum_decorrelated.npy", magnitude.numpy())
        runs = {
            "ours": lambda: run_ours(model, args, magnitude),
            "horama": lambda: run_horama(horama, model, args, spectrum_dir),
            "horama (frozen params)": lambda: run_horama(horama, model.requires_grad_(False), args, spectrum_dir),
        }
        names = list(runs)
        for repeat in range(args.repeats):
            for name in names[repeat % 3 :] + names[: repeat % 3]:  # rotate the order: load drifts over time
                times[name] += runs[name]()
                model.requires_grad_(True)
                for parameter in model.parameters():  # horama's backward filled them
                    parameter.grad = None

    # median wall-clock per step is the measure; the best step is printed too: on a machine shared with other
    # processes it is the least disturbed estimate
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    for name in times:
        print(
            f"{name:>24}: {median[name] * 1e3:9.1f} ms/step median, {best[name] * 1e3:9.1f} ms/step best "
            f"({len(times[name])} steps)"
        )
    for name in ("horama", "horama (frozen params)"):
        print(
            f"ratio ours / {name}: {median['ours'] / median[name]:.2f} (median), "
            f"{best['ours'] / best[name]:.2f} (best)   target <= 1.0"
        )


if __name__ == "__main__":
    main()
