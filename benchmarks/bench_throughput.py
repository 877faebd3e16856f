"""Training throughput (images/s) of plain and harmonized steps, for a ClickMe backbone, on GPU or CPU.

A step is forward, loss, backward and an SGD step, as ``HarmonizedClassifier`` computes its loss
(``harmonized_forward`` + task loss), under ``torch.autocast(bfloat16)`` with ``--precision bf16-mixed`` and with
the weights and images in ``channels_last`` with ``--channels-last``. The harmonized side has ``--annotated`` of
each batch with a human map (0.2: the reference mix; the double backprop runs on those only where the network
allows it). The two sides alternate in blocks of ``--block`` steps; images/s = images / total time of that side.

Backbones (``--backbone``), built from the configs' ``model.init_args.backbone`` when the config exists:

* ``resnet50``: ``configs/clickme/harmonized_resnet50.yaml`` (``align.models.resnet50``, 1000 classes);
* ``vit_s16``: ``timm.create_model("vit_small_patch16_224", num_classes=1000, img_size=--image-size)``,
  cross-entropy; the fused attention stays on (the double-backprop pass uses :mod:`align.models.attention`);
* ``lip_resnet``: ``configs/clickme/harmonized_lip_resnet.yaml`` (the 1-Lipschitz ResNet);
* ``resnet18``: the resnet50 config with ``align.models.resnet18`` (CPU-sized runs).

    python benchmarks/bench_throughput.py --backbone resnet50 --precision bf16-mixed --channels-last   # GPU
    python benchmarks/bench_throughput.py --backbone resnet50 --device cpu --image-size 32 --batch-size 4 \\
        --steps 2 --warmup 1 --block 1                                                                   # tiny CPU
"""

from __future__ import annotations

import argparse
import importlib
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import yaml

from align import HarmonizedClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "resnet50": "configs/clickme/harmonized_resnet50.yaml",
    "vit_s16": None,
    "lip_resnet": "configs/clickme/harmonized_lip_resnet.yaml",
    "resnet18": "configs/clickme/harmonized_resnet50.yaml",  # with the backbone below
}
#: backbones built from another backbone's config, with their own class
BACKBONE_CLASS = {"resnet18": "align.models.resnet18"}


def instantiate(spec: dict):
    """``{"class_path": "a.b.C", "init_args": {...}}`` -> ``C(**init_args)`` (nested specs built first)."""
    module, _, name = spec["class_path"].rpartition(".")
    args = {
        key: instantiate(value) if isinstance(value, dict) and "class_path" in value else value
        for key, value in (spec.get("init_args") or {}).items()
    }
    return getattr(importlib.import_module(module), name)(**args)


def model_options(name: str) -> dict:
    """The config's ``model.init_args`` (backbone spec, task loss and its options), or the ViT's."""
    if CONFIGS[name] is None:
        return {"backbone": None, "task_loss": "ce"}
    init = yaml.safe_load((ROOT / CONFIGS[name]).read_text())["model"]["init_args"]
    if name in BACKBONE_CLASS:
        init["backbone"]["class_path"] = BACKBONE_CLASS[name]
    return {key: init[key] for key in ("backbone", "task_loss", "task_loss_options") if key in init}


def build(name: str, harmonized: bool, channels_last: bool, device: torch.device, image_size: int,
          batch_statistics: str = "full"):
    options = model_options(name)
    spec = options.pop("backbone")
    if spec:
        backbone = instantiate(spec)
    else:
        backbone = timm.create_model("vit_small_patch16_224", num_classes=1000, img_size=image_size)
    # timm's fused attention stays on: the double-backprop pass swaps in align.models.attention's double backward
    module = HarmonizedClassifier(backbone, harmonization_weight=1.0 if harmonized else 0.0,
                                  channels_last=channels_last, batch_statistics=batch_statistics,
                                  **options)
    return module.to(device).train()


def make_step(module: HarmonizedClassifier, harmonized: bool, autocast):
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        images, labels = batch["image"], batch["label"]
        if module.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            if harmonized:
                logits, harmonization = module.harmonized_forward(images, labels, batch["heatmap"], batch["has_heatmap"])
                loss = module.task_loss(logits, labels) + harmonization
            else:
                loss = module.task_loss(module.backbone(images), labels)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=tuple(CONFIGS), default="resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--annotated", type=float, default=0.2, help="share of each batch with a human map")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=10, help="steps per side before switching")
    parser.add_argument("--batch-statistics", choices=("full", "frozen", "ghost"), default="full",
                        help="how BatchNorm networks take the split step (HarmonizedClassifier(batch_statistics=...))")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    b, size = args.batch_size, args.image_size
    annotated = torch.zeros(b, dtype=torch.bool, device=device)
    annotated[: max(1, round(args.annotated * b))] = True
    batch = {
        "image": torch.rand(b, 3, size, size, device=device),
        "label": torch.randint(0, 1000, (b,), device=device),
        "heatmap": torch.rand(b, size, size, device=device) * annotated[:, None, None],
        "has_heatmap": annotated,
    }

    def autocast():
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = {side: make_step(build(args.backbone, side == "harmonized", args.channels_last, device, size,
                                   args.batch_statistics), side == "harmonized", autocast)
             for side in ("plain", "harmonized")}
    for step in steps.values():
        for _ in range(args.warmup):
            step(batch)
    synchronize()
    seconds = dict.fromkeys(steps, 0.0)
    done = dict.fromkeys(steps, 0)
    while min(done.values()) < args.steps:
        for side, step in steps.items():
            count = min(args.block, args.steps - done[side])
            start = time.perf_counter()
            for _ in range(count):
                step(batch)
            synchronize()
            seconds[side] += time.perf_counter() - start
            done[side] += count
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.backbone} on {name}, {size} px, batch {b}, {args.precision}, channels_last={args.channels_last}, "
          f"{int(annotated.sum())} annotated per batch, {args.steps} steps per side, torch {torch.__version__}, "
          f"batch_statistics={args.batch_statistics}")
    for side in steps:
        print(f"  {side:10s} {done[side] * b / seconds[side]:9.1f} images/s  ({seconds[side] / done[side] * 1e3:.1f} ms/step)")
    print(f"  harmonized / plain step time: {seconds['harmonized'] / seconds['plain']:.2f}")


if __name__ == "__main__":
    main()
