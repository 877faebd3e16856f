"""HarmonizedClassifier: the loss it optimizes, when it skips the double backprop, what it logs, its optimizer."""

import warnings
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn

import align.module
from align import HarmonizedClassifier
from align.losses import harmonization_loss, input_saliency
from align.models import lip_vgg, small_cnn
from datamodules import ShortcutShapesDataModule


def batch(size=8, image=16, maps=True):
    out = {
        "image": torch.rand(size, 3, image, image),
        "label": torch.randint(0, 4, (size,)),
        "heatmap": torch.rand(size, image, image),
        "has_heatmap": torch.ones(size, dtype=torch.bool),
    }
    if not maps:
        out["heatmap"].zero_()
        out["has_heatmap"].zero_()
    return out


def step(model, data):
    with warnings.catch_warnings():  # self.log without a trainer only warns
        warnings.simplefilter("ignore")
        return model.training_step(data, 0)


def test_training_loss_is_task_plus_weighted_harmonization():
    torch.manual_seed(0)
    backbone = small_cnn(4, widths=(8, 16), depth=1, batch_norm=False)
    model = HarmonizedClassifier(backbone, task_loss="ce", harmonization_weight=2.5, levels=3)
    data = batch()
    data["has_heatmap"][:3] = False
    loss = step(model, data)
    logits, saliency = input_saliency(backbone, data["image"], data["label"], reduce="mean")
    task = nn.functional.cross_entropy(logits, data["label"], label_smoothing=0.1)
    expected = task + 2.5 * harmonization_loss(saliency, data["heatmap"], data["has_heatmap"], levels=3)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("weight, maps", [(0.0, True), (1.0, False)])
def test_no_double_backprop_for_the_baseline_or_batches_without_maps(monkeypatch, weight, maps):
    def forbidden(*args, **kwargs):
        raise AssertionError("the input gradient must not be computed")

    monkeypatch.setattr(align.module, "input_gradient", forbidden)
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=weight)
    data = batch(maps=maps)
    loss = step(model, data)
    expected = nn.functional.cross_entropy(model(data["image"]), data["label"], label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()  # a plain graph


def test_tuple_batches_and_bad_batches():
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1))
    images, labels = torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))
    assert torch.isfinite(step(model, (images, labels)))
    with pytest.raises(TypeError, match="'image', 'label'"):
        step(model, [images])
    with pytest.raises(KeyError, match="'image' and 'label'"):
        step(model, {"img": images})


def test_weight_decay_as_the_reference_and_scheduler_options():
    backbone = small_cnn(4, widths=(8,), depth=1)  # conv without bias, BatchNorm, linear with bias
    model = HarmonizedClassifier(
        backbone,
        weight_decay=0.1,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1),
    )
    config = model.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # the reference decays the linear layer's bias too; only the normalization layer is left out
    head = backbone.head
    assert {id(p) for p in decay["params"]} == {id(backbone.stage1[0].weight), id(head.weight), id(head.bias)}
    norm = backbone.stage1[1]
    assert {id(norm.weight), id(norm.bias)} == {id(p) for p in no_decay["params"]}
    assert config["lr_scheduler"]["monitor"] == "val/loss"


def test_num_classes_is_read_from_the_backbone_and_checked():
    assert HarmonizedClassifier(lip_vgg(5, widths=(8,), depth=1)).num_classes == 5
    with pytest.raises(ValueError, match="last linear layer has 5 outputs"):
        HarmonizedClassifier(lip_vgg(5, widths=(8,), depth=1), num_classes=4)
    with pytest.raises(ValueError, match="task_loss must be one of"):
        HarmonizedClassifier(lip_vgg(5, widths=(8,), depth=1), task_loss="mse")


def tiny_data(**overrides):
    options = dict(train_size=32, val_size=16, test_size=16, image_size=16, batch_size=16)
    return ShortcutShapesDataModule(**{**options, **overrides})


def trainer(tmp_path, **overrides):
    options = dict(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **overrides})


def test_fit_and_test_log_every_metric_per_split(tmp_path):
    torch.manual_seed(0)
    model = HarmonizedClassifier(lip_vgg(4, widths=(8, 16), depth=1), task_loss="hkr", levels=3)
    fit = trainer(tmp_path)
    fit.fit(model, tiny_data())
    logged = set(fit.callback_metrics)
    assert {"train/loss", "train/task_loss", "train/harmonization_loss", "train/acc"} <= logged
    assert {"val/loss", "val/task_loss", "val/harmonization_loss", "val/acc", "val/alignment"} <= logged
    assert "val/certified_acc" in logged
    assert all(torch.isfinite(value) for value in fit.callback_metrics.values())
    results = fit.test(model, tiny_data(), verbose=False)
    assert len(results) == 2
    for split, result in zip(("iid", "flipped"), results):
        expected = {f"test/{split}/{name}" for name in ("acc", "alignment", "certified_acc", "loss")}
        assert expected <= set(result)
    # the accuracy logged for a split is the accuracy on that split
    data = tiny_data()
    data.setup()
    flipped = data.dataset("flipped")
    model.eval()
    with torch.no_grad():
        images = torch.stack([flipped[i]["image"] for i in range(len(flipped))])
        labels = torch.stack([flipped[i]["label"] for i in range(len(flipped))])
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert results[1]["test/flipped/acc"] == pytest.approx(accuracy)


def test_datamodule_with_other_classes_is_refused(tmp_path):
    model = HarmonizedClassifier(small_cnn(3, widths=(8,), depth=1))
    with pytest.raises(ValueError, match="num_classes=4"):
        trainer(tmp_path, limit_train_batches=1).fit(model, tiny_data())


def test_checkpoint_reloads_outside_the_cli(tmp_path):
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=0.5)
    fit = trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    fit.fit(model, tiny_data())
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    loaded = HarmonizedClassifier.load_from_checkpoint(path, backbone=small_cnn(4, widths=(8,), depth=1))
    assert loaded.harmonization_weight == 0.5
    x = torch.rand(2, 3, 16, 16)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_validation_logs_the_harmonization_loss_of_batches_without_maps_as_zero(tmp_path):
    # the reference's loss is a mean over the whole batch, so a batch without maps contributes 0; logging it on
    # every batch also keeps DDP processes in step (sync_dist on a key only some of them logged would hang)
    torch.manual_seed(0)
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=2.0, levels=3).eval()
    with_maps, without = batch(), batch(maps=False)
    loader = torch.utils.data.DataLoader([without, with_maps], batch_size=None)
    (result,) = trainer(tmp_path).validate(model, loader, verbose=False)
    logits, saliency = input_saliency(model.backbone, with_maps["image"], with_maps["label"], create_graph=False)
    expected = harmonization_loss(saliency, with_maps["heatmap"], with_maps["has_heatmap"], levels=3).item() / 2
    assert result["val/harmonization_loss"] == pytest.approx(expected, rel=1e-5)
    assert "val/alignment" in result


def test_non_finite_arguments_are_refused():
    for value in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="harmonization_weight"):
            HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=value)
        with pytest.raises(ValueError, match="noise_std"):
            ShortcutShapesDataModule(noise_std=value)


def test_a_nan_harmonization_term_stops_training_naming_step_and_term():
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=1.0, levels=3)
    data = batch()
    data["heatmap"][0, 0, 0] = float("nan")  # a broken human map: the harmonization term is NaN, the task is not
    with pytest.raises(FloatingPointError, match=r"step 0: harmonization loss = nan") as error:
        step(model, data)
    assert "task" not in str(error.value)


def test_a_nan_task_loss_mid_training_stops_the_fit_with_its_step(tmp_path):
    torch.manual_seed(0)
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=0.0)
    batches = [batch(maps=False) for _ in range(4)]
    batches[2]["image"][0] = float("nan")
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 2: task loss = nan"):
        trainer(tmp_path).fit(model, loader)


def test_nan_weights_refuse_to_train(tmp_path):
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1))
    with torch.no_grad():
        model.backbone.head.weight[0, 0] = float("nan")
    loader = torch.utils.data.DataLoader([batch()], batch_size=None)
    with pytest.raises(FloatingPointError, match=r"NaN or inf .*step 0.*backbone\.head\.weight"):
        trainer(tmp_path).fit(model, loader)


def test_no_human_map_at_all_logs_no_alignment_and_warns_once(tmp_path):
    model = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=1.0, levels=3).eval()
    loader = torch.utils.data.DataLoader([batch(maps=False), batch(maps=False)], batch_size=None)
    with pytest.warns(UserWarning, match="no image of this epoch has a human map") as first:
        (result,) = trainer(tmp_path).validate(model, loader, verbose=False)
    assert "val/alignment" not in result  # not a 0.0 that no image supports
    assert "val/harmonization_loss" in result and "val/acc" in result
    assert len([w for w in first if "human map" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        (result,) = trainer(tmp_path).validate(model, loader, verbose=False)
    assert "val/alignment" not in result
    assert not [w for w in second if "human map" in str(w.message)]  # once
    # one image with a map is enough: the score is logged and equals the metric on that image alone
    loader = torch.utils.data.DataLoader([batch(maps=False), batch()], batch_size=None)
    (result,) = trainer(tmp_path).validate(model, loader, verbose=False)
    assert "val/alignment" in result


def test_hyperparameters_keep_the_cli_config_but_not_python_objects():
    """Pins Lightning's private ``_given_hyperparameters`` (no public twin), which HarmonizedClassifier reads to
    tell a LightningCLI build (the backbone/optimizer configs are saved, so load_from_checkpoint rebuilds them)
    from a Python one (objects are not hyperparameters). If Lightning renames or changes it, this fails."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    assert _given_hyperparameters.get() is None  # outside the CLI
    plain = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1))
    assert not {"backbone", "optimizer", "lr_scheduler"} & set(plain.hparams)
    import inspect

    backbone_config = {"class_path": "align.models.small_cnn", "init_args": {"num_classes": 4, "widths": [8]}}
    optimizer_config = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}
    # what LightningCLI gives: every init argument as configured, the objects as their class_path/init_args
    given = {name: p.default for name, p in inspect.signature(HarmonizedClassifier).parameters.items()}
    given.update(backbone=backbone_config, optimizer=optimizer_config, _class_path="align.HarmonizedClassifier")
    token = _given_hyperparameters.set(given)
    try:
        from_cli = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1))
    finally:
        _given_hyperparameters.reset(token)
    assert from_cli.hparams["backbone"] == backbone_config
    assert from_cli.hparams["optimizer"] == optimizer_config and "lr_scheduler" in from_cli.hparams


def test_a_non_finite_rrr_term_is_named_rrr():
    class Sqrt(nn.Module):  # finite outputs, an infinite input gradient where a pixel is 0
        def forward(self, x):
            return x.abs().sqrt()

    backbone = nn.Sequential(Sqrt(), nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    model = HarmonizedClassifier(backbone, alignment_loss="rrr", harmonization_weight=1.0)
    data = batch()
    data["heatmap"].zero_()  # every pixel is one to ignore
    data["image"][0, 0, 0, 0] = 0.0
    with pytest.raises(FloatingPointError, match=r"step 0: rrr loss = (nan|inf)") as error:
        step(model, data)
    assert "task" not in str(error.value).split("step 0:")[1].split(";")[0]  # the task loss is finite
