"""The atlas pipeline end to end on planted data (``planted.py``): each class's planted colour is recovered as a
concept and ranked first; a run killed in stage 1 or stage 2 resumes to the same files; bad inputs get errors or
warnings that name the class or file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
import planted  # noqa: E402

from explain.atlas import activations, concepts  # noqa: E402
from explain.atlas.cli import main  # noqa: E402
from explain.atlas.schema import check_atlas, check_class  # noqa: E402

SMALL = [
    "--image_size", "32", "--crop_pct", "1", "--mean", "[0,0,0]", "--std", "[1,1,1]", "--max_images", "6",
    "--batch_size", "4", "--concepts.n_concepts", "2", "--concepts.nb_design", "8", "--concepts.maco_steps", "2",
    "--concepts.maco_crops", "2", "--concepts.n_crops", "3", "--concepts.n_maps", "1", "--concepts.n_thumbs", "2",
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
]


def build(data: Path, out: Path, *extra: str, model: str = "planted.planted_model") -> Path:
    main(["--model", model, "--data", str(data), "--out", str(out), *SMALL, *extra])
    return out


def class_jsons(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((root / "classes").glob("*/class.json"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return planted.write_planted(tmp_path_factory.mktemp("planted") / "images", per_class=6)


@pytest.fixture(scope="module")
def atlas(data, tmp_path_factory) -> Path:
    return build(data, tmp_path_factory.mktemp("atlas") / "atlas")


def test_planted_concept_is_recovered_and_ranked_first(atlas):
    manifest = check_atlas(json.loads((atlas / "atlas.json").read_text()))
    assert (atlas / "index.html").is_file() and (atlas / "config.yaml").is_file()  # stage 3 ran (the site's tests check it)
    assert [(c["index"], c["status"], c["n_images"]) for c in manifest["classes"]] == [(k, "done", 6) for k in range(3)]
    for k in range(3):
        folder = atlas / "classes" / f"{k:04d}"
        page = check_class(json.loads((folder / "class.json").read_text()), f"class {k}", root=atlas)
        atoms = torch.load(folder / "dictionary.pt", weights_only=True)["atoms"]
        first, second = page["concepts"]
        # the first concept is the planted colour: channel k of the layer; the second the grey background (3)
        assert torch.nn.functional.cosine_similarity(atoms[first["id"]], torch.eye(4)[k], dim=0) > 0.95
        assert torch.nn.functional.cosine_similarity(atoms[second["id"]], torch.eye(4)[3], dim=0) > 0.95
        assert first["importance"] > second["importance"] and first["importance"] + second["importance"] == \
            pytest.approx(1)
        # logit share, written out: the head reads channel k with weight 4 and grey with 1 (closed form)
        codes = torch.load(folder / "dictionary.pt", weights_only=True)["codes"].float().mean((1, 2)).sum(0)
        norms = atoms.norm(dim=1)
        contribution = {first["id"]: codes[first["id"]] * norms[first["id"]] * 4,
                        second["id"]: codes[second["id"]] * norms[second["id"]] * 1}
        total = sum(contribution.values())
        assert first["logit_share"] == pytest.approx(float(contribution[first["id"]] / total), rel=1e-2)
        # the crops of the planted concept show the planted colour
        crop = torch.tensor(list(Image.open(atlas / first["crops"][0]).getdata()), dtype=torch.float32).mean(0)
        assert int(crop.argmax()) == k
        # nearest concepts: the grey concepts of the other classes (cosine 1), never the same class
        nearest = second["nearest"]
        assert {n["class_index"] for n in nearest[:2]} == set(range(3)) - {k}
        assert nearest[0]["cosine"] == pytest.approx(1, abs=1e-3)
        assert all(n["cosine"] > 0 for c in page["concepts"] for n in c["nearest"])
        # each image's dominant concept: the planted one, which carries most of its logit (4 x 12^2 red pixels
        # against 1 x ~0.3 x the grey rest)
        assert [image["dominant"] for image in page["images"]] == [first["id"]] * 6


def test_a_run_killed_in_stage_1_or_2_resumes_to_the_same_atlas(data, atlas, tmp_path, monkeypatch):
    out = tmp_path / "atlas"
    write_batch = activations.ActivationWriter.write_on_batch_end
    calls = {"batches": 0, "classes": []}

    def dying_batch(self, *args, **kwargs):
        calls["batches"] += 1
        if calls["batches"] == 2:
            raise RuntimeError("killed in stage 1")
        return write_batch(self, *args, **kwargs)

    monkeypatch.setattr(activations.ActivationWriter, "write_on_batch_end", dying_batch)
    with pytest.raises(RuntimeError, match="killed in stage 1"):
        build(data, out, "--render", "false")
    assert not activations.stage1_done(out / "stage1")
    monkeypatch.setattr(activations.ActivationWriter, "write_on_batch_end", write_batch)
    # the resumed stage 1 starts after the finished batch (4 images), it does not recompute it
    predict_step, seen = activations.LatentPredictor.predict_step, []

    def counted_step(self, batch, batch_idx):
        seen.extend(batch["index"].tolist())
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(activations.LatentPredictor, "predict_step", counted_step)

    write_class = concepts.ConceptPredictor.write_class

    def dying_class(self, class_id):
        calls["classes"].append(class_id)
        if len(calls["classes"]) == 2:
            raise RuntimeError("killed in stage 2")
        return write_class(self, class_id)

    monkeypatch.setattr(concepts.ConceptPredictor, "write_class", dying_class)
    with pytest.raises(RuntimeError, match="killed in stage 2"):
        build(data, out, "--render", "false")
    assert (out / "classes" / "0000" / "class.json").is_file() and not (out / "classes" / "0001").exists()
    assert seen == list(range(4, 18))
    assert activations.read_index(out / "stage1") == activations.read_index(atlas / "stage1")
    build(data, out, "--render", "false")
    assert calls["classes"] == [0, 1, 1, 2]  # the finished class 0 was not recomputed
    assert class_jsons(out) == class_jsons(atlas)
    assert not (out / "index.html").exists()  # --render false: no stage 3
    resumed, uninterrupted = json.loads((out / "atlas.json").read_text()), json.loads((atlas / "atlas.json").read_text())
    assert resumed["classes"] == uninterrupted["classes"]
    for name in ("0000", "0002"):
        for key, value in torch.load(atlas / "classes" / name / "dictionary.pt", weights_only=True).items():
            again = torch.load(out / "classes" / name / "dictionary.pt", weights_only=True)[key]
            assert torch.equal(value, again) if isinstance(value, torch.Tensor) else value == again


def test_classes_without_enough_images_and_unreadable_files_are_reported(tmp_path):
    images = planted.write_planted(tmp_path / "images", per_class=3)
    for extra in sorted((images / "c2").iterdir())[1:]:
        extra.unlink()  # class 2: one image, fewer than the 2 concepts
    (images / "c0" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning) as record:
        out = build(images, tmp_path / "atlas", "--classes", "[0,1,2,3]", "--model_options", "{num_classes: 4}",
                    "--render", "false")
    messages = " | ".join(str(w.message) for w in record)
    assert "1 unreadable image(s) skipped: c0/broken.png" in messages
    assert "2 (class 2): 1 image(s) predicted as this class, fewer than the 2 concepts" in messages
    assert "3 (class 3): no image is predicted as this class" in messages
    manifest = json.loads((out / "atlas.json").read_text())
    assert manifest["unreadable"] == ["c0/broken.png"]
    status = {c["index"]: (c["status"], c.get("reason", "")) for c in manifest["classes"]}
    assert status[0] == status[1] == ("done", "") and status[2][0] == status[3][0] == "skipped"
    assert not (out / "classes" / "0002").exists()


def test_a_datamodule_gives_the_same_concepts_as_its_image_files(atlas, tmp_path):
    out = tmp_path / "atlas"
    main(["--model", "planted.planted_model", "--data", "planted.PlantedDataModule", "--data.class_names",
          "[red, '<b>green</b>', blue]", "--out", str(out), *SMALL, "--render", "false"])
    manifest = json.loads((out / "atlas.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["red", "<b>green</b>", "blue"]  # escaping is the site's job
    for k in range(3):
        from_files = json.loads((atlas / "classes" / f"{k:04d}" / "class.json").read_text())
        from_module = json.loads((out / "classes" / f"{k:04d}" / "class.json").read_text())
        # the same pixels (PNG round trip is lossless), in another order: the same concepts and importances
        assert [c["importance"] for c in from_module["concepts"]] == pytest.approx(
            [c["importance"] for c in from_files["concepts"]], abs=1e-4)
        assert from_module["images"][0]["source"].startswith("sample ")


def test_an_unknown_layer_is_named(data, tmp_path):
    with pytest.raises(ValueError, match=r"at='blocks\.9' is not a child of Sequential; its children are \['conv'"):
        build(data, tmp_path / "atlas", "--layer", "blocks.9")


def test_a_folder_holding_another_models_atlas_is_refused(data, atlas, tmp_path):
    import shutil

    other = tmp_path / "atlas"
    shutil.copytree(atlas, other)
    with pytest.raises(ValueError, match=r"already holds the atlas of another model or setting \(model: .*planted"):
        build(data, other, "--model_options", "{num_classes: 4}")
    with pytest.raises(ValueError, match=r"n_concepts: 2 there, 3 now"):
        build(data, other, "--concepts.n_concepts", "3")


def test_unknown_dictionary_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown dictionary 'kmeans': choose one of nmf, .*topk_sae"):
        build(data, tmp_path / "atlas", "--concepts.dictionary", "kmeans")


def test_a_sparse_autoencoder_finds_the_planted_concept(data, tmp_path):
    """The atlas with a TopK SAE (explain.concepts.make_dictionary) instead of NMF: the planted colour of each class
    is still one of its concepts, and the most important one."""
    atlas = build(data, tmp_path / "atlas", "--concepts.dictionary", "topk_sae",
                  "--concepts.dictionary_options", "{top_k: 1, epochs: 200, seed: 0}")
    for k in range(3):
        folder = atlas / "classes" / f"{k:04d}"
        page = check_class(json.loads((folder / "class.json").read_text()), f"class {k}", root=atlas)
        atoms = torch.load(folder / "dictionary.pt", weights_only=True)["atoms"]
        first = atoms[page["concepts"][0]["id"]]
        assert torch.nn.functional.cosine_similarity(first, torch.eye(4)[k], dim=0) > 0.9
