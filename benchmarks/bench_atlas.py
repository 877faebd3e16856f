"""Cost of the concept atlas (``python -m explain.atlas``), measured on this machine.

1. Stage 1, ResNet-50 (timm, random weights: the cost does not depend on them) at 224 px: images/s through
   ``Trainer.predict`` with the activation writer (float16 shards), and the bare forward for comparison.
2. Stage 2, one class of ``--images`` images of that ResNet-50 (layer4, 2048 x 7 x 7), split by part: dictionary
   (NMF), importance (Sobol, nb_design 32), MACO (the 10 concepts in one batched run, seconds per step of 8 crops
   per concept), and the rest (crops, maps, thumbnails, PNG and JSON writes).
2b. The two stage-2 shortcuts against the direct computation, alternated in one process (``--repeats`` times each):
   MACO of 10 concepts batched (one pass of 10 x crops per step) against one concept per pass, and the importance
   on pooled codes through the linear head against the network's head on every masked map. Also the cost of one
   MACO pass (forward + gradient w.r.t. the input) over a forward pass of the same crops, the factor that turns
   published forward/training throughputs into MACO's.
3. A synthetic 1000-class atlas with a tiny model (one colour per class) through the CLI, and its peak memory
   next to a 100-class one: the peak must not grow with the number of classes.

    python benchmarks/bench_atlas.py [--images 64] [--stage1-images 64] [--repeats 2] [--skip-classes]
        [--skip-stages] [--device cuda] [--maco-crops 32]

Then extrapolate with the figures printed (BENCHMARKS.md, "Concept atlas").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explain.atlas import concepts as atlas_concepts  # noqa: E402

STEPS_GPU = 256


# ---------------------------------------------------------------------------------------------- synthetic data
class RandomImages(torch.utils.data.Dataset):
    """``n`` random images [3, size, size] with their index (stage 1's sample dicts)."""

    def __init__(self, n: int, size: int = 224) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def source(self, index: int) -> str:
        return f"random {index}"

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {"image": torch.randn(3, self.size, self.size, generator=generator), "index": index, "ok": True}


def colour_model(num_classes: int = 1000) -> nn.Sequential:
    """Tiny network reading a colour: latent ``[R, G, B, 1]`` per location; the head scores class ``k`` by
    ``2 c_k . x - |c_k|^2`` (the nearest of 10 x 10 x 10 grid colours ``c_k``), a linear head after pooling."""
    colours = _grid_colours(num_classes)
    conv = nn.Conv2d(3, 4, 1)
    head = nn.Linear(4, num_classes)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:3, :, 0, 0] = torch.eye(3)
        conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        head.weight.copy_(torch.cat([2 * colours, -(colours ** 2).sum(1, keepdim=True)], 1))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _grid_colours(num_classes: int) -> torch.Tensor:
    side = round(num_classes ** (1 / 3)) if round(num_classes ** (1 / 3)) ** 3 == num_classes else 10
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return (grid[:num_classes].float() + 0.5) / side


def write_colour_images(folder: Path, num_classes: int, per_class: int, size: int = 16) -> None:
    from PIL import Image

    colours = _grid_colours(1000)[:num_classes].numpy()
    rng = np.random.default_rng(0)
    for k, colour in enumerate(colours):
        target = folder / f"{k:04d}"
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.clip(colour + rng.uniform(-0.02, 0.02, size=(size, size, 3)), 0, 1)
            Image.fromarray((image * 255).round().astype(np.uint8)).save(target / f"{i}.png")


# ---------------------------------------------------------------------------------------------- 1. stage 1
def bench_stage1(n_images: int, batch_size: int = 32, repeats: int = 2) -> dict:
    import lightning as L
    import timm

    from explain.atlas.activations import ActivationWriter, LatentPredictor
    from explain.concepts import split_model

    model = timm.create_model("resnet50", pretrained=False).eval()
    g, h = split_model(model)
    dataset = RandomImages(n_images)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad():
        g(torch.randn(2, 3, 224, 224))  # warm up
    bare, lightning = [], []
    for _ in range(repeats):  # bare forward (the same batches) and Trainer.predict with the writer, alternated
        with torch.no_grad():
            start = time.perf_counter()
            for batch in loader:
                h(g(batch["image"]))
            bare.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as folder:
            trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, inference_mode=False,
                                callbacks=[ActivationWriter(Path(folder) / "stage1", max_images=10**9)])
            start = time.perf_counter()
            with torch.no_grad():
                trainer.predict(LatentPredictor(g, h), loader, return_predictions=False)
            lightning.append(time.perf_counter() - start)
            stored = sum(p.stat().st_size for p in Path(folder).rglob("*.npy"))
    return {"images": n_images, "bare_images_per_s": n_images / min(bare),
            "stage1_images_per_s": n_images / min(lightning), "bytes_per_image": stored / n_images}


# ---------------------------------------------------------------------------------------------- 2. stage 2
def bench_stage2(n_images: int, maco_steps: int = 2) -> dict:
    import timm

    from explain.atlas.concepts import ConceptOptions, ConceptPredictor
    from explain.concepts import split_model

    model = timm.create_model("resnet50", pretrained=False).eval()
    g, h = split_model(model)
    dataset = RandomImages(n_images)
    timings: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] += time.perf_counter() - start
        return wrapper

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        stage1 = root / "stage1" / "rank0"
        stage1.mkdir(parents=True)
        rows = []
        with torch.no_grad():
            for start in range(0, n_images, 32):
                images = torch.stack([dataset[i]["image"] for i in range(start, min(start + 32, n_images))])
                np.save(stage1 / f"shard_{start:06d}.npy", g(images).half().numpy())
                rows += [{"index": start + j, "class": 0, "logit": 0.0, "shard": f"shard_{start:06d}.npy", "row": j,
                          "rank": "rank0"} for j in range(images.shape[0])]
        # MACO as on a GPU: the 10 concepts' crops in one pass per step (4 crops each, to bound this CPU's memory)
        options = ConceptOptions(n_concepts=10, nb_design=32, maco_steps=maco_steps, maco_crops=4, maco_batch=40)
        module = ConceptPredictor(g, h, root, root / "stage1", {0: rows}, {0: "class 0"}, 1000, dataset,
                                  (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), options)
        originals = (atlas_concepts.fit_dictionary, atlas_concepts.concept_importance, ConceptPredictor.maco_images)
        atlas_concepts.fit_dictionary = timed("dictionary", originals[0])
        atlas_concepts.concept_importance = timed("importance", originals[1])
        ConceptPredictor.maco_images = timed("maco", originals[2])
        try:
            start = time.perf_counter()
            with torch.no_grad():
                module.write_class(0)
            total = time.perf_counter() - start
        finally:
            atlas_concepts.fit_dictionary, atlas_concepts.concept_importance, ConceptPredictor.maco_images = originals
    crop_passes = options.n_concepts * maco_steps * options.maco_crops
    rest = total - timings["dictionary"] - timings["importance"] - timings["maco"]
    return {"images": n_images, "dictionary_s": timings["dictionary"], "importance_s": timings["importance"],
            "maco_s": timings["maco"], "maco_crop_passes": crop_passes,
            "maco_s_per_crop_pass": timings["maco"] / crop_passes,
            "maco_s_at_xplique_budget": timings["maco"] / crop_passes * STEPS_GPU * 32 * options.n_concepts,
            "rest_s": rest, "total_measured_s": total}


# ---------------------------------------------------------------------------------------------- 2b. shortcuts
def bench_shortcuts(n_images: int, repeats: int = 2, n_concepts: int = 10, crops: int = 4, steps: int = 2,
                    device: str = "cpu") -> dict:
    """Seconds of the batched MACO / importance shortcuts and of their direct computations, alternated."""
    import timm

    from explain.atlas.concepts import fit_dictionary, linear_head
    from explain.concepts import concept_importance, split_model
    from explain.featureviz import concept_directions, maco_batch, power_law_spectrum

    model = timm.create_model("resnet50", pretrained=False).eval().to(device)
    g, h = split_model(model)
    dataset = RandomImages(n_images)
    with torch.no_grad():
        latents = torch.cat([g(torch.stack([dataset[i]["image"] for i in range(s, min(s + 16, n_images))]).to(device))
                             for s in range(0, n_images, 16)])
    atoms, codes = fit_dictionary(latents, n_concepts)
    head = linear_head(h, tuple(latents.shape[1:]))
    magnitude = power_law_spectrum(224)
    kwargs = dict(steps=steps, crops_per_step=crops, magnitude=magnitude)

    def batched_maco():  # every concept's crops in one pass per step
        maco_batch(concept_directions(g, atoms), n_concepts, 224, **kwargs)

    def sequential_maco():  # one concept per pass (the same images: each concept has its own generator)
        maco_batch(concept_directions(g, atoms), n_concepts, 224, images_per_pass=1, **kwargs)

    vector, bias = head[0], h(torch.zeros_like(latents[:1]))[0, 0].detach()

    def pooled_importance():
        with torch.no_grad():
            concept_importance(codes.mean((1, 2)), atoms, lambda a: (a @ vector + bias)[:, None], 0,
                               batch_size=64 * 49)

    def spatial_importance():
        with torch.no_grad():
            concept_importance(codes, atoms, h, 0, batch_size=64)

    crops_in = torch.rand(crops * n_concepts, 3, 224, 224, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def forward():
        with torch.no_grad():
            g(crops_in)

    def maco_pass():  # forward + gradient w.r.t. the input (autograd.grad computes no weight gradient)
        x = crops_in.clone().requires_grad_(True)
        torch.autograd.grad(g(x).mean(), [x])

    from torch.utils._python_dispatch import TorchDispatchMode

    class ConvBackwardMasks(TorchDispatchMode):  # which gradients each convolution's backward computes
        def __init__(self) -> None:
            super().__init__()
            self.masks: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                self.masks["input, weight, bias = " + str(tuple(args[-1]))] += 1
            return func(*args, **(kwargs or {}))

    with ConvBackwardMasks() as log:  # MACO's pass computes the input's gradient only, no weight gradient
        x = crops_in[:1].clone().requires_grad_(True)
        torch.autograd.grad(g(x).mean(), [x])
    cases = {"maco_batched": batched_maco, "maco_sequential": sequential_maco,
             "importance_pooled": pooled_importance, "importance_spatial": spatial_importance,
             "forward": forward, "maco_pass": maco_pass}
    seconds: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):  # alternate the sides so that the machine's load hits both alike
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in seconds.items()}
    return {**{f"{name}_s": value for name, value in best.items()},
            "maco_sequential_over_batched": best["maco_sequential"] / best["maco_batched"],
            "importance_spatial_over_pooled": best["importance_spatial"] / best["importance_pooled"],
            "maco_pass_over_forward": best["maco_pass"] / best["forward"], "conv_backward_masks": dict(log.masks),
            "setting": f"{n_images} images, {n_concepts} concepts, MACO {steps} steps x {crops} crops, best of "
                       f"{repeats}, {device}"}


# ---------------------------------------------------------------------------------------------- 3. many classes
def run_colour_atlas(folder: Path, num_classes: int) -> dict:
    out = folder / f"atlas_{num_classes}"
    command = [
        sys.executable, "-c",
        # VmHWM of the child's own memory map (ru_maxrss would carry the parent's peak over fork + exec)
        "import re, sys, time; from explain.atlas.cli import main; t = time.perf_counter(); main(sys.argv[1:]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print('PEAK', hwm, 'SECONDS', time.perf_counter() - t)",
        "--model", "bench_atlas.colour_model", "--data", str(folder / f"images_{num_classes}"), "--out", str(out),
        "--image_size", "16", "--crop_pct", "1", "--mean", "[0,0,0]", "--std", "[1,1,1]", "--max_images", "4",
        "--batch_size", "256", "--concepts.n_concepts", "2", "--concepts.nb_design", "4",
        "--concepts.maco_steps", "1", "--concepts.maco_crops", "1", "--concepts.n_crops", "2",
        "--concepts.n_maps", "1", "--concepts.n_thumbs", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    peak, seconds = result.stdout.split("PEAK")[-1].split("SECONDS")
    manifest = json.loads((out / "atlas.json").read_text())
    done = sum(c["status"] == "done" for c in manifest["classes"])
    index_bytes = (out / "index.html").stat().st_size if (out / "index.html").is_file() else None
    return {"classes": num_classes, "done": done, "peak_rss_mib": int(peak) / 1024, "seconds": float(seconds),
            "index_html_bytes": index_bytes}


def bench_classes(counts: tuple[int, ...] = (100, 1000)) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        results = []
        for count in counts:
            write_colour_images(folder / f"images_{count}", count, per_class=3)
            results.append(run_colour_atlas(folder, count))
            print(results[-1], flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images of the stage-2 class")
    parser.add_argument("--stage1-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the shortcut comparisons")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the shortcut comparisons (stages 1 and 2 run on the CPU)")
    parser.add_argument("--maco-crops", type=int, default=4, help="crops per concept and step in the comparisons")
    parser.add_argument("--skip-stages", action="store_true", help="skip stages 1 and 2 (run the comparisons only)")
    parser.add_argument("--skip-classes", action="store_true", help="skip the 100/1000-class runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, CPU count: {os.cpu_count()}", flush=True)
    if not args.skip_stages:
        print("stage 1:", bench_stage1(args.stage1_images, repeats=args.repeats), flush=True)
        print("stage 2:", bench_stage2(args.images), flush=True)
    print("stage 2 shortcuts:", bench_shortcuts(args.images, args.repeats, crops=args.maco_crops, device=args.device),
          flush=True)
    if not args.skip_classes:
        bench_classes()
    print("peak RSS of this process (MiB):", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
