"""Stage 3 of the atlas: a static site rendered from the atlas's JSON alone (Lens's class pages, generalised).

``render_site(root)`` writes ``index.html`` (every class: name, number of concepts and images, skipped ones with
their reason, a client-side search) and ``classes/NNNN/index.html`` per finished class (concepts ranked by importance
with their share of the logit, a 2D map of the images coloured by dominant concept, and one card per concept: MACO
image, top crops, attribution maps, nearest concepts of other classes). ``render_comparison(root)`` writes the
"what changed" pages of a comparison of two atlases.

The pages open from ``file://`` with no server and no network: all data is rendered into the HTML (browsers refuse
``fetch`` of a local JSON), images are linked by relative paths, CSS and JS are copied into ``assets/``. Every string
from the data goes through Jinja's autoescape, and image paths are checked by :mod:`explain.atlas.schema` (relative,
inside the atlas, existing) before they reach an attribute.
"""

from __future__ import annotations

import os
import uuid
import warnings
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from explain.atlas.schema import (
    AtlasFormatError,
    check_atlas,
    check_class,
    check_class_compare,
    check_compare,
    read_json,
)

__all__ = ["render_site", "render_comparison"]

# Tableau 10: distinguishable, colour-blind aware; concepts are coloured by rank, so the first is always blue.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
MAP_SIZE = (420, 300)
MAP_MARGIN = 12


def render_site(root: Path | str) -> Path:
    """Write the site of the atlas in ``root`` (``index.html``, ``classes/NNNN/index.html``, ``assets/``).

    Reads only ``atlas.json`` and ``classes/*/class.json``; re-running it rewrites the pages. Raises
    :class:`~explain.atlas.schema.AtlasFormatError` naming the file and field of the first JSON that does not follow
    the format. Returns the path of ``index.html``.
    """
    root = Path(root)
    atlas = check_atlas(read_json(root / "atlas.json", "atlas.json"))
    pages = _class_pages(atlas, root)
    env = _environment()
    common = _atlas_header(atlas)
    template = env.get_template("class.html.j2")
    for entry in atlas["classes"]:
        if entry["index"] in pages:
            data = _read_class(root, pages[entry["index"]], entry)
            html = template.render(up="../../", **common, **_class_view(data, pages, up="../../"))
            write_text(root / "classes" / pages[entry["index"]] / "index.html", html)
    rows = [_index_row(entry, pages) for entry in atlas["classes"]]
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "pending")}
    html = env.get_template("index.html.j2").render(up="", rows=rows, counts=counts | {"total": len(rows)}, **common)
    copy_assets(root)
    index = root / "index.html"
    write_text(index, html)  # last: an index never links to a page that a failed run did not write
    return index


#: what the cosine of a comparison is taken on, as the pages say it (compare.json's "match")
MATCHED_ON = {
    "atoms": "the cosine of their directions in the layer's channels (the atoms, rows of W)",
    "maps": "the cosine of their coefficient maps over the images both atlases hold for the class (where the "
            "concepts fire)",
}


def render_comparison(root: Path | str) -> Path:
    """Write the pages of the comparison in ``root`` (from ``compare.json`` and ``classes/*/compare.json``).

    Each class page shows the concepts matched between atlas A and atlas B with their importance shift, the ones that
    vanished (in A only) and the ones that appeared (in B only), with the MACO images and crops of both atlases,
    linked from their folders. Returns the path of ``index.html``.
    """
    root = Path(root)
    manifest = check_compare(read_json(root / "compare.json", "compare.json"))
    sides = {side: _Side.open(root, manifest[side], side) for side in ("a", "b")}
    folders = class_folders(root, "compare.json")
    env = _environment()
    template = env.get_template("compare_class.html.j2")
    rows = []
    for i, entry in enumerate(manifest["classes"]):
        folder = folders.get(entry["index"])
        if folder is None:
            raise AtlasFormatError(
                f"compare.json: classes[{i}]: no folder classes/{entry['index']:04d}/ holds the compare.json of "
                f"class {entry['index']} ({entry['name']!r})"
            )
        label = f"classes/{folder}/compare.json"
        data = check_class_compare(read_json(root / label, label), label)
        for key in ("index", "name"):
            if data[key] != entry[key]:
                raise AtlasFormatError(f"{label}: {key}: {data[key]!r} differs from compare.json's {entry[key]!r}")
        page_dir = root / "classes" / folder
        view = _comparison_view(data, manifest, sides, page_dir)
        write_text(page_dir / "index.html", template.render(up="../../", **view))
        rows.append(entry | _comparison_summary(data) | {
            "href": f"classes/{quote(folder)}/index.html", "search": _search_key(entry)})
    copy_assets(root)
    index = root / "index.html"
    titles = {side: sides[side].title for side in sides}
    html = env.get_template("compare_index.html.j2").render(
        up="", rows=rows, titles=titles, threshold=manifest["threshold"], matched_on=MATCHED_ON[manifest["match"]],
        links=_side_links(sides, root),
    )
    write_text(index, html)
    return index


def class_folders(root: Path, name: str = "class.json") -> dict[int, str]:
    """``{class index: folder name}`` for the folders ``classes/NNNN/`` of ``root`` that hold a file ``name``."""
    classes = Path(root) / "classes"
    if not classes.is_dir():
        return {}
    return {int(d.name): d.name for d in classes.iterdir() if d.name.isdigit() and (d / name).is_file()}


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # plain open: the file gets the umask's mode
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_assets(root: Path) -> None:
    """Copy the site's CSS and JS (package data of ``explain.atlas``) into ``root/assets/``."""
    for asset in (resources.files("explain.atlas") / "assets").iterdir():
        if asset.name.endswith((".css", ".js")):
            write_text(Path(root) / "assets" / asset.name, asset.read_text(encoding="utf-8"))


def percent(value: float | None) -> str | None:
    """``0.39 -> '39%'``, ``0.042 -> '4.2%'``, ``-0.05 -> '−5.0%'``: one decimal under 10%, so small shares differ.

    >>> percent(0.39), percent(0.042), percent(-0.05), percent(None)
    ('39%', '4.2%', '−5.0%', None)
    """
    if value is None:
        return None
    text = f"{abs(value) * 100:.0f}%" if abs(value) >= 0.095 else f"{abs(value) * 100:.1f}%"
    return ("−" if value < 0 else "") + text


def concepts_holding(fraction: float, importances: list[float]) -> int:
    """How many of the most important concepts it takes to reach ``fraction`` of the total importance (Lens's "number
    of important concepts"); 0 when there is no positive importance.

    >>> concepts_holding(0.8, [0.5, 0.3, 0.15, 0.05])
    2
    """
    ranked = sorted((max(v, 0.0) for v in importances), reverse=True)
    total, held = sum(ranked), 0.0
    for count, value in enumerate(ranked, 1):
        held += value
        if held >= fraction * total - 1e-9:
            return count if total > 0 else 0
    return 0


def concept_color(rank: int) -> str:
    """Colour of the concept of rank ``rank``: Tableau 10, then hues spread by the golden angle."""
    if rank < len(PALETTE):
        return PALETTE[rank]
    return f"hsl({(rank * 137.508) % 360:.0f}, 55%, 50%)"


def _class_pages(atlas: dict, root: Path) -> dict[int, str]:
    """``{class index: folder}`` of the classes that get a page: the ones ``done`` in ``atlas.json``, each of which
    must have its ``class.json``. A ``class.json`` that ``atlas.json`` does not list is reported, not rendered."""
    folders = class_folders(root)
    pages = {}
    for i, entry in enumerate(atlas["classes"]):
        if entry["status"] == "done":
            if entry["index"] not in folders:
                raise AtlasFormatError(
                    f"atlas.json: classes[{i}]: class {entry['index']} ({entry['name']!r}) is 'done' but no "
                    f"folder classes/{entry['index']:04d}/ holds its class.json"
                )
            pages[entry["index"]] = folders[entry["index"]]
    unlisted = sorted(set(folders) - {entry["index"] for entry in atlas["classes"]})
    if unlisted:
        names = ", ".join(f"classes/{folders[i]}/class.json" for i in unlisted[:5])
        names += " ..." if len(unlisted) > 5 else ""
        warnings.warn(f"{len(unlisted)} class.json not listed in atlas.json get no page: {names}", stacklevel=3)
    return pages


def _read_class(root: Path, folder: str, entry: dict) -> dict:
    """The checked ``class.json`` in ``folder``, which must name the class as ``atlas.json``'s ``entry`` does."""
    label = f"classes/{folder}/class.json"
    data = check_class(read_json(root / label, label), label, root)
    for key in ("index", "name"):
        if data[key] != entry[key]:
            raise AtlasFormatError(f"{label}: {key}: {data[key]!r} differs from atlas.json's {entry[key]!r}")
    return data


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("explain.atlas", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped, in text and in attributes
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _src(path: str, up: str) -> str:
    """URL of an atlas-relative file from a page below ``up`` (``%``-encoded: ``#``, ``?`` and spaces are safe)."""
    return up + quote(path)


def _search_key(entry: dict) -> str:
    return f"{entry['name'].lower()} {entry['index']}"


def _atlas_header(atlas: dict) -> dict[str, Any]:
    fingerprint = atlas["model"].get("fingerprint") or "unknown"
    return {
        "title": atlas.get("title") or atlas["model"]["spec"],
        "model": atlas["model"]["spec"],
        "layer": atlas["layer"],
        "dictionary": atlas.get("dictionary"),
        "n_concepts": atlas["n_concepts"],
        "format": atlas["format"],
        "fingerprint": str(fingerprint)[:12],
    }


def _index_row(entry: dict, pages: dict[int, str]) -> dict[str, Any]:
    folder = pages.get(entry["index"])
    return {
        "index": entry["index"],
        "name": entry["name"],
        "status": entry["status"],
        "reason": entry.get("reason", ""),
        "n_concepts": entry.get("n_concepts"),
        "n_images": entry.get("n_images"),
        "href": f"classes/{quote(folder)}/index.html" if folder else None,
        "search": _search_key(entry),
    }


def _class_view(data: dict, pages: dict[int, str], up: str) -> dict[str, Any]:
    """What the class page shows, with every number formatted and every path turned into a URL."""
    concepts = data["concepts"]
    colors = {c["id"]: concept_color(c["rank"]) for c in concepts}
    points = _map_points(data.get("images", []), colors, up)
    top_importance = max((c["importance"] for c in concepts), default=0.0) or 1.0
    top_logit = max((abs(c.get("logit_share") or 0.0) for c in concepts), default=0.0) or 1.0
    available = data.get("logit_share_available", True)
    views = []
    for c in concepts:
        logit = c.get("logit_share") if available else None
        views.append({
            "id": c["id"],
            "rank": c["rank"],
            "color": colors[c["id"]],
            "importance_pct": percent(c["importance"]),
            "importance_width": f"{100 * max(c['importance'], 0.0) / top_importance:.1f}",
            "logit_pct": percent(logit),
            "logit_width": f"{100 * abs(logit or 0.0) / top_logit:.1f}",
            "logit_negative": logit is not None and logit < 0,
            "n_dominant": sum(p["concept"] == c["id"] for p in points),
            "maco": _src(c["maco"], up) if c.get("maco") else None,
            "crops": [_src(crop, up) for crop in c.get("crops", [])],
            "maps": [
                {
                    "image": _src(m["image"], up) if m.get("image") else None,
                    "map": _src(m["map"], up),
                    "source": m.get("source", ""),
                }
                for m in c.get("maps", [])
            ],
            "nearest": [
                {
                    "href": f"../{quote(pages[n['class_index']])}/index.html#concept-{n['concept']}"
                    if n["class_index"] in pages
                    else None,
                    "class_name": n["class_name"],
                    "concept": n["concept"],
                    "cosine": f"{n['cosine']:.2f}",
                }
                for n in c.get("nearest", [])
            ],
        })
    return {
        "index": data["index"],
        "name": data["name"],
        "n_images": data["n_images"],
        "n_main": concepts_holding(0.8, [c["importance"] for c in concepts]),
        "related": _related_classes(concepts, pages),
        "logit_share_available": available,
        "concepts": views,
        "points": points,
        "map_size": MAP_SIZE,
    }


def _related_classes(concepts: list[dict], pages: dict[int, str], top: int = 6) -> list[dict[str, Any]]:
    """The other classes whose concepts are nearest to this class's (best cosine over the concepts' ``nearest``)."""
    best: dict[int, dict] = {}
    for c in concepts:
        for n in c.get("nearest", []):
            if n["class_index"] not in best or n["cosine"] > best[n["class_index"]]["cosine"]:
                best[n["class_index"]] = n
    ranked = sorted(best.values(), key=lambda n: (-n["cosine"], n["class_index"]))[:top]
    return [
        {
            "name": n["class_name"],
            "cosine": f"{n['cosine']:.2f}",
            "href": f"../{quote(pages[n['class_index']])}/index.html" if n["class_index"] in pages else None,
        }
        for n in ranked
    ]


def _map_points(images: list[dict], colors: dict[int, str], up: str) -> list[dict[str, Any]]:
    """The 2D embedding scaled into the SVG's box (the same scale on both axes, so distances keep their meaning)."""
    if not images:
        return []
    xs, ys = [im["x"] for im in images], [im["y"] for im in images]
    x_low, x_high, y_low, y_high = min(xs), max(xs), min(ys), max(ys)
    width, height = MAP_SIZE[0] - 2 * MAP_MARGIN, MAP_SIZE[1] - 2 * MAP_MARGIN
    scale = min(width, height) / (max(x_high - x_low, y_high - y_low) or 1.0)
    x0 = MAP_MARGIN + (width - scale * (x_high - x_low)) / 2
    y0 = MAP_MARGIN + (height - scale * (y_high - y_low)) / 2
    points = []
    for i, im in enumerate(images):
        source = im.get("source") or f"image {i}"
        points.append({
            "cx": f"{x0 + scale * (im['x'] - x_low):.1f}",
            "cy": f"{y0 + scale * (y_high - im['y']):.1f}",  # y grows upwards, as on a plot
            "color": colors[im["dominant"]],
            "concept": im["dominant"],
            "thumb": _src(im["thumb"], up) if im.get("thumb") else None,
            "caption": f"{source} · concept {im['dominant']}",
        })
    return points


class _Side:
    """One atlas of a comparison: its root, title, and class pages / concepts read from its ``class.json`` files."""

    def __init__(self, root: Path, title: str, side: str) -> None:
        self.root, self.title, self.side = root, title, side
        self.folders = class_folders(root)

    @classmethod
    def open(cls, compare_root: Path, entry: dict, side: str) -> _Side:
        path = Path(entry["path"])
        root = path if path.is_absolute() else compare_root / path
        if not (root / "atlas.json").is_file():
            raise AtlasFormatError(f"compare.json: {side}.path: no atlas.json in {root}")
        title = entry.get("title") or check_atlas(read_json(root / "atlas.json", str(root / "atlas.json"))).get("title")
        return cls(root, title or str(path), side)

    def concepts(self, index: int) -> dict[int, dict]:
        """``{concept id: concept}`` of class ``index`` in this atlas, from its checked ``class.json``."""
        if index not in self.folders:
            raise AtlasFormatError(
                f"{self.root / 'classes'}: atlas {self.side.upper()} has no class.json for class {index}"
            )
        path = self.root / "classes" / self.folders[index] / "class.json"
        return {c["id"]: c for c in check_class(read_json(path, str(path)), str(path), self.root)["concepts"]}

    def page(self, index: int) -> Path | None:
        page = self.root / "classes" / self.folders.get(index, "missing") / "index.html"
        return page if page.is_file() else None


def _relative_url(target: Path, page_dir: Path) -> str:
    return quote(Path(os.path.relpath(target, page_dir)).as_posix())


def _side_links(sides: dict[str, _Side], root: Path) -> dict[str, str | None]:
    """Links from the comparison's index to the index pages of atlases A and B (None where a site is not rendered)."""
    pages = {name: side.root / "index.html" for name, side in sides.items()}
    return {name: _relative_url(page, root) if page.is_file() else None for name, page in pages.items()}


def _comparison_view(data: dict, manifest: dict, sides: dict[str, _Side], page_dir: Path) -> dict[str, Any]:
    concepts = {name: side.concepts(data["index"]) for name, side in sides.items()}

    def concept(name: str, concept_id: int, where: str) -> dict[str, Any]:
        if concept_id not in concepts[name]:
            raise AtlasFormatError(
                f"{page_dir.name}/compare.json: {where}: atlas {name.upper()} has no concept {concept_id} "
                f"in class {data['index']}"
            )
        c = concepts[name][concept_id]
        root = sides[name].root
        return {
            "id": concept_id,
            "maco": _relative_url(root / c["maco"], page_dir) if c.get("maco") else None,
            "crops": [_relative_url(root / crop, page_dir) for crop in c.get("crops", [])[:4]],
        }

    matched = [
        {
            "a": concept("a", m["a"], f"matched[{i}].a"),
            "b": concept("b", m["b"], f"matched[{i}].b"),
            "cosine": f"{m['cosine']:.2f}",
            "importance_a": percent(m["importance_a"]),
            "importance_b": percent(m["importance_b"]),
            "shift": f"{'+' if m['shift'] >= 0 else '−'}{abs(m['shift']) * 100:.0f} pts",
            "shift_sign": "up" if m["shift"] > 0 else "down" if m["shift"] < 0 else "flat",
        }
        for i, m in enumerate(sorted(data["matched"], key=lambda m: -abs(m["shift"])))
    ]
    lost = [
        concept("a", item["a"], f"lost[{i}].a")
        | {"importance": percent(item["importance_a"]), "best_cosine": _cosine(item.get("best_cosine"))}
        for i, item in enumerate(data["lost"])
    ]
    born = [
        concept("b", item["b"], f"born[{i}].b")
        | {"importance": percent(item["importance_b"]), "best_cosine": _cosine(item.get("best_cosine"))}
        for i, item in enumerate(data["born"])
    ]
    links = {name: side.page(data["index"]) for name, side in sides.items()}
    return {
        "index": data["index"],
        "name": data["name"],
        "threshold": data.get("threshold", manifest["threshold"]),
        "matched_on": MATCHED_ON[data.get("match", manifest["match"])],
        "titles": {name: side.title for name, side in sides.items()},
        "links": {name: _relative_url(p, page_dir) if p else None for name, p in links.items()},
        "matched": matched,
        "lost": lost,
        "born": born,
    }


def _comparison_summary(data: dict) -> dict[str, Any]:
    """One row of the comparison's index: how much importance vanished and appeared, and the largest shift."""
    lost = sum(item["importance_a"] for item in data["lost"])
    born = sum(item["importance_b"] for item in data["born"])
    shift = max((m["shift"] for m in data["matched"]), key=abs, default=0.0)
    return {
        "lost_importance": lost, "lost_pct": percent(lost),
        "born_importance": born, "born_pct": percent(born),
        "shift": shift, "shift_text": f"{'+' if shift >= 0 else '−'}{abs(shift) * 100:.0f} pts",
    }


def _cosine(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
