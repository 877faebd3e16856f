"""The human-alignment benchmark: its numbers against the reference's ``evaluate_clickme`` arithmetic written out in
numpy/scipy, the split-half ceiling against its closed form, the command's outputs, and its errors."""

import csv

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.stats import spearmanr
from torch import nn

from align.human_alignment import ModelSpec, build_model, main, split_half_ceiling
from datamodules.clickme_synthetic import write_shards
from datamodules.clickme_tfrecord import ClickMeTFRecordDataModule

NUM_CLASSES, SIZE = 4, 32


def reference_scores(saliency, heatmaps, percentile=10):
    """harmonization/evaluation/metrics.py, per image, written out: scipy's Spearman on the flattened maps, and
    Dice/IoU of the pixels strictly above numpy's (100 - percentile)-th percentile, with the 1e-9 guard."""
    rho, dice, iou = [], [], []
    for a, b in zip(saliency, heatmaps):
        rho.append(spearmanr(a.flatten(), b.flatten())[0])
        a = (a > np.percentile(a, 100 - percentile, (0, 1))).astype(np.float32)
        b = (b > np.percentile(b, 100 - percentile, (0, 1))).astype(np.float32)
        dice.append(2.0 * np.sum(a * b) / (np.sum(a + b) + 1e-9))
        iou.append(np.sum(np.logical_and(a, b)) / (np.sum(np.logical_or(a, b)) + 1e-9))
    return np.mean(rho), np.mean(dice), np.mean(iou)


def timm_weights(tmp_path, num_classes=NUM_CLASSES, seed=0, name="test_resnet"):
    torch.manual_seed(seed)
    path = tmp_path / f"{name}-{num_classes}-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(name, num_classes=num_classes).state_dict().items()},
              path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clickme")
    write_shards(folder, [12, 12], NUM_CLASSES, size=48, prefix="val")
    return str(folder / "val-*.tfrecords")


def test_scores_equal_the_reference_arithmetic(shards, tmp_path):
    weights = timm_weights(tmp_path)
    rows = main(["--shards", shards, "--num-classes", str(NUM_CLASSES), "--image-size", str(SIZE),
                 "--model", f"timm:test_resnet:{weights}", "--batch-size", "10", "--num-workers", "0",
                 "--accelerator", "cpu", "--devices", "1", "--out", str(tmp_path / "out")])
    # the same network, the same images and maps, and the reference's saliency: |d logit_y / dx| max over channels
    model = build_model(ModelSpec.parse(f"timm:test_resnet:{weights}"), NUM_CLASSES)
    data = ClickMeTFRecordDataModule(shards, shards, image_size=SIZE, num_workers=0, num_classes=NUM_CLASSES,
                                     augment=False)
    saliency, heatmaps, right = [], [], 0
    for batch in data.val_dataloader():
        images = batch["image"].clone().requires_grad_(True)
        logits = model(images)
        right += int((logits.argmax(1) == batch["label"]).sum())
        (gradient,) = torch.autograd.grad(logits.gather(1, batch["label"][:, None]).sum(), images)
        saliency.append(gradient.abs().amax(1).numpy())
        heatmaps.append(batch["heatmap"].numpy())
    rho, dice, iou = reference_scores(np.concatenate(saliency), np.concatenate(heatmaps))
    (row,) = rows
    assert row["maps"] == 24 and row["accuracy"] == pytest.approx(right / 24)
    assert row["spearman"] == pytest.approx(rho, abs=1e-5)
    assert row["alignment"] == pytest.approx(rho / 0.65753, abs=1e-5)
    assert row["dice"] == pytest.approx(dice, abs=1e-6) and row["iou"] == pytest.approx(iou, abs=1e-6)
    assert row["ceiling_source"] == "given"


def test_three_networks_write_the_csv_and_the_figure(shards, tmp_path):
    torch.manual_seed(0)
    vgg = tmp_path / "tv.pth"
    import torchvision

    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=NUM_CLASSES).state_dict(), vgg)
    halves = tmp_path / "halves.npz"
    base = np.random.default_rng(0).random((5, 8, 8))
    np.savez(halves, half_a=base, half_b=base + 0.1 * np.random.default_rng(1).random((5, 8, 8)))
    out = tmp_path / "out"
    main(["--shards", shards, "--num-classes", str(NUM_CLASSES), "--image-size", str(SIZE),
          "--model", f"a=timm:test_resnet:{timm_weights(tmp_path, seed=1)}",
          "--model", f"b=timm:test_vit:{timm_weights(tmp_path, name='test_vit')}",
          "--model", f"torchvision:mobilenet_v3_small:{vgg}", "--halves", str(halves), "--explainer", "gradient_input",
          "--num-workers", "0", "--accelerator", "cpu", "--devices", "1", "--out", str(out)])
    with open(out / "alignment.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["a", "b", "mobilenet_v3_small"]
    assert all(row["ceiling_source"] == "split-half of halves.npz" for row in rows)
    assert all(row["explainer"] == "gradient_input" and row["maps"] == "24" for row in rows)
    ceiling = float(rows[0]["ceiling"])
    for row in rows:
        assert float(row["alignment"]) == pytest.approx(float(row["spearman"]) / ceiling, rel=1e-5)
    assert Image.open(out / "alignment.png").size[0] > 100


def test_split_half_ceiling_is_spearman_brown_of_the_mean_half_correlation():
    n = 16  # pixels of a map; swapping two adjacent ranks gives rho = 1 - 6 * 2 / (n (n^2 - 1))
    values = torch.arange(n, dtype=torch.float64)
    swaps = [0, 1, 3]  # image i has swaps[i] disjoint adjacent swaps
    half_a = values.repeat(3, 1).view(3, 4, 4)
    half_b = half_a.clone().view(3, n)
    for i, k in enumerate(swaps):
        for j in range(k):
            half_b[i, [2 * j, 2 * j + 1]] = half_b[i, [2 * j + 1, 2 * j]]
    rhos = [1 - 6 * 2 * k / (n * (n * n - 1)) for k in swaps]
    r = sum(rhos) / 3
    assert split_half_ceiling(half_a, half_b.view(3, 4, 4)) == pytest.approx(2 * r / (1 + r), rel=1e-12)
    with pytest.raises(ValueError, match="do not agree"):
        split_half_ceiling(half_a, -half_a)


def test_bad_weights_classes_and_data_say_which_model_and_file(shards, tmp_path, monkeypatch):
    stray = tmp_path / "stray.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, stray)
    with pytest.raises(ValueError, match=r"model 'test_resnet' .*stray.safetensors fits nothing"):
        build_model(ModelSpec.parse(f"timm:test_resnet:{stray}"), NUM_CLASSES)
    thousand = timm_weights(tmp_path, num_classes=10)
    with pytest.raises(ValueError, match=r"10-0.safetensors does not fit it entirely: its classes do not match"):
        build_model(ModelSpec.parse(f"timm:test_resnet:{thousand}"), NUM_CLASSES)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ModelSpec.parse("timm:test_resnet:missing.safetensors")
    with pytest.raises(ValueError, match="expected"):
        ModelSpec.parse(f"keras:{stray}")
    # a checkpoint whose network has other classes than the data (Lightning's loading itself is Lightning's)
    from align.module import HarmonizedClassifier

    module = HarmonizedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 6)))
    checkpoint = tmp_path / "six.ckpt"
    checkpoint.write_bytes(b"")
    monkeypatch.setattr(HarmonizedClassifier, "load_from_checkpoint", lambda *args, **kwargs: module)
    with pytest.raises(ValueError, match=r"model 'six' \(.*six.ckpt\) has 6 classes, the data 4"):
        build_model(ModelSpec.parse(f"ckpt:{checkpoint}"), NUM_CLASSES)
    # data without human maps: a ClickMe folder whose heatmap cells are empty
    root = tmp_path / "folder"
    root.mkdir()
    lines = ["image,heatmap,label"]
    for i in range(4):
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,,{i}")
    for split in ("train", "val"):
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"model 'test_resnet': no image of the data has a human map"):
        main(["--folder", str(root), "--num-classes", str(NUM_CLASSES), "--image-size", str(SIZE),
              "--model", f"timm:test_resnet:{timm_weights(tmp_path)}", "--num-workers", "0",
              "--accelerator", "cpu", "--devices", "1", "--out", str(tmp_path / "none")])


@pytest.mark.slow
def test_two_processes_give_the_scores_of_one(shards, tmp_path):
    """``--devices 2`` (DDP on CPU, gloo): the metrics sync across the processes (24 records split 12/12)."""
    import subprocess
    import sys
    from pathlib import Path

    weights = timm_weights(tmp_path)
    scores = []
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        command = [sys.executable, "-m", "align.human_alignment", "--shards", shards, "--num-classes",
                   str(NUM_CLASSES), "--image-size", str(SIZE), "--model", f"timm:test_resnet:{weights}",
                   "--num-workers", "0", "--accelerator", "cpu", "--devices", str(devices), "--batch-size", "4",
                   "--out", str(out)]
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2], capture_output=True)
        with open(out / "alignment.csv") as handle:
            scores.append(next(csv.DictReader(handle)))
    for key in ("accuracy", "alignment", "spearman", "dice", "iou", "maps"):
        assert float(scores[0][key]) == pytest.approx(float(scores[1][key]), rel=1e-6), key
