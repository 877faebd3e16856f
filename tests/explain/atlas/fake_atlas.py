"""Fake atlases on disk, written exactly as the atlas format describes (atlas.json, classes/NNNN/class.json, PNGs),
for the tests of the site. Images are small PNGs drawn with PIL: a coloured texture per concept (the "MACO"), tinted
crops, thumbnails (one of them WebP), and semi-transparent heat-map overlays.

Class 1 is hostile: its name, its image sources and a nearest-concept name hold HTML and script that must render as
text. One crop file name holds a space and a ``#`` (which a URL must encode). The last class is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HOSTILE_NAME = "<script>alert(1)</script><img src=x onerror=alert(2)>"
HOSTILE_SOURCE = '"><img src=y onerror=alert(3)>.jpg'
NAMES = ("tabby cat", HOSTILE_NAME, "lynx", "golden retriever", "fire truck", "espresso", "coral reef", "volcano")


def class_name(index: int) -> str:
    return NAMES[index] if index < len(NAMES) else f"class {index:04d} synthetic"


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path.as_posix()


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth texture: sinusoidal stripes of one random hue over a pale ground."""
    y, x = np.mgrid[0:size, 0:size] / size
    f = rng.uniform(1, 4, size=2)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * x + f[1] * y) + rng.uniform(0, 2 * np.pi))
    hue = rng.uniform(0.15, 0.85, size=3)
    return (255 * (0.92 - wave[..., None] * (0.92 - hue))).astype(np.uint8)


def _overlay(rng: np.random.Generator, size: int) -> np.ndarray:
    """A red heat blob with alpha: an attribution map drawn over its image."""
    y, x = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    heat = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.03)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (80 * (1 - heat)).astype(np.uint8)
    rgba[..., 3] = (200 * heat).astype(np.uint8)
    return rgba


def _images(root: Path, folder: str, rng: np.random.Generator, n_concepts: int, size: int) -> dict[str, Any]:
    """Write the PNGs of one class; return their atlas-relative paths."""
    base = root / "classes" / folder
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    out: dict[str, Any] = {"maco": [], "crops": [], "maps": [], "thumbs": []}
    photos = [_texture(rng, size) for _ in range(3)]
    for i, photo in enumerate(photos):
        name = f"image_{i:02d}.webp" if i == 2 else f"image_{i:02d}.png"  # the format allows WebP too
        _png(base / name, photo)
        out["thumbs"].append(rel(base / name))
    for k in range(n_concepts):
        texture = _texture(rng, size)
        _png(base / f"concept_{k:02d}_maco.png", texture)
        out["maco"].append(rel(base / f"concept_{k:02d}_maco.png"))
        crops = []
        for j in range(4):
            name = f"concept_{k:02d}_crop {j}#.png" if (k, j) == (0, 1) else f"concept_{k:02d}_crop_{j:02d}.png"
            y, x = rng.integers(0, size // 2, size=2)
            _png(base / name, np.ascontiguousarray(texture[y : y + size // 2, x : x + size // 2]))
            crops.append(rel(base / name))
        out["crops"].append(crops)
        maps = []
        for i in range(2):
            _png(base / f"concept_{k:02d}_map_{i:02d}.png", _overlay(rng, size))
            maps.append({"image": out["thumbs"][i], "map": rel(base / f"concept_{k:02d}_map_{i:02d}.png")})
        out["maps"].append(maps)
    return out


def _class_json(index: int, images: dict[str, Any], rng: np.random.Generator, n_concepts: int, n_images: int,
                done: list[int]) -> dict[str, Any]:
    importance = np.sort(rng.dirichlet(np.full(n_concepts, 1.5)))[::-1]
    logit = rng.dirichlet(np.full(n_concepts, 1.5))
    ids = rng.permutation(n_concepts).tolist()  # ids are not ranks
    others = [c for c in done if c != index]
    concepts = []
    for rank, concept_id in enumerate(ids):
        source = HOSTILE_SOURCE if index == 1 else "photos/img_{}.jpg"
        concepts.append({
            "id": concept_id,
            "rank": rank,
            "importance": round(float(importance[rank]), 4),
            "logit_share": round(float(logit[rank]), 4),
            "maco": images["maco"][concept_id],
            "crops": images["crops"][concept_id],
            "maps": [m | {"source": source.format(i)} for i, m in enumerate(images["maps"][concept_id])],
            "nearest": [
                {"class_index": c, "class_name": class_name(c), "concept": int(rng.integers(n_concepts)),
                 "cosine": round(float(rng.uniform(0.5, 0.95)), 3)}
                for c in others[:3]
            ],
        })
    centres = {concept_id: rng.normal(0, 3, size=2) for concept_id in ids}
    points = []
    for i in range(n_images):
        dominant = ids[min(int(rng.exponential(2)), n_concepts - 1)]
        x, y = centres[dominant] + rng.normal(0, 0.7, size=2)
        source = HOSTILE_SOURCE if index == 1 else f"photos/img_{i}.jpg"
        point = {"source": source, "x": round(float(x), 3), "y": round(float(y), 3), "dominant": dominant}
        if i < len(images["thumbs"]):
            point["thumb"] = images["thumbs"][i]
        points.append(point)
    return {"index": index, "name": class_name(index), "n_images": n_images, "logit_share_available": True,
            "concepts": concepts, "images": points}


def write_fake_atlas(root: Path, n_classes: int = 4, n_concepts: int = 4, n_images: int = 24, seed: int = 0,
                     shared_images: bool = False, title: str = "Fake atlas") -> dict[str, Any]:
    """Write an atlas of ``n_classes`` classes into ``root``; the last one is skipped. Returns the manifest.

    ``shared_images``: every class links the PNGs of class 0 (a 1000-class atlas in a second).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    done = list(range(n_classes - 1))
    entries = []
    images = None
    for index in done:
        folder = f"{index:04d}"
        if images is None or not shared_images:
            images = _images(root, folder, rng, n_concepts, size=64)
        data = _class_json(index, images, rng, n_concepts, n_images, done)
        path = root / "classes" / folder / "class.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        entries.append({"index": index, "name": data["name"], "n_images": n_images, "n_concepts": n_concepts,
                        "status": "done"})
    skipped = n_classes - 1
    entries.append({"index": skipped, "name": class_name(skipped), "n_images": 2, "n_concepts": 0,
                    "status": "skipped", "reason": f"2 images, fewer than the {n_concepts} concepts"})
    manifest = {
        "format": "aligned-vision-atlas/1",
        "title": title,
        "model": {"spec": "timm:resnet18", "weights": None, "fingerprint": "0123456789abcdef" * 4},
        "layer": "layer4",
        "image_size": 224,
        "n_concepts": n_concepts,
        "dictionary": "nmf",
        "classes": entries,
    }
    (root / "atlas.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_fake_comparison(root: Path, a: Path, b: Path, threshold: float = 0.5, match: str = "atoms") -> dict[str, Any]:
    """Write a comparison of the fake atlases ``a`` and ``b`` (same classes) into ``root``: per class, the concepts
    of A and B are paired in order of id, the last of A vanished and the last of B appeared."""
    root = Path(root)
    manifest = {"format": "aligned-vision-atlas-compare/1", "threshold": threshold, "match": match, "classes": [],
                "a": {"path": "../" + Path(a).name, "title": "Baseline"},
                "b": {"path": str(Path(b).resolve()), "title": "Harmonized"}}
    for entry in json.loads((Path(a) / "atlas.json").read_text())["classes"]:
        if entry["status"] != "done":
            continue
        folder = f"{entry['index']:04d}"
        concepts = {side: {c["id"]: c for c in json.loads((Path(p) / "classes" / folder / "class.json").read_text())
                           ["concepts"]} for side, p in (("a", a), ("b", b))}
        ids = sorted(concepts["a"])
        matched = [{"a": k, "b": k, "cosine": 0.9 - 0.05 * k, "importance_a": concepts["a"][k]["importance"],
                    "importance_b": concepts["b"][k]["importance"],
                    "shift": round(concepts["b"][k]["importance"] - concepts["a"][k]["importance"], 4)}
                   for k in ids[:-1]]
        data = {"index": entry["index"], "name": entry["name"], "threshold": threshold, "match": match,
                "matched": matched,
                "lost": [{"a": ids[-1], "importance_a": concepts["a"][ids[-1]]["importance"], "best_cosine": 0.2}],
                "born": [{"b": ids[-1], "importance_b": concepts["b"][ids[-1]]["importance"], "best_cosine": None}]}
        path = root / "classes" / folder / "compare.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        manifest["classes"].append({"index": entry["index"], "name": entry["name"], "matched": len(matched),
                                    "born": 1, "lost": 1})
    (root / "compare.json").write_text(json.dumps(manifest, indent=1))
    return manifest
