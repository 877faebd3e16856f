"""Stage 2 of the atlas: the concepts of each class, on the rank that owns it (``Trainer.predict`` over the class
indices, so ``DistributedSampler`` splits the classes over the ranks).

For a class with images ``x_1..x_n`` (those the model predicts as the class, from stage 1) and their activations
``A_i`` [c, h, w] at the layer:

* **dictionary**: every spatial location of every image is a sample, ``X = [A_i(p)]`` [n h w, c], factorised
  ``X ~= U W`` (CRAFT's NMF, Fel et al. 2023, by default; any :func:`explain.concepts.make_dictionary` name, e.g.
  ``topk_sae``, whose codes are nonnegative): the rows of ``W`` [r, c] are the class's concepts, ``U`` their
  coefficients at each location (Lens applies CRAFT to the last block of ResNet-50 the same way);
* **importance**: CRAFT's total Sobol indices of the concept coefficients (:func:`explain.concepts.concept_importance`,
  one mask value per concept shared by every location), averaged over the images, normalised to sum to 1. When the
  head is linear after average pooling (below), ``mean_p((U_p * m) W) = (mean_p(U) * m) W`` for a mask ``m`` per
  concept: the masked codes are pooled first and only the class's logit is computed, the same indices for
  ``h w`` (49 on ResNet-50's layer4) times less work;
* **logit share** (Lens): when the head is linear after average pooling, ``logit_c = mean_p(U) W w_c + b``, so
  concept ``k`` carries ``s_k = sum_i mean_p(U_ik) (W_k . w_c)``; its share is ``s_k / sum_j s_j``;
* **MACO** (Fel et al. 2023) of each concept direction ``W_k`` at the layer (``concept_direction``, dot x cos^2),
  all the concepts of the class in one :func:`explain.featureviz.maco_batch` run (on a GPU, the crops of up to
  256 / ``maco_crops`` concepts share each network pass; every concept has its own generator seeded with ``seed``,
  so each image is the one ``maco`` gives alone),
  with the Fourier magnitude of the class's first ``SPECTRUM_IMAGES`` images;
* **top crops**: for each concept, the images where it peaks highest, cut around that location;
* **attribution maps**: ``U[..., k]`` upsampled on a few images;
* **2D map**: PCA of the images' mean coefficients, coloured by the dominant concept.

Everything of a class is written in a temporary folder renamed to ``classes/NNNN`` at the end: a class whose
folder exists is finished, and a resumed run skips it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from explain.atlas.storage import write_json, write_png, write_tensors
from explain.concepts import concept_importance
from explain.concepts.crops import default_patch_size
from explain.concepts.dictionary import make_dictionary

SPECTRUM_IMAGES = 16  # MACO's magnitude: the mean spectrum of the class's first 16 images (dataset order)


def check_dictionary(dictionary: str, options: dict[str, Any] | None) -> None:
    """Raise a clear error for an unknown dictionary (the message lists the known ones) or an option it refuses."""
    make_dictionary(dictionary, 2, **(options or {}))


def class_folder(index: int, n_classes: int) -> str:
    """``classes/0003``: 4 digits, 5 above 9999 classes (the atlas format)."""
    return f"classes/{index:0{5 if n_classes > 9999 else 4}d}"


# ---------------------------------------------------------------------------------------------- pure functions
def fit_dictionary(
    latents: Tensor, n_concepts: int, dictionary: str = "nmf", options: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor]:
    """``(W [r, c], U [n, h, w, r])`` with ``A[i, :, y, x] ~= U[i, y, x] W`` (module docstring)."""
    n, channels, height, width = latents.shape
    samples = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    factorizer = make_dictionary(dictionary, n_concepts, **(options or {}))
    codes = factorizer.fit_transform(samples)
    return factorizer.dictionary_, codes.reshape(n, height, width, n_concepts)


def linear_head(latent_to_logit: Callable[[Tensor], Tensor], latent_shape: Sequence[int]) -> Tensor | None:
    """``V`` [K, c] with ``latent_to_logit(A) = mean_p(A) V^T + b`` when the head is linear after average pooling
    (checked on random activations), else None.

    ``V`` is the weight of the head's last ``nn.Linear`` (or ``[V, -V]`` after a sign split).
    """
    linears = [m for m in latent_to_logit.modules() if isinstance(m, nn.Linear)] if isinstance(
        latent_to_logit, nn.Module) else []
    if not linears:
        return None
    weight, bias = linears[-1].weight.detach(), linears[-1].bias
    channels = latent_shape[0]
    candidates = [weight] if weight.shape[1] == channels else []
    if 2 * weight.shape[1] == channels:
        candidates.append(torch.cat([weight, -weight], dim=1))
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(3, *latent_shape, generator=generator).to(weight)
    with torch.no_grad():
        logits = latent_to_logit(probe)
        for candidate in candidates:
            expected = probe.mean((2, 3)) @ candidate.T + (bias.detach() if bias is not None else 0)
            if logits.shape == expected.shape and torch.allclose(logits, expected, rtol=1e-3, atol=1e-4):
                return candidate
    return None


@dataclass
class ClassConcepts:
    """The concepts of one class: ``atoms`` [r, c], ``codes`` [n, h, w, r], ``importance`` [r] (sums to 1),
    ``logit_share`` [r] or None, ``order`` (concept ids by decreasing importance)."""

    atoms: Tensor
    codes: Tensor
    importance: Tensor
    logit_share: Tensor | None
    order: list[int]


def class_concepts(
    latents: Tensor,
    latent_to_logit: Callable[[Tensor], Tensor],
    class_id: int,
    n_concepts: int,
    dictionary: str = "nmf",
    dictionary_options: dict[str, Any] | None = None,
    nb_design: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    head: Tensor | None = None,
) -> ClassConcepts:
    """Dictionary, importance and logit share of a class from its activations [n, c, h, w] (module docstring).

    Runs in float32 even under an enclosing autocast (``--trainer.precision bf16-mixed``, meant for the network
    passes of stages 1 and MACO): a dictionary fitted in bfloat16 would lose the small coefficients."""
    with torch.autocast(latents.device.type, enabled=False):
        return _class_concepts(latents.float(), latent_to_logit, class_id, n_concepts, dictionary,
                               dictionary_options, nb_design, seed, batch_size, head)


def _class_concepts(
    latents: Tensor, latent_to_logit: Callable[[Tensor], Tensor], class_id: int, n_concepts: int, dictionary: str,
    dictionary_options: dict[str, Any] | None, nb_design: int, seed: int, batch_size: int, head: Tensor | None,
) -> ClassConcepts:
    atoms, codes = fit_dictionary(latents, n_concepts, dictionary, dictionary_options)
    with torch.no_grad():
        if head is None:
            sobol = concept_importance(codes, atoms, latent_to_logit, class_id, nb_design=nb_design, seed=seed,
                                       batch_size=batch_size)
        else:  # linear head after pooling: pool the masked codes first (module docstring)
            vector = head[class_id].to(atoms)
            bias = latent_to_logit(torch.zeros_like(latents[:1]))[0, class_id].to(atoms)

            def class_logit(pooled: Tensor) -> Tensor:
                return (pooled @ vector + bias)[:, None]

            sobol = concept_importance(codes.mean((1, 2)), atoms, class_logit, 0, nb_design=nb_design, seed=seed,
                                       batch_size=batch_size * codes.shape[1] * codes.shape[2])  # the same memory
    importance = torch.nan_to_num(sobol.float(), nan=0.0).clamp_min(0).mean(0)
    importance = importance / importance.sum() if importance.sum() > 0 else torch.full_like(importance, 1 / n_concepts)
    share = None
    if head is not None:
        contribution = codes.mean((1, 2)).sum(0) * (atoms @ head[class_id].to(atoms))
        total = contribution.sum()
        share = contribution / total if total.abs() > 0 else None
    order = sorted(range(n_concepts), key=lambda k: (-float(importance[k]), k))
    return ClassConcepts(atoms, codes, importance, share, order)


def concept_map_2d(codes: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(xy [n, 2] in [-1, 1], dominant [n])``: PCA of the images' mean coefficients (rows L1-normalised), signs
    fixed so that each axis's largest loading is positive; the dominant concept of each image, the largest
    ``mean coefficient x weights`` (``weights`` [r]: e.g. each concept's weight in the class logit; default 1)."""
    pooled = codes.mean((1, 2)).float()
    dominant = (pooled * (weights.float().cpu() if weights is not None else 1)).argmax(1)
    profiles = pooled / pooled.sum(1, keepdim=True).clamp_min(1e-12)
    centred = profiles - profiles.mean(0)
    if centred.shape[0] < 2 or float(centred.abs().max()) == 0:
        return torch.zeros(pooled.shape[0], 2), dominant
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    axes = vh[:2].T.float()  # [r, <=2]
    axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    xy = centred @ axes
    if xy.shape[1] < 2:
        xy = torch.cat([xy, torch.zeros(xy.shape[0], 1)], 1)
    return xy / xy.abs().amax(0).clamp_min(1e-12), dominant


def crop_box(location: tuple[int, int], grid: tuple[int, int], size: tuple[int, int], side: int) -> tuple[int, ...]:
    """``(top, left, bottom, right)`` of a ``side`` square centred on a latent cell, inside the image."""
    (y, x), (gh, gw), (height, width) = location, grid, size
    side = min(side, height, width)
    cy, cx = (y + 0.5) * height / gh, (x + 0.5) * width / gw
    top = int(min(max(round(cy - side / 2), 0), height - side))
    left = int(min(max(round(cx - side / 2), 0), width - side))
    return top, left, top + side, left + side


def top_locations(codes: Tensor, concept: int, count: int) -> list[tuple[int, int, int]]:
    """``(image, y, x)`` of the ``count`` images where ``concept`` peaks highest (one per image, value > 0)."""
    values = codes[..., concept].flatten(1)  # [n, h w]
    peak, where = values.max(1)
    chosen = [i for i in peak.argsort(descending=True, stable=True).tolist() if peak[i] > 0][:count]
    width = codes.shape[2]
    return [(i, int(where[i]) // width, int(where[i]) % width) for i in chosen]


def heat_overlay(image: Tensor, heat: Tensor) -> Tensor:
    """``image`` [3, H, W] in [0, 1] dimmed, with ``heat`` [H, W] in [0, 1] in the inferno colours on top."""
    from matplotlib import colormaps

    colours = torch.from_numpy(colormaps["inferno"](heat.clamp(0, 1).cpu().numpy())[..., :3]).permute(2, 0, 1)
    alpha = heat.clamp(0, 1)[None].cpu() * 0.8
    return (image.cpu() * 0.6 * (1 - alpha) + colours.float() * alpha).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- stage 2 module
@dataclass
class ConceptOptions:
    """The stage-2 options of the atlas CLI (see ``explain.atlas.cli``)."""

    n_concepts: int = 10
    dictionary: str = "nmf"
    dictionary_options: dict[str, Any] | None = None
    nb_design: int = 32
    n_crops: int = 10
    n_maps: int = 3
    n_thumbs: int = 24
    maco_steps: int | None = None  # None: 256 on a GPU (as Xplique), 16 on a CPU
    maco_crops: int | None = None  # None: 32 on a GPU (as Xplique), 4 on a CPU
    maco_size: int | None = None  # side of the optimised image; None: the input side
    maco_input_size: int | None = None  # side of the crops fed to the model; None: the input side
    maco_batch: int | None = None  # most crops in one MACO network pass (whole concepts, balanced); None: 256 on a
    # GPU, one concept's crops on a CPU (memory: a pass of 32 crops of ResNet-50 at 224 px holds ~4 GB for backward)
    seed: int = 0
    batch_size: int = 64


class ConceptPredictor(L.LightningModule):
    """``predict_step`` on a batch of class indices: each class's folder (module docstring), written atomically.

    Args:
        input_to_latent, latent_to_logit: the split model (``input_to_latent`` takes normalised inputs).
        root: the atlas folder; ``stage1``: its stage-1 folder.
        class_rows: class index -> its stage-1 rows (the images kept for it).
        class_names: class index -> name.
        dataset: the stage-1 dataset (``dataset[i]["image"]``, ``dataset.source(i)``) to cut crops from.
        mean, std: the normalisation of the inputs, undone for pictures and applied to MACO's images.
        options: :class:`ConceptOptions`.
    """

    def __init__(
        self, input_to_latent: nn.Module, latent_to_logit: nn.Module, root: Path, stage1: Path,
        class_rows: dict[int, list[dict[str, Any]]], class_names: dict[int, str], n_classes: int, dataset: Any,
        mean: Sequence[float], std: Sequence[float], options: ConceptOptions,
    ) -> None:
        super().__init__()
        self.input_to_latent, self.latent_to_logit = input_to_latent, latent_to_logit
        self.root, self.stage1, self.class_rows, self.class_names = Path(root), Path(stage1), class_rows, class_names
        self.n_classes, self.dataset, self.options = n_classes, dataset, options
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None], persistent=False)
        self._head: Tensor | None | bool = False  # False: not probed yet

    @property
    def maco_steps(self) -> int:
        if self.options.maco_steps is not None:
            return self.options.maco_steps
        return 256 if self.device.type == "cuda" else 16

    @property
    def maco_crops(self) -> int:
        if self.options.maco_crops is not None:
            return self.options.maco_crops
        return 32 if self.device.type == "cuda" else 4

    def concepts_per_pass(self, n_concepts: int) -> int:
        """Concepts whose MACO crops share a network pass: at most ``maco_batch`` crops (default 256 on a GPU; on a
        CPU one concept per pass, which measured faster than batching there: BENCHMARKS, bench_atlas.py), in passes
        of equal size (10 concepts of 32 crops: 2 passes of 5 concepts)."""
        limit = self.options.maco_batch or (256 if self.device.type == "cuda" else self.maco_crops)
        per_pass = max(1, min(n_concepts, limit // self.maco_crops))
        return math.ceil(n_concepts / math.ceil(n_concepts / per_pass))

    def display(self, index: int) -> Tensor:
        """Image ``index`` of the data as a picture [3, H, W] in [0, 1] (the normalisation undone)."""
        image = self.dataset[index]["image"].float()
        return (image * self.std.cpu() + self.mean.cpu()).clamp(0, 1)

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        for class_id in batch.tolist():
            if not (self.root / class_folder(class_id, self.n_classes) / "class.json").is_file():
                self.write_class(class_id)
        return batch  # the classes done (Lightning warns about a None prediction)

    def write_class(self, class_id: int) -> Path:
        from explain.atlas.activations import load_latents

        options, rows = self.options, self.class_rows[class_id]
        final = self.root / class_folder(class_id, self.n_classes)
        folder = final.parent / f".{final.name}.tmp-{self.global_rank}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        relative = Path(class_folder(class_id, self.n_classes))
        latents = load_latents(self.stage1, rows).to(self.device)
        if self._head is False:
            self._head = linear_head(self.latent_to_logit, tuple(latents.shape[1:]))
        result = class_concepts(
            latents, self.latent_to_logit, class_id, options.n_concepts, options.dictionary,
            options.dictionary_options, options.nb_design, options.seed, options.batch_size, self._head,
        )
        codes = result.codes.float().cpu()
        pictures: dict[int, Tensor] = {}

        def picture(position: int) -> Tensor:
            if position not in pictures:
                pictures[position] = self.display(rows[position]["index"])
            return pictures[position]

        size = tuple(picture(0).shape[-2:])
        side = max(default_patch_size(size), math.ceil(size[0] / codes.shape[1]))
        by_logit = sorted(range(len(rows)), key=lambda i: (-rows[i]["logit"], rows[i]["index"]))
        map_images = by_logit[: options.n_maps]
        for position in map_images:
            write_png(folder / f"image_{position:03d}.png", picture(position))
        macos = None
        if self.maco_steps > 0:
            spectrum = torch.stack([picture(i) for i in range(min(len(rows), SPECTRUM_IMAGES))])
            macos = self.maco_images(result.atoms, spectrum, size)
        scale = codes.flatten(0, 2).amax(0).clamp_min(1e-12)  # [r]: maps comparable across the class's images
        concepts = []
        for rank, k in enumerate(result.order):
            crops = []
            for j, (i, y, x) in enumerate(top_locations(codes, k, options.n_crops)):
                top, left, bottom, right = crop_box((y, x), codes.shape[1:3], size, side)
                write_png(folder / f"concept_{k:02d}_crop_{j:02d}.png", picture(i)[:, top:bottom, left:right])
                crops.append((relative / f"concept_{k:02d}_crop_{j:02d}.png").as_posix())
            maps = []
            for position in map_images:
                heat = F.interpolate(codes[position, :, :, k][None, None] / scale[k], size=size, mode="bilinear",
                                     align_corners=False)[0, 0]
                name = f"concept_{k:02d}_map_{position:03d}.png"
                write_png(folder / name, heat_overlay(picture(position), heat))
                maps.append({"image": (relative / f"image_{position:03d}.png").as_posix(),
                             "map": (relative / name).as_posix(),
                             "source": self.dataset.source(rows[position]["index"])})
            maco_name = None
            if macos is not None:
                write_png(folder / f"concept_{k:02d}_maco.png", macos[k])
                maco_name = (relative / f"concept_{k:02d}_maco.png").as_posix()
            concepts.append({
                "id": k, "rank": rank, "importance": float(result.importance[k]),
                "logit_share": None if result.logit_share is None else float(result.logit_share[k]),
                "maco": maco_name, "crops": crops, "maps": maps, "nearest": [],
            })
        # dominant concept: the largest contribution to the class logit (linear head), else to the activations
        weights = result.atoms @ self._head[class_id].to(result.atoms) if self._head is not None \
            else result.atoms.norm(dim=1)
        xy, dominant = concept_map_2d(codes, weights)
        images = []
        for position, row in enumerate(rows):
            entry = {"source": self.dataset.source(row["index"]), "x": float(xy[position, 0]),
                     "y": float(xy[position, 1]), "dominant": int(dominant[position])}
            if position < options.n_thumbs:
                thumb = F.interpolate(picture(position)[None], size=(48, 48), mode="bilinear", antialias=True,
                                      align_corners=False)[0]
                write_png(folder / f"thumb_{position:03d}.png", thumb)
                entry["thumb"] = (relative / f"thumb_{position:03d}.png").as_posix()
            images.append(entry)
        write_tensors(folder / "dictionary.pt", {
            "atoms": result.atoms.float().cpu(), "codes": codes.to(torch.float16),
            "importance": result.importance.cpu(), "indices": [row["index"] for row in rows],
            "sources": [e["source"] for e in images],
        })
        write_json(folder / "class.json", {
            "index": class_id, "name": self.class_names.get(class_id, f"class {class_id}"), "n_images": len(rows),
            "logit_share_available": result.logit_share is not None, "concepts": concepts, "images": images,
        })
        try:
            folder.rename(final)
        except OSError:  # the same class finished on another rank meanwhile (DistributedSampler pads with repeats)
            shutil.rmtree(folder, ignore_errors=True)
        return final

    def maco_images(self, atoms: Tensor, spectrum_images: Tensor, size: tuple[int, int]) -> Tensor:
        """MACO images [r, 3, S, S] of the concept directions ``atoms`` [r, c] at the layer, in one batched run,
        the magnitude taken from ``spectrum_images`` [n, 3, H, W] in [0, 1] (module docstring)."""
        from explain.featureviz import concept_directions, maco_batch, magnitude_spectrum

        options = self.options
        maco_size = options.maco_size or size[0]
        magnitude = magnitude_spectrum(spectrum_images, image_size=maco_size)
        mean, std, features = self.mean, self.std, self.input_to_latent

        class Normalised(nn.Module):  # MACO optimises images in [0, 1]; the model reads normalised ones
            def __init__(self) -> None:
                super().__init__()
                self.features = features

            def forward(self, x: Tensor) -> Tensor:
                return self.features((x - mean) / std)

        images, _ = maco_batch(concept_directions(Normalised(), atoms), atoms.shape[0], maco_size,
                               steps=self.maco_steps, magnitude=magnitude, crops_per_step=self.maco_crops,
                               seeds=options.seed, device=self.device, input_size=options.maco_input_size or size,
                               images_per_pass=self.concepts_per_pass(atoms.shape[0]))
        return images
