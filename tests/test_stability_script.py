"""scripts/stability.py: clear errors, and an end-to-end run whose MeGe/ReCo are recomputed independently from the
saved checkpoints (the datamodule's own held-out fold, ``mege_reco`` called directly)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from align import HarmonizedClassifier
from datamodules import ShortcutShapesDataModule
from explain.attributions.saliency import Saliency
from explain.metrics import mege_reco

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "shortcut" / "baseline_cnn.yaml")
TINY = [  # seconds of training per fold on one CPU core; enough that both sets of pairs are non-empty
    "--trainer.max_epochs=3",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks=[]",  # not the explanation callbacks of the config: this test is about the script
    "--data.init_args.image_size=16",
    "--data.init_args.train_size=640",
    "--data.init_args.val_size=32",
    "--data.init_args.test_size=32",
    "--data.init_args.batch_size=16",
    "--model.init_args.backbone.init_args.widths=[8,16]",
    "--model.init_args.backbone.init_args.depth=1",
]
IMAGES_PER_FOLD = 24


def load_script():
    spec = importlib.util.spec_from_file_location("stability_script", ROOT / "scripts" / "stability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def error_of(script, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code) + capsys.readouterr().err


def test_needs_two_folds(script, capsys, tmp_path):
    message = error_of(script, ["--config", CONFIG, "--folds", "1", "--root", str(tmp_path)], capsys)
    assert "--folds must be >= 2" in message
    assert not any(tmp_path.iterdir())


def test_overrides_may_not_set_the_folds_or_the_run(script, capsys, tmp_path):
    for override in ("--data.init_args.fold=1", "--run.version", "--data.num_folds=3"):
        message = error_of(script, ["--config", CONFIG, "--root", str(tmp_path), "--", override], capsys)
        assert override.split("=")[0] in message and "sets" in message


def test_unknown_explainer_fails_before_training(script, capsys, tmp_path):
    argv = ["--config", CONFIG, "--root", str(tmp_path), "--explainers", "saliency", "lime"]
    message = error_of(script, argv, capsys)
    assert "lime" in message and "saliency" in message
    assert not any(tmp_path.iterdir())


def test_skip_training_without_runs_names_the_missing_checkpoints(script, capsys, tmp_path):
    argv = ["--config", CONFIG, "--folds", "3", "--root", str(tmp_path), "--experiment", "nothing", "--skip-training"]
    message = error_of(script, argv, capsys)
    for fold in range(3):
        assert str(tmp_path / "nothing" / f"fold{fold}" / "checkpoints" / "last.ckpt") in message
    assert "without --skip-training" in message


def test_datamodule_without_folds_is_refused_before_training(script, capsys, tmp_path):
    # the ClickMe TFRecord datamodule streams shards and has no num_folds/fold
    data = tmp_path / "tfrecord.yaml"
    data.write_text(yaml.safe_dump({"data": yaml.safe_load((ROOT / "configs/data/clickme_tfrecord.yaml").read_text())}))
    message = error_of(script, ["--config", CONFIG, "--config", str(data), "--root", str(tmp_path / "runs")], capsys)
    assert "ClickMeTFRecordDataModule has no folds support" in message and "num_folds" in message
    assert not (tmp_path / "runs").exists()


def test_fold_support_is_read_from_the_datamodule_signature(script):
    script.check_fold_support({"class_path": "datamodules.ShortcutShapesDataModule"}, "here")
    script.check_fold_support({"class_path": "datamodules.ClickMeFolderDataModule"}, "here")
    with pytest.raises(SystemExit, match="cannot import the datamodule 'datamodules.Nope'"):
        script.check_fold_support({"class_path": "datamodules.Nope"}, "here")


def test_heldout_images_of_a_clickme_folder(script, tmp_path):
    # six train images, three folds: the script's evaluation set is each image once, with its fold, unaugmented
    pictures = torch.rand(6, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    rows = []
    for index, picture in enumerate(pictures):
        Image.fromarray((picture.numpy() * 255).astype(np.uint8)).save(tmp_path / f"{index}.png")
        rows.append(f"{index}.png,,{index % 2}")
    for split in ("train", "val"):
        (tmp_path / f"{split}.csv").write_text("\n".join(["image,heatmap,label", *rows]) + "\n")
    expected = torch.from_numpy(np.stack([np.asarray(Image.open(tmp_path / f"{i}.png")) for i in range(6)]))
    expected = expected.permute(0, 3, 1, 2).float() / 255  # image_size = 8: no resizing, no augmentation

    seen = []
    for fold in range(3):
        init = {"root": str(tmp_path), "image_size": 8, "batch_size": 1, "num_workers": 0, "num_folds": 3,
                "fold": fold, "seed": 1}
        images, labels = script.heldout_images({"class_path": "datamodules.ClickMeFolderDataModule",
                                                "init_args": init}, count=10)
        assert images.shape == (2, 3, 8, 8) and labels.dtype == torch.int64
        for image, label in zip(images, labels):
            (match,) = [i for i in range(6) if torch.allclose(image, expected[i], atol=1e-6)]
            assert label == match % 2
            seen.append(match)
        first, _ = script.heldout_images({"class_path": "datamodules.ClickMeFolderDataModule", "init_args": init}, 1)
        torch.testing.assert_close(first, images[:1])
    assert sorted(seen) == list(range(6))  # every train image is held out by exactly one fold


@pytest.mark.slow
def test_end_to_end_matches_mege_reco_on_the_checkpoints(script, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--config", CONFIG, "--folds", "2", "--explainers", "saliency", "--images-per-fold", str(IMAGES_PER_FOLD),
            "--root", str(tmp_path), "--experiment", "exp", "--device", "cpu", "--", *TINY]
    summary = script.main(argv)
    printed = capsys.readouterr().out
    experiment = tmp_path / "exp"

    # each fold model was trained by the CLI with its own fold held out, without a test run
    for fold in range(2):
        config = yaml.safe_load((experiment / f"fold{fold}" / "config.yaml").read_text())
        assert (config["data"]["init_args"]["num_folds"], config["data"]["init_args"]["fold"]) == (2, fold)
        assert config["data"]["init_args"]["train_size"] == 640 and config["trainer"]["max_epochs"] == 3
        assert config["run"]["test_after_fit"] is False

    # independent recomputation: the datamodule's held-out folds, the checkpoints, mege_reco itself
    init = yaml.safe_load((experiment / "fold0" / "config.yaml").read_text())["data"]["init_args"]
    models, images, labels, folds = [], [], [], []
    for fold in range(2):
        checkpoint = experiment / f"fold{fold}" / "checkpoints" / "last.ckpt"
        models.append(HarmonizedClassifier.load_from_checkpoint(checkpoint, map_location="cpu").backbone.eval())
        datamodule = ShortcutShapesDataModule(**{**init, "fold": fold})
        datamodule.setup("fit")
        train = datamodule.dataset("train")  # every fold but `fold`: disjoint from the held-out images
        heldout = datamodule.dataset("heldout")
        assert len(train) + len(heldout) == 640
        batch = heldout.__getitems__(list(range(IMAGES_PER_FOLD)))
        images.append(torch.stack([item["image"] for item in batch]))
        labels.append(torch.stack([item["label"] for item in batch]))
        folds.append(torch.full((IMAGES_PER_FOLD,), fold))
    mege, reco = mege_reco(models, torch.cat(images), torch.cat(labels), torch.cat(folds), Saliency)

    written = json.loads((experiment / "stability.json").read_text())
    (row,) = written["results"]
    assert row["explainer"] == "saliency"
    assert summary["num_images"] == written["num_images"] == 2 * IMAGES_PER_FOLD
    assert row["consistent_pairs"] > 0 and row["inconsistent_pairs"] > 0  # both sets of pairs are used
    assert 0.0 < row["mege"] <= 1.0 and 0.0 <= row["reco"] <= 1.0
    assert row["mege"] == pytest.approx(mege.item(), abs=1e-6)
    assert row["reco"] == pytest.approx(reco.item(), abs=1e-6)
    csv_row = (experiment / "stability.csv").read_text().splitlines()[1].split(",")
    assert csv_row[0] == "saliency" and float(csv_row[1]) == pytest.approx(row["mege"])
    assert f"{row['mege']:.4f}" in printed and f"{row['reco']:.4f}" in printed

    # a second call without --skip-training refuses to overwrite; with it, the same numbers without training
    with pytest.raises(SystemExit, match="--skip-training"):
        script.main(argv)
    again = script.main(argv[: argv.index("--")] + ["--skip-training"])
    assert again["results"] == summary["results"]
    assert not math.isnan(again["results"][0]["mege"])
