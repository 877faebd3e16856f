"""Links between concepts: nearest concepts of other classes against brute force, the Hungarian matching of two
atlases against every permutation, and the comparison files of two atlases."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from explain.atlas.links.compare import compare_atlases, match_concepts  # noqa: E402
from explain.atlas.links.nearest import nearest_concepts  # noqa: E402
from explain.atlas.schema import check_class_compare, check_compare  # noqa: E402


def test_nearest_concepts_are_the_brute_force_neighbours_of_other_classes():
    generator = torch.Generator().manual_seed(0)
    atoms = torch.rand(23, 7, generator=generator)
    owners = torch.arange(23) // 4
    cosines, neighbours = nearest_concepts(atoms, owners, k=5, chunk=6)
    unit = atoms / atoms.norm(dim=1, keepdim=True)
    for i in range(23):
        others = [(float(unit[i] @ unit[j]), j) for j in range(23) if owners[j] != owners[i]]
        best = sorted(others, reverse=True)[:5]
        assert neighbours[i].tolist() == [j for _, j in best]
        torch.testing.assert_close(cosines[i], torch.tensor([c for c, _ in best]))


def test_hungarian_matching_is_the_best_permutation_and_splits_born_and_lost():
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        similarity = torch.rand(4, 5, generator=generator) * 2 - 1
        matched, lost, born = match_concepts(similarity, threshold=-2)  # every assigned pair kept
        best = max(sum(float(similarity[a, b]) for a, b in zip(range(4), p)) for p in itertools.permutations(range(5), 4))
        assert sum(c for _, _, c in matched) == pytest.approx(best)
        assert lost == [] and len(born) == 1
    similarity = torch.tensor([[0.9, 0.1], [0.2, 0.3]])
    matched, lost, born = match_concepts(similarity, threshold=0.5)
    assert matched == [(0, 0, pytest.approx(0.9))] and lost == [1] and born == [1]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    import planted
    from test_pipeline import build

    data = planted.write_planted(tmp_path_factory.mktemp("planted") / "images", per_class=6)
    return build(data, tmp_path_factory.mktemp("atlas") / "atlas", "--render", "false")


def test_an_atlas_compared_with_itself_matches_every_concept_with_no_shift(atlas, tmp_path):
    for match in ("atoms", "maps"):
        out = tmp_path / match
        compare_atlases(atlas, atlas, out, match=match)
        manifest = check_compare(json.loads((out / "compare.json").read_text()))
        assert (out / manifest["a"]["path"]).resolve() == atlas.resolve()
        assert [(c["matched"], c["born"], c["lost"]) for c in manifest["classes"]] == [(2, 0, 0)] * 3
        page = check_class_compare(json.loads((out / "classes" / "0001" / "compare.json").read_text()), "c1")
        assert all(m["a"] == m["b"] and m["shift"] == 0 and m["cosine"] == pytest.approx(1) for m in page["matched"])
        assert (out / "index.html").is_file()


def test_a_changed_concept_is_lost_and_born_with_its_importance(atlas, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(atlas, other)
    bank_path = other / "classes" / "0000" / "dictionary.pt"
    bank = torch.load(bank_path, weights_only=True)
    page = json.loads((other / "classes" / "0000" / "class.json").read_text())
    planted_id = page["concepts"][0]["id"]
    bank["atoms"][planted_id] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # class 0's red concept becomes green
    torch.save(bank, bank_path)
    compare_atlases(atlas, other, tmp_path / "compare", threshold=0.5, render=False)
    result = json.loads((tmp_path / "compare" / "classes" / "0000" / "compare.json").read_text())
    assert [item["a"] for item in result["lost"]] == [planted_id] == [item["b"] for item in result["born"]]
    assert result["lost"][0]["importance_a"] == page["concepts"][0]["importance"]
    assert len(result["matched"]) == 1 and result["matched"][0]["a"] != planted_id
    with pytest.raises(FileNotFoundError, match="is not an atlas: no atlas.json"):
        compare_atlases(atlas, tmp_path / "nothing", tmp_path / "c2")
