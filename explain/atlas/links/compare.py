"""What changed between two atlases of the same classes (e.g. a baseline and a harmonized checkpoint).

For each class in both atlases, the concepts of A (``r_a``) and of B (``r_b``) are compared by a cosine matrix
``S`` [r_a, r_b] and matched one to one by the Hungarian assignment maximising the total cosine
(``scipy.optimize.linear_sum_assignment``). A pair with ``S >= threshold`` is *matched* (with the importance shift
``importance_b - importance_a``); a concept of A left without a match is *lost*, one of B is *born*.

``match="atoms"``: ``S`` is the cosine of the atoms (rows of ``W``), meaningful when both networks share their
channels (a checkpoint and its fine-tuned version). ``match="maps"``: ``S`` is the cosine of the concepts'
coefficient maps ``U[..., k]`` concatenated over the images that both atlases hold for the class (same source
file), which compares *where* the concepts fire and needs no shared channels (two independently trained networks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from explain.atlas.storage import write_json
from explain.validation import in_interval, one_of

FORMAT = "aligned-vision-atlas-compare/1"
MATCHES = ("atoms", "maps")


def match_concepts(similarity: Tensor, threshold: float) -> tuple[list[tuple[int, int, float]], list[int], list[int]]:
    """``(matched [(a, b, cosine)], lost [a], born [b])`` from a cosine matrix [r_a, r_b] (module docstring)."""
    rows, cols = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    matched = [(int(a), int(b), float(similarity[a, b])) for a, b in zip(rows, cols) if similarity[a, b] >= threshold]
    lost = sorted(set(range(similarity.shape[0])) - {a for a, _, _ in matched})
    born = sorted(set(range(similarity.shape[1])) - {b for _, b, _ in matched})
    return matched, lost, born


def _codes_on_shared_images(bank_a: dict[str, Any], bank_b: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """The coefficient maps of both atlases on their shared images, on a common grid: ([r_a, m], [r_b, m])."""
    position_b = {source: i for i, source in enumerate(bank_b["sources"])}
    shared = [(i, position_b[s]) for i, s in enumerate(bank_a["sources"]) if s in position_b]
    if not shared:
        return None
    codes_a = bank_a["codes"].float()[[i for i, _ in shared]].permute(0, 3, 1, 2)  # [m, r, h, w]
    codes_b = bank_b["codes"].float()[[j for _, j in shared]].permute(0, 3, 1, 2)
    size = (max(codes_a.shape[2], codes_b.shape[2]), max(codes_a.shape[3], codes_b.shape[3]))
    codes_a = F.interpolate(codes_a, size=size, mode="bilinear", align_corners=False)
    codes_b = F.interpolate(codes_b, size=size, mode="bilinear", align_corners=False)
    return codes_a.transpose(0, 1).flatten(1), codes_b.transpose(0, 1).flatten(1)


def concept_similarity(bank_a: dict[str, Any], bank_b: dict[str, Any], match: str) -> Tensor:
    """Cosine matrix [r_a, r_b] of two classes' concepts (module docstring).

    Raises:
        ValueError: atoms of different sizes (use ``match="maps"``), or no shared image for ``"maps"``.
    """
    if match == "atoms":
        a, b = bank_a["atoms"].float(), bank_b["atoms"].float()
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"the atoms have {a.shape[1]} and {b.shape[1]} channels: the atlases are not of the "
                             "same layer; compare them with match='maps'")
    else:
        shared = _codes_on_shared_images(bank_a, bank_b)
        if shared is None:
            raise ValueError("the two atlases share no image of this class: match='maps' needs common images")
        a, b = shared
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def compare_class(class_a: dict, class_b: dict, bank_a: dict, bank_b: dict, threshold: float, match: str) -> dict:
    """The ``compare.json`` of one class (the atlas format)."""
    importance_a = {c["id"]: c["importance"] for c in class_a["concepts"]}
    importance_b = {c["id"]: c["importance"] for c in class_b["concepts"]}
    similarity = concept_similarity(bank_a, bank_b, match)
    matched, lost, born = match_concepts(similarity, threshold)
    return {
        "index": class_a["index"], "name": class_a["name"], "threshold": threshold, "match": match,
        "matched": [
            {"a": a, "b": b, "cosine": cosine, "importance_a": importance_a[a], "importance_b": importance_b[b],
             "shift": importance_b[b] - importance_a[a]}
            for a, b, cosine in sorted(matched, key=lambda m: -importance_a[m[0]])
        ],
        "lost": [{"a": a, "importance_a": importance_a[a], "best_cosine": float(similarity[a].max())}
                 for a in sorted(lost, key=lambda a: -importance_a[a])],
        "born": [{"b": b, "importance_b": importance_b[b], "best_cosine": float(similarity[:, b].max())}
                 for b in sorted(born, key=lambda b: -importance_b[b])],
    }


def _done_classes(root: Path) -> dict[int, dict]:
    path = root / "atlas.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an atlas: no atlas.json in it")
    manifest = json.loads(path.read_text())
    return manifest, {c["index"]: c for c in manifest["classes"] if c.get("status") == "done"}


def _class_dir(root: Path, index: int) -> Path:
    return next(p for p in (root / "classes" / f"{index:04d}", root / "classes" / f"{index:05d}") if p.is_dir())


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive
        return path.resolve().as_posix()


def compare_atlases(
    a: str | Path, b: str | Path, out: str | Path, threshold: float = 0.5, match: str = "atoms", render: bool = True
) -> Path:
    """Write ``out/compare.json`` and ``out/classes/NNNN/compare.json`` for the classes done in both atlases;
    render the comparison pages (``explain.atlas.site.render_comparison``). Returns the index page (or ``out``).

    Raises:
        FileNotFoundError: ``a`` or ``b`` is not an atlas.
        ValueError: a bad threshold or match, or atlases with no class in common.
    """
    in_interval("threshold", threshold, -1, 1)
    one_of("match", match, MATCHES)
    a, b, out = Path(a), Path(b), Path(out)
    manifest_a, classes_a = _done_classes(a)
    manifest_b, classes_b = _done_classes(b)
    common = sorted(set(classes_a) & set(classes_b))
    if not common:
        raise ValueError(f"atlases {a} and {b} have no finished class in common: nothing to compare")
    rows = []
    for index in common:
        folder_a, folder_b = _class_dir(a, index), _class_dir(b, index)
        class_a = json.loads((folder_a / "class.json").read_text())
        class_b = json.loads((folder_b / "class.json").read_text())
        bank_a = torch.load(folder_a / "dictionary.pt", map_location="cpu", weights_only=True)
        bank_b = torch.load(folder_b / "dictionary.pt", map_location="cpu", weights_only=True)
        try:
            result = compare_class(class_a, class_b, bank_a, bank_b, threshold, match)
        except ValueError as error:
            raise ValueError(f"class {index} ({class_a['name']}): {error}") from error
        write_json(out / "classes" / folder_a.name / "compare.json", result)
        rows.append({"index": index, "name": class_a["name"], "matched": len(result["matched"]),
                     "born": len(result["born"]), "lost": len(result["lost"])})
    write_json(out / "compare.json", {
        "format": FORMAT,
        "a": {"path": _relative(a, out), "title": manifest_a.get("title")},
        "b": {"path": _relative(b, out), "title": manifest_b.get("title")},
        "threshold": threshold, "match": match, "classes": rows,
        "only_a": sorted(set(classes_a) - set(classes_b)), "only_b": sorted(set(classes_b) - set(classes_a)),
    })
    if not render:
        return out
    try:
        from explain.atlas.site import render_comparison
    except ImportError:
        return out
    return render_comparison(out)
