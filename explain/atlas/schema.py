"""Reading and checking the JSON files of an atlas (``atlas.json``, ``classes/NNNN/class.json``) and of a comparison
(``compare.json``, ``classes/NNNN/compare.json``), as the atlas format describes them.

The site renders from these files alone, so every field it uses is checked here first. A file that does not follow
the format raises :class:`AtlasFormatError` whose message names the file and the field, e.g.
``classes/0003/class.json: concepts[2].importance: must be a number, got 'high'``. Image paths must be relative
POSIX paths inside the atlas (no ``/`` at the start, no ``..``, no ``scheme:``), end in an image suffix, and point to
a file that exists: a page never links to nothing, and no path from data becomes a ``javascript:`` URL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

ATLAS_FORMAT = "aligned-vision-atlas/1"
COMPARE_FORMAT = "aligned-vision-atlas-compare/1"
MATCHES = ("atoms", "maps")  # what a comparison's cosine is taken on (explain.atlas.links.compare)
STATUSES = ("done", "skipped", "pending")
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


class AtlasFormatError(ValueError):
    """A JSON file of an atlas or of a comparison that does not follow the format (the message names file and field)."""


class _File:
    """Typed access to the fields of one JSON document; every error names ``label`` (the file) and the field."""

    def __init__(self, label: str, root: Path | None = None) -> None:
        self.label = label
        self.root = root

    def error(self, field: str, problem: str) -> AtlasFormatError:
        return AtlasFormatError(f"{self.label}: {field}: {problem}" if field else f"{self.label}: {problem}")

    def get(self, obj: dict, key: str, where: str = "", *, optional: bool = False) -> Any:
        field = f"{where}.{key}" if where else key
        if key not in obj:
            if optional:
                return None
            raise self.error(field, "missing")
        return obj[key]

    def mapping(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.error(field, f"must be an object, got {_short(value)}")
        return value

    def items(self, obj: dict, key: str, where: str = "") -> list:
        value = self.get(obj, key, where)
        if not isinstance(value, list):
            raise self.error(_join(where, key), f"must be a list, got {_short(value)}")
        return value

    def text(self, obj: dict, key: str, where: str = "", *, optional: bool = False) -> str | None:
        value = self.get(obj, key, where, optional=optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.error(_join(where, key), f"must be a string, got {_short(value)}")
        return value

    def integer(self, obj: dict, key: str, where: str = "", *, low: int | None = 0) -> int:
        value = self.get(obj, key, where)
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            raise self.error(_join(where, key), f"must be an int >= {low}, got {_short(value)}")
        return value

    def number(self, obj: dict, key: str, where: str = "", *, nullable: bool = False, optional: bool = False) -> Any:
        value = self.get(obj, key, where, optional=optional)
        if value is None and (nullable or optional):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            allowed = "a finite number" + (" or null" if nullable else "")
            raise self.error(_join(where, key), f"must be {allowed}, got {_short(value)}")
        return value

    def image(self, obj: dict, key: str, where: str = "", *, optional: bool = False) -> str | None:
        """A relative image path inside the atlas root that exists (when the root is known)."""
        value = self.text(obj, key, where, optional=optional)
        return None if value is None else self.image_path(value, _join(where, key))

    def image_path(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {_short(value)}")
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or ":" in value or "\\" in value:
            raise self.error(field, f"must be a relative POSIX path inside the atlas, got {_short(value)}")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise self.error(field, f"must be an image ({', '.join(IMAGE_SUFFIXES)}), got {_short(value)}")
        if self.root is not None and not (self.root / value).is_file():
            raise self.error(field, f"image {value!r} does not exist under {self.root}")
        return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_json(path: Path, label: str) -> dict:
    """The JSON object in ``path``; :class:`AtlasFormatError` naming ``label`` if it is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AtlasFormatError(f"{label}: missing (looked for {path})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AtlasFormatError(f"{label}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AtlasFormatError(f"{label}: must hold a JSON object, got {type(data).__name__}")
    return data


def check_atlas(data: dict, label: str = "atlas.json") -> dict:
    """Check the manifest ``atlas.json`` (format, model, layer, classes with status); return it."""
    doc = _File(label)
    fmt = doc.text(data, "format")
    if fmt != ATLAS_FORMAT:
        raise doc.error("format", f"must be {ATLAS_FORMAT!r}, got {fmt!r}")
    doc.text(data, "title", optional=True)
    model = doc.mapping(doc.get(data, "model"), "model")
    doc.text(model, "spec", "model")
    doc.text(data, "layer")
    doc.integer(data, "n_concepts", low=1)
    doc.text(data, "dictionary", optional=True)
    seen: set[int] = set()
    for i, entry in enumerate(doc.items(data, "classes")):
        where = f"classes[{i}]"
        doc.mapping(entry, where)
        index = doc.integer(entry, "index", where)
        if index in seen:
            raise doc.error(f"{where}.index", f"class {index} is listed twice")
        seen.add(index)
        doc.text(entry, "name", where)
        status = doc.text(entry, "status", where)
        if status not in STATUSES:
            raise doc.error(f"{where}.status", f"must be one of {STATUSES}, got {status!r}")
        if status == "skipped":
            doc.text(entry, "reason", where)
        for key in ("n_images", "n_concepts"):
            if key in entry:
                doc.integer(entry, key, where)
    return data


def check_class(data: dict, label: str, root: Path | None = None) -> dict:
    """Check one ``classes/NNNN/class.json``: concepts sorted by importance with ``rank`` = position, image paths that
    exist under ``root``, nearest concepts, and the 2D map whose ``dominant`` ids are concepts of the class."""
    doc = _File(label, root)
    doc.integer(data, "index")
    doc.text(data, "name")
    doc.integer(data, "n_images")
    logit_share_available = doc.get(data, "logit_share_available", optional=True)
    if logit_share_available is not None and not isinstance(logit_share_available, bool):
        raise doc.error("logit_share_available", f"must be true or false, got {_short(logit_share_available)}")
    ids: set[int] = set()
    previous = math.inf
    for i, concept in enumerate(doc.items(data, "concepts")):
        where = f"concepts[{i}]"
        doc.mapping(concept, where)
        concept_id = doc.integer(concept, "id", where)
        if concept_id in ids:
            raise doc.error(f"{where}.id", f"concept {concept_id} is listed twice")
        ids.add(concept_id)
        if doc.integer(concept, "rank", where) != i:
            raise doc.error(f"{where}.rank", f"must be {i} (the position in the list), got {concept['rank']!r}")
        importance = doc.number(concept, "importance", where)
        if importance > previous:
            raise doc.error(f"{where}.importance", "concepts must be sorted by importance, descending")
        previous = importance
        doc.number(concept, "logit_share", where, nullable=True, optional=True)
        doc.image(concept, "maco", where, optional=True)
        for j, crop in enumerate(doc.items(concept, "crops", where) if "crops" in concept else []):
            doc.image_path(crop, f"{where}.crops[{j}]")
        for j, item in enumerate(doc.items(concept, "maps", where) if "maps" in concept else []):
            item_where = f"{where}.maps[{j}]"
            doc.mapping(item, item_where)
            doc.image(item, "map", item_where)
            doc.image(item, "image", item_where, optional=True)
            doc.text(item, "source", item_where, optional=True)
        for j, item in enumerate(doc.items(concept, "nearest", where) if "nearest" in concept else []):
            item_where = f"{where}.nearest[{j}]"
            doc.mapping(item, item_where)
            doc.integer(item, "class_index", item_where)
            doc.text(item, "class_name", item_where)
            doc.integer(item, "concept", item_where)
            doc.number(item, "cosine", item_where)
    for i, image in enumerate(doc.items(data, "images") if "images" in data else []):
        where = f"images[{i}]"
        doc.mapping(image, where)
        doc.text(image, "source", where, optional=True)
        doc.number(image, "x", where)
        doc.number(image, "y", where)
        dominant = doc.integer(image, "dominant", where)
        if dominant not in ids:
            raise doc.error(f"{where}.dominant", f"{dominant} is not the id of a concept of this class")
        doc.image(image, "thumb", where, optional=True)
    return data


def check_compare(data: dict, label: str = "compare.json") -> dict:
    """Check the manifest ``compare.json`` of a comparison of atlases A and B; return it."""
    doc = _File(label)
    fmt = doc.text(data, "format")
    if fmt != COMPARE_FORMAT:
        raise doc.error("format", f"must be {COMPARE_FORMAT!r}, got {fmt!r}")
    for side in ("a", "b"):
        doc.mapping(doc.get(data, side), side)
        doc.text(data[side], "path", side)
        doc.text(data[side], "title", side, optional=True)
    doc.number(data, "threshold")
    _check_match(doc, data, optional=False)
    seen: set[int] = set()
    for i, entry in enumerate(doc.items(data, "classes")):
        where = f"classes[{i}]"
        doc.mapping(entry, where)
        index = doc.integer(entry, "index", where)
        if index in seen:
            raise doc.error(f"{where}.index", f"class {index} is listed twice")
        seen.add(index)
        doc.text(entry, "name", where)
        for key in ("matched", "born", "lost"):
            doc.integer(entry, key, where)
    return data


def _check_match(doc: _File, data: dict, optional: bool) -> None:
    match = doc.text(data, "match", optional=optional)
    if match is not None and match not in MATCHES:
        raise doc.error("match", f"must be one of {', '.join(map(repr, MATCHES))}, got {_short(match)}")


def check_class_compare(data: dict, label: str) -> dict:
    """Check one ``classes/NNNN/compare.json``: matched pairs with their importance shift, lost and born concepts."""
    doc = _File(label)
    doc.integer(data, "index")
    doc.text(data, "name")
    doc.number(data, "threshold", optional=True)
    _check_match(doc, data, optional=True)
    for i, pair in enumerate(doc.items(data, "matched")):
        where = f"matched[{i}]"
        doc.mapping(pair, where)
        doc.integer(pair, "a", where)
        doc.integer(pair, "b", where)
        doc.number(pair, "cosine", where)
        doc.number(pair, "importance_a", where)
        doc.number(pair, "importance_b", where)
        doc.number(pair, "shift", where)
    for key, side in (("lost", "a"), ("born", "b")):
        for i, item in enumerate(doc.items(data, key)):
            where = f"{key}[{i}]"
            doc.mapping(item, where)
            doc.integer(item, side, where)
            doc.number(item, f"importance_{side}", where)
            doc.number(item, "best_cosine", where, nullable=True, optional=True)
    return data
