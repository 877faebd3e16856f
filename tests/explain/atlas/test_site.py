"""The atlas site rendered from fake atlases: what each page shows is checked against the JSON it came from, the HTML
is parsed back with the standard library's parser (never string-matched for structure), and every link and image
must resolve to a file on disk."""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
from fake_atlas import HOSTILE_NAME, HOSTILE_SOURCE, write_fake_atlas, write_fake_comparison  # noqa: E402

from explain.atlas.site import concept_color, percent, render_comparison, render_site  # noqa: E402


class Page(HTMLParser):
    """Every start tag with its attributes, the text, and the text under each element id (for cards and titles)."""

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.path = path
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.rows: list[tuple[dict, list[dict]]] = []  # each table row's attributes and its cells' attributes
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append((dict(attrs), []))
        elif tag in ("td", "th") and self.rows:
            self.rows[-1][1].append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, **match: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in match.items())]

    def joined_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def resolve(self, url: str) -> Path:
        """The file a relative URL of this page points to (``file://`` semantics: %-decoding, no query/fragment)."""
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{self.path}: external or scheme URL {url!r}"
        return (self.path.parent / unquote(parts.path)).resolve() if parts.path else self.path.resolve()


def pages_of(root: Path) -> list[Page]:
    return [Page(p) for p in sorted(root.rglob("index.html"))]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    write_fake_atlas(root, n_classes=5)
    render_site(root)
    return root


def class_json(root: Path, index: int) -> dict:
    return json.loads((root / "classes" / f"{index:04d}" / "class.json").read_text())


def test_index_lists_every_class_with_its_counts_and_links_only_finished_ones(atlas):
    manifest = json.loads((atlas / "atlas.json").read_text())
    index = Page(atlas / "index.html")
    rows = index.all("tr")[1:]  # the header row first
    assert [r["data-search"] for r in rows] == [f"{c['name'].lower()} {c['index']}" for c in manifest["classes"]]
    links = {a["href"] for a in index.all("a")}
    for entry in manifest["classes"]:
        href = f"classes/{entry['index']:04d}/index.html"
        assert (href in links) == (entry["status"] == "done")
        assert (atlas / href).is_file() == (entry["status"] == "done")
    skipped = [c for c in manifest["classes"] if c["status"] == "skipped"]
    assert skipped and all(c["reason"] in index.joined_text() for c in skipped)


def test_class_page_ranks_concepts_by_importance_as_cards_with_their_share(atlas):
    data = class_json(atlas, 0)
    page = Page(atlas / "classes" / "0000" / "index.html")
    cards = page.all("article")
    by_importance = sorted(data["concepts"], key=lambda c: -c["importance"])
    assert [c["id"] for c in cards] == [f"concept-{c['id']}" for c in by_importance]
    text = page.joined_text()
    for c in data["concepts"]:
        shown = f"{100 * c['importance']:.0f}%" if c["importance"] >= 0.095 else f"{100 * c['importance']:.1f}%"
        assert f"Concept {c['id']} (importance {shown})" in text
        assert f"{percent(c['logit_share'])} of the class logit" in text
    # the chart's bars: one per concept, widths proportional to importance (the largest fills the track)
    bars = page.all("span", **{"class": "bar importance"})
    widths = [float(bar["style"].split("width:")[1].split("%")[0]) for bar in bars]
    top = by_importance[0]["importance"]
    assert widths == pytest.approx([100 * c["importance"] / top for c in by_importance], abs=0.06)


def test_map_draws_every_image_in_its_dominant_concepts_colour_keeping_the_layout(atlas):
    data = class_json(atlas, 0)
    page = Page(atlas / "classes" / "0000" / "index.html")
    circles = page.all("circle")
    assert len(circles) == len(data["images"])
    rank = {c["id"]: c["rank"] for c in data["concepts"]}
    for circle, image in zip(circles, data["images"]):
        assert circle["fill"] == concept_color(rank[image["dominant"]])
        assert circle["data-concept"] == str(image["dominant"])
    # the embedding is scaled by one positive factor and shifted (y flipped): order and ratios of distances survive
    cx = [float(c["cx"]) for c in circles]
    cy = [float(c["cy"]) for c in circles]
    xs = [im["x"] for im in data["images"]]
    ys = [im["y"] for im in data["images"]]
    scale = (max(cx) - min(cx)) / (max(xs) - min(xs))
    assert cx == pytest.approx([min(cx) + scale * (x - min(xs)) for x in xs], abs=0.1)
    assert cy == pytest.approx([max(cy) - scale * (y - min(ys)) for y in ys], abs=0.1)
    assert min(cx) >= 0 and min(cy) >= 0


def test_every_image_and_link_resolves_and_nearest_concepts_link_to_their_cards(atlas):
    for page in pages_of(atlas):
        for img in page.all("img"):
            if img.get("src"):
                assert page.resolve(img["src"]).is_file(), (page.path, img["src"])
        for a in page.all("a"):
            target = page.resolve(a["href"])
            assert target.is_file(), (page.path, a["href"])
            fragment = urlsplit(a["href"]).fragment
            if fragment:
                assert Page(target).all("article", id=fragment), (page.path, a["href"])
        for link in page.all("link") + page.all("script"):
            assert page.resolve(link.get("href") or link["src"]).is_file()
    page = Page(atlas / "classes" / "0000" / "index.html")
    nearest = [a["href"] for a in page.all("a") if "#concept-" in a["href"] and a["href"].startswith("../")]
    expected = [f"../{n['class_index']:04d}/index.html#concept-{n['concept']}"
                for c in class_json(atlas, 0)["concepts"] for n in c["nearest"]]
    assert nearest == expected
    # the closest classes: each other class once, ordered by its best cosine with any concept of this class
    best = {}
    for n in (n for c in class_json(atlas, 0)["concepts"] for n in c["nearest"]):
        best[n["class_index"]] = max(best.get(n["class_index"], -1.0), n["cosine"])
    related = [a["href"] for a in page.all("a") if re.fullmatch(r"\.\./\d+/index\.html", a["href"])]
    assert related == [f"../{i:04d}/index.html" for i in sorted(best, key=lambda i: -best[i])]


def test_hostile_strings_render_as_text_and_no_page_runs_inline_script(atlas):
    assert class_json(atlas, 1)["name"] == HOSTILE_NAME
    for page in pages_of(atlas):
        html = page.path.read_text()
        assert "<script>alert" not in html and "<img src=x" not in html and "<img src=y" not in html
        scripts = page.all("script")
        assert len(scripts) == 1 and scripts[0]["src"].endswith("assets/atlas.js")  # no inline script at all
        for tag, attrs in page.tags:
            assert not any(name.startswith("on") for name in attrs), (page.path, tag, attrs)
    hostile = Page(atlas / "classes" / "0001" / "index.html")
    assert HOSTILE_NAME in hostile.joined_text() and HOSTILE_SOURCE in hostile.joined_text()
    assert [t for t, _ in hostile.tags if t == "h1"] == ["h1"]
    assert HOSTILE_NAME in Page(atlas / "index.html").joined_text()


def test_rendering_again_gives_the_same_files_and_leaves_no_temporary_file(atlas):
    before = {p: p.read_bytes() for p in atlas.rglob("*.html")}
    render_site(atlas)
    assert {p: p.read_bytes() for p in atlas.rglob("*.html")} == before
    assert not list(atlas.rglob("*.tmp"))
    assert (atlas / "assets" / "atlas.css").is_file() and (atlas / "assets" / "atlas.js").is_file()


def test_without_a_linear_head_the_page_says_so_and_shows_no_logit_share(tmp_path):
    write_fake_atlas(tmp_path, n_classes=2)
    path = tmp_path / "classes" / "0000" / "class.json"
    data = json.loads(path.read_text())
    data["logit_share_available"] = False
    for c in data["concepts"]:
        c["logit_share"] = None
    path.write_text(json.dumps(data))
    render_site(tmp_path)
    text = Page(tmp_path / "classes" / "0000" / "index.html").joined_text()
    assert "of the class logit" not in text and "not linear after pooling" in text


def test_comparison_pages_show_matched_vanished_and_appeared_concepts_with_images_of_both_atlases(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_fake_atlas(a, n_classes=3, title="Baseline")
    write_fake_atlas(b, n_classes=3, seed=1, title="Harmonized")
    render_site(a)
    manifest = write_fake_comparison(c, a, b)
    index = render_comparison(c)
    rows = Page(index).all("tr")[1:]
    assert len(rows) == len(manifest["classes"]) == 2
    for entry in manifest["classes"]:
        folder = f"{entry['index']:04d}"
        data = json.loads((c / "classes" / folder / "compare.json").read_text())
        page = Page(c / "classes" / folder / "index.html")
        text = page.joined_text()
        assert f"{len(data['matched'])} matched, {len(data['born'])} appeared, {len(data['lost'])} vanished" in text
        for m in data["matched"]:
            sign = "+" if m["shift"] >= 0 else "−"
            assert f"{sign}{abs(m['shift']) * 100:.0f} pts" in text
        key = f"{entry['name'].lower()} {entry['index']}"
        cells = next(cells for tr, cells in Page(index).rows if tr.get("data-search") == key)
        assert float(cells[3]["data-sort"]) == pytest.approx(max(abs(m["shift"]) for m in data["matched"]))
        assert float(cells[5]["data-sort"]) == pytest.approx(sum(x["importance_b"] for x in data["born"]))
        assert float(cells[7]["data-sort"]) == pytest.approx(sum(x["importance_a"] for x in data["lost"]))
        images = [page.resolve(img["src"]) for img in page.all("img")]
        assert images and all(p.is_file() for p in images)
        assert {p.parents[2] for p in images} == {a.resolve(), b.resolve()}  # images of both atlases, linked in place
        links = {page.resolve(x["href"]) for x in page.all("a")}
        assert (a / "classes" / folder / "index.html").resolve() in links  # A's site is rendered, B's is not
        assert not any(str(p).startswith(str(b.resolve())) for p in links)


@pytest.mark.parametrize("match", ["atoms", "maps"])
def test_comparison_pages_say_what_the_cosine_was_taken_on(tmp_path, match):
    # compare.json's "match" decides the sentence: a comparison of maps never claims to compare directions
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_fake_atlas(a, n_classes=2)
    write_fake_atlas(b, n_classes=2, seed=1)
    write_fake_comparison(c, a, b, match=match)
    pages = [render_comparison(c), c / "classes" / "0000" / "index.html"]
    said, other = ("coefficient maps", "directions") if match == "maps" else ("directions", "coefficient maps")
    for page in pages:
        text = Page(page).joined_text()
        assert f"Hungarian assignment on the cosine of their {said}" in text
        assert other not in text


def test_a_class_json_that_atlas_json_does_not_list_is_reported_not_silently_ignored(tmp_path):
    write_fake_atlas(tmp_path, n_classes=3)
    edit = json.loads((tmp_path / "atlas.json").read_text())
    edit["classes"] = [c for c in edit["classes"] if c["index"] != 1]
    (tmp_path / "atlas.json").write_text(json.dumps(edit))
    with pytest.warns(UserWarning, match=r"1 class.json not listed in atlas.json get no page: classes/0001/class.json"):
        render_site(tmp_path)
    assert not (tmp_path / "classes" / "0001" / "index.html").exists()


def test_comparison_without_titles_takes_them_from_the_atlases(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_fake_atlas(a, n_classes=2, title="ResNet baseline")
    write_fake_atlas(b, n_classes=2, seed=1, title="ResNet harmonized")
    manifest = write_fake_comparison(c, a, b)
    manifest["a"]["title"] = manifest["b"]["title"] = None
    (c / "compare.json").write_text(json.dumps(manifest))
    text = Page(render_comparison(c)).joined_text()
    assert "What changed from ResNet baseline to ResNet harmonized" in text
