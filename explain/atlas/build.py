"""The atlas's three stages, run in order, each skipped when already done (resume after a kill):

1. activations and logits (``explain.atlas.activations``), resumed after the batches every process finished;
2. the concepts of each class (``explain.atlas.concepts``), skipping the classes whose folder is complete; then,
   on rank 0, the nearest concepts of other classes and the final ``atlas.json``;
3. the site (``explain.atlas.site.render_site``), on rank 0.

An output folder that holds the atlas of another model, layer or concept setting is refused (its ``atlas.json``
says whose it is), so a resumed run never mixes two atlases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Subset

from explain.atlas.activations import (
    ActivationWriter,
    LatentPredictor,
    class_rows,
    read_index,
    resume_batches,
    stage1_done,
    stage1_setting,
)
from explain.atlas.concepts import ConceptOptions, ConceptPredictor, check_dictionary, class_folder
from explain.atlas.links.nearest import MAX_NEAREST, load_atoms, nearest_concepts
from explain.atlas.models import LoadedModel
from explain.atlas.storage import write_json
from explain.concepts import split_model

FORMAT = "aligned-vision-atlas/1"
#: the atlas.json keys that must match for a run to resume (or add to) an existing atlas
IDENTITY = ("model", "layer", "sign_split", "image_size", "n_concepts", "dictionary", "dictionary_options",
            "max_images")


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    identity = {key: manifest.get(key) for key in IDENTITY}
    identity["model"] = {"spec": manifest["model"]["spec"], "fingerprint": manifest["model"]["fingerprint"]}
    return identity


def check_output(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse ``root`` when it holds another atlas, or files that are no atlas.

    Raises:
        ValueError: naming the folder, what differs, and what to do.
    """
    path = root / "atlas.json"
    if not path.is_file():
        others = sorted(p.name for p in root.iterdir() if p.name not in ("config.yaml", "stage1")) if root.is_dir() \
            else []
        if others:
            raise ValueError(f"output folder {root} is not empty and holds no atlas.json ({others[:5]}): choose an "
                             "empty or new folder")
        return
    try:
        existing = json.loads(path.read_text())
        old = _identity(existing)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"output folder {root}: its atlas.json is unreadable ({error}); delete the folder or "
                         "choose another") from error
    new = _identity(manifest)
    if old != new:
        differences = [f"{key}: {old[key]!r} there, {new[key]!r} now" for key in IDENTITY if old[key] != new[key]]
        raise ValueError(
            f"output folder {root} already holds the atlas of another model or setting "
            f"({'; '.join(differences)}): choose another --out, or delete that folder to rebuild it"
        )


def build_atlas(
    loaded: LoadedModel,
    dataset: Any,
    root: str | Path,
    make_trainer: Callable[[list[L.Callback]], L.Trainer],
    *,
    layer: str | None = None,
    sign_split: bool = False,
    max_images: int = 64,
    batch_size: int = 32,
    num_workers: int = 0,
    classes: list[int] | None = None,
    class_names: dict[int, str] | None = None,
    title: str | None = None,
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
    concept_options: ConceptOptions | None = None,
    render: bool = True,
    config_text: str | None = None,
) -> Path | None:
    """Build (or resume) the atlas of ``loaded.network`` on ``dataset`` in ``root``; every rank calls it.

    ``config_text``: the run's configuration, written to ``config.yaml`` (rank 0) once the folder is accepted.
    ``make_trainer(callbacks)`` builds a ``Trainer`` (the CLI's ``--trainer.*``); ``dataset`` yields
    ``{"image", "index", "ok"}`` and has ``source(index)`` (``explain.atlas.data``). Returns the site's index on
    rank 0 (the atlas folder when the site is not rendered), None on the other ranks.
    """
    options = concept_options or ConceptOptions()
    check_dictionary(options.dictionary, options.dictionary_options)
    root = Path(root)
    stage1 = root / "stage1"
    input_to_latent, latent_to_logit = split_model(loaded.network, at=layer, sign_split=sign_split)
    image_size = int(dataset[0]["image"].shape[-1])
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "title": title or f"{loaded.spec}",
        "model": {"spec": loaded.spec, "weights": loaded.weights, "fingerprint": loaded.fingerprint},
        "layer": layer_name(input_to_latent), "sign_split": sign_split, "image_size": image_size, "n_concepts": options.n_concepts,
        "dictionary": options.dictionary, "dictionary_options": options.dictionary_options or {},
        "max_images": max_images, "classes": [],
    }
    check_output(root, manifest)

    # ------------------------------------------------------------------ stage 1
    if stage1_done(stage1):
        rank_zero_info(f"atlas: stage 1 already done in {stage1}, reusing it")
    else:
        writer = ActivationWriter(stage1, max_images)
        trainer = make_trainer([writer])
        writer.setting = stage1_setting(trainer.world_size, batch_size, len(dataset), max_images)
        writer.start_batch = resume_batches(stage1, writer.setting)
        start = writer.start_batch * batch_size * trainer.world_size
        if start:
            rank_zero_info(f"atlas: stage 1 resumes at image {start} of {len(dataset)} ({writer.start_batch} "
                           "batch(es) per process done)")
        if trainer.is_global_zero and not (root / "atlas.json").is_file():
            write_json(root / "atlas.json", manifest)
        loader = DataLoader(Subset(dataset, range(start, len(dataset))) if start else dataset,
                            batch_size=batch_size, num_workers=num_workers, shuffle=False)
        trainer.predict(LatentPredictor(input_to_latent, latent_to_logit), loader, return_predictions=False)

    by_class, unreadable = read_index(stage1)
    if unreadable:
        files = [dataset.source(i) for i in unreadable]
        rank_zero_warn(f"atlas: {len(files)} unreadable image(s) skipped: {', '.join(files[:10])}"
                       + (" ..." if len(files) > 10 else "") + " (listed in atlas.json's 'unreadable')")
    n_classes = _n_classes(latent_to_logit, by_class, dataset)
    names = {c: (class_names or {}).get(c, f"class {c}") for c in range(n_classes)}
    wanted = sorted(set(classes) if classes is not None else set(by_class))
    rows = {c: class_rows(by_class.get(c, []), max_images) for c in wanted}
    skipped = {}
    for c in wanted:
        if not rows[c]:
            skipped[c] = "no image is predicted as this class"
        elif len(rows[c]) < options.n_concepts:
            skipped[c] = f"{len(rows[c])} image(s) predicted as this class, fewer than the {options.n_concepts} concepts"
    if skipped:
        listed = "; ".join(f"{c} ({names[c]}): {reason}" for c, reason in list(skipped.items())[:20])
        rank_zero_warn(f"atlas: {len(skipped)} class(es) skipped: {listed}" + (" ..." if len(skipped) > 20 else ""))
    todo = [c for c in wanted if c not in skipped
            and not (root / class_folder(c, n_classes) / "class.json").is_file()]

    # ------------------------------------------------------------------ stage 2
    module = ConceptPredictor(input_to_latent, latent_to_logit, root, stage1, {c: rows[c] for c in wanted},
                              names, n_classes, dataset, mean, std, options)
    trainer = make_trainer([])
    if trainer.is_global_zero and config_text is not None:
        (root / "config.yaml").write_text(config_text)
    if todo:
        rank_zero_info(f"atlas: stage 2, {len(todo)} class(es) to do, {len(wanted) - len(todo) - len(skipped)} done")
        trainer.predict(module, DataLoader(torch.tensor(todo), batch_size=1), return_predictions=False)
        trainer.strategy.barrier("atlas-stage2")
    if not trainer.is_global_zero:
        return None

    # ------------------------------------------------------------------ links and manifest (rank 0)
    done = {c: class_folder(c, n_classes) for c in wanted if c not in skipped}
    missing = [c for c in done if not (root / done[c] / "class.json").is_file()]
    if missing:
        raise RuntimeError(f"atlas: classes {missing[:10]} have no class.json after stage 2")
    add_nearest(root, done, names)
    manifest["classes"] = [
        {"index": c, "name": names[c], "n_images": len(rows[c]), "n_concepts": 0 if c in skipped else options.n_concepts,
         "status": "skipped" if c in skipped else "done", **({"reason": skipped[c]} if c in skipped else {})}
        for c in wanted
    ]
    manifest["unreadable"] = [dataset.source(i) for i in unreadable]
    manifest["concept_options"] = asdict(options)
    write_json(root / "atlas.json", manifest)

    # ------------------------------------------------------------------ stage 3
    if not render:
        return root
    return render_site(root)


def render_site(root: Path) -> Path:
    """Stage 3 (the site helper's ``explain.atlas.site.render_site``)."""
    try:
        from explain.atlas.site import render_site as render
    except ImportError as error:
        rank_zero_warn(f"atlas: the site renderer is not available ({error}); the JSON is in {root}")
        return root
    return render(root)


def add_nearest(root: Path, folders: dict[int, str], names: dict[int, str]) -> None:
    """Fill the ``nearest`` list of every concept of every class (cosine of atoms, other classes only)."""
    atoms, owners, ids = load_atoms(root, folders)
    if atoms.numel() == 0:
        return
    cosines, neighbours = nearest_concepts(atoms, owners, MAX_NEAREST)
    position = 0
    for class_id, folder in sorted(folders.items()):
        path = root / folder / "class.json"
        data = json.loads(path.read_text())
        count = int((owners == class_id).sum())
        by_id = {concept["id"]: concept for concept in data["concepts"]}
        for row in range(position, position + count):
            by_id[int(ids[row])]["nearest"] = [
                {"class_index": int(owners[j]), "class_name": names.get(int(owners[j]), f"class {int(owners[j])}"),
                 "concept": int(ids[j]), "cosine": round(float(value), 6)}
                for value, j in zip(cosines[row].tolist(), neighbours[row].tolist()) if j >= 0 and round(value, 6) > 0
            ]
        position += count
        write_json(path, data)


def layer_name(input_to_latent: torch.nn.Module) -> str:
    """The name of the layer the atlas reads: the last child of ``input_to_latent`` (``forward_features`` for timm)."""
    names = [name for name, _ in input_to_latent.named_children() if name != "sign_split"]
    return "forward_features" if names == ["features"] and not isinstance(input_to_latent[0], torch.nn.Sequential) \
        else names[-1]


def _n_classes(latent_to_logit: Any, by_class: dict[int, Any], dataset: Any) -> int:
    linears = [m for m in latent_to_logit.modules() if isinstance(m, torch.nn.Linear)] \
        if isinstance(latent_to_logit, torch.nn.Module) else []
    if linears:
        return linears[-1].out_features
    return max(by_class, default=0) + 1
