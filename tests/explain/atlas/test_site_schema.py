"""Every JSON that breaks the atlas format stops the site with an error naming the file and the field; a fake atlas
written by the format passes untouched."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
from fake_atlas import write_fake_atlas, write_fake_comparison  # noqa: E402

from explain.atlas.schema import AtlasFormatError  # noqa: E402
from explain.atlas.site import render_comparison, render_site  # noqa: E402

CLASS = "classes/0000/class.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Atlases A and B and their comparison, written once; each test edits its own copy."""
    root = tmp_path_factory.mktemp("pristine")
    write_fake_atlas(root / "a", n_classes=3)
    write_fake_atlas(root / "b", n_classes=3, seed=1)
    write_fake_comparison(root / "c", root / "a", root / "b")
    return root


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    for name in ("a", "b", "c"):
        shutil.copytree(pristine / name, tmp_path / name)
    (tmp_path / "c" / "compare.json").write_text(
        (tmp_path / "c" / "compare.json").read_text().replace(str((pristine / "b").resolve()), str(tmp_path / "b"))
    )
    return tmp_path


def edit(root: Path, name: str, change) -> None:
    path = root / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def swap_first_two_importances(data):
    a, b = data["concepts"][0], data["concepts"][1]
    a["importance"], b["importance"] = b["importance"], a["importance"] + 0.01


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("atlas.json", lambda d: d.update(format="atlas/0"), "atlas.json: format: must be 'aligned-vision-atlas/1'"),
        ("atlas.json", lambda d: d.pop("layer"), "atlas.json: layer: missing"),
        ("atlas.json", lambda d: d["classes"][1].update(status="ok"), "atlas.json: classes[1].status: must be one of"),
        ("atlas.json", lambda d: d["classes"][-1].pop("reason"), "atlas.json: classes[2].reason: missing"),
        ("atlas.json", lambda d: d["classes"][1].update(index=0),
         "atlas.json: classes[1].index: class 0 is listed twice"),
        ("atlas.json", lambda d: d["classes"][0].update(index=7),
         "atlas.json: classes[0]: class 7 ('tabby cat') is 'done'"),
        ("atlas.json", lambda d: d["classes"][0].update(name="cat"),
         f"{CLASS}: name: 'tabby cat' differs from atlas.json's 'cat'"),
        (CLASS, lambda d: d["concepts"][1].update(importance="high"),
         f"{CLASS}: concepts[1].importance: must be a finite number, got 'high'"),
        (CLASS, swap_first_two_importances, f"{CLASS}: concepts[1].importance: concepts must be sorted by importance"),
        (CLASS, lambda d: d["concepts"][2].update(rank=0), f"{CLASS}: concepts[2].rank: must be 2"),
        (CLASS, lambda d: d["concepts"][1].update(id=d["concepts"][0]["id"]), f"{CLASS}: concepts[1].id: concept"),
        (CLASS, lambda d: d["concepts"][0].update(logit_share=True),
         f"{CLASS}: concepts[0].logit_share: must be a finite number or null"),
        (CLASS, lambda d: d["concepts"][0].update(maco="../../secret.png"),
         f"{CLASS}: concepts[0].maco: must be a relative POSIX path"),
        (CLASS, lambda d: d["concepts"][0].update(maco="/etc/x.png"),
         f"{CLASS}: concepts[0].maco: must be a relative POSIX path"),
        (CLASS, lambda d: d["concepts"][0].update(maco="javascript:alert(1)//.png"),
         f"{CLASS}: concepts[0].maco: must be a relative POSIX path"),
        (CLASS, lambda d: d["concepts"][0].update(maco="classes/0000/class.json"),
         f"{CLASS}: concepts[0].maco: must be an image"),
        (CLASS, lambda d: d["concepts"][0]["crops"].append("classes/0000/gone.png"),
         f"{CLASS}: concepts[0].crops[4]: image 'classes/0000/gone.png' does not exist"),
        (CLASS, lambda d: d["concepts"][3]["maps"][1].pop("map"), f"{CLASS}: concepts[3].maps[1].map: missing"),
        (CLASS, lambda d: d["concepts"][0]["nearest"][0].update(cosine=None),
         f"{CLASS}: concepts[0].nearest[0].cosine: must be a finite number"),
        (CLASS, lambda d: d["images"][5].update(dominant=99),
         f"{CLASS}: images[5].dominant: 99 is not the id of a concept"),
        (CLASS, lambda d: d["images"][0].update(x=float("nan")), f"{CLASS}: images[0].x: must be a finite number"),
        (CLASS, lambda d: d.update(logit_share_available="yes"),
         f"{CLASS}: logit_share_available: must be true or false"),
    ],
)
def test_a_file_off_the_format_is_named_with_its_field(copy, name, change, message):
    render_site(copy / "a")  # the pristine copy renders
    (copy / "a" / "index.html").unlink()
    edit(copy / "a", name, change)
    with pytest.raises(AtlasFormatError) as error:
        render_site(copy / "a")
    assert message in str(error.value)
    assert not (copy / "a" / "index.html").exists()  # the index is written last: no index of a half-written site


def test_missing_or_broken_json_is_named(copy, tmp_path):
    with pytest.raises(AtlasFormatError, match="atlas.json: missing"):
        render_site(tmp_path / "empty")
    (copy / "a" / CLASS).write_text('{"index": 0,')
    with pytest.raises(AtlasFormatError, match=f"{CLASS}: not valid JSON"):
        render_site(copy / "a")
    (copy / "a" / CLASS).write_text("[1, 2]")
    with pytest.raises(AtlasFormatError, match=f"{CLASS}: must hold a JSON object, got list"):
        render_site(copy / "a")


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("compare.json", lambda d: d.update(format="x"), "compare.json: format: must be"),
        ("compare.json", lambda d: d["a"].update(path="../nowhere"), "compare.json: a.path: no atlas.json in"),
        ("compare.json", lambda d: d["classes"][0].pop("born"), "compare.json: classes[0].born: missing"),
        ("compare.json", lambda d: d.pop("match"), "compare.json: match: missing"),
        ("classes/0001/compare.json", lambda d: d.update(match="pixels"),
         "classes/0001/compare.json: match: must be one of 'atoms', 'maps', got 'pixels'"),
        ("classes/0001/compare.json", lambda d: d["matched"][0].pop("shift"),
         "classes/0001/compare.json: matched[0].shift: missing"),
        ("classes/0001/compare.json", lambda d: d["lost"][0].update(a=42),
         "0001/compare.json: lost[0].a: atlas A has no concept 42 in class 1"),
        ("classes/0000/compare.json", lambda d: d["born"][0].update(importance_b="?"),
         "classes/0000/compare.json: born[0].importance_b: must be"),
        ("classes/0001/compare.json", lambda d: d.update(name="x"),
         "classes/0001/compare.json: name: 'x' differs from compare.json's"),
    ],
)
def test_a_comparison_off_the_format_is_named_with_its_field(copy, name, change, message):
    render_comparison(copy / "c")  # the pristine copy renders
    edit(copy / "c", name, change)
    with pytest.raises(AtlasFormatError) as error:
        render_comparison(copy / "c")
    assert message in str(error.value)
