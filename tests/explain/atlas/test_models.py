"""Loading the network of an atlas: timm/torchvision names with a local weights file and a key map, the project's
Lightning checkpoints through the class recorded in the run's config.yaml, and clear errors for weights that fit
nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import planted  # noqa: E402

from explain.atlas.models import load_model, map_keys, state_fingerprint  # noqa: E402


def test_timm_weights_with_other_names_load_by_position_and_give_the_same_logits(tmp_path):
    reference = timm.create_model("resnet10t", num_classes=5).eval()
    renamed = {f"tensor_{i:03d}": v for i, v in enumerate(reference.state_dict().values())}  # names differ
    torch.save(renamed, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights file .*weights.pt does not fit ResNet: 0 of its .* key_map"):
        load_model("timm:resnet10t", tmp_path / "weights.pt", model_options={"num_classes": 5})
    loaded = load_model("timm:resnet10t", tmp_path / "weights.pt", key_map="position", model_options={"num_classes": 5})
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.network(x), reference(x))
    assert loaded.fingerprint == state_fingerprint(reference.state_dict())
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.spec == "timm:resnet10t"


def test_regex_key_map_and_a_weights_file_of_another_model(tmp_path):
    reference = planted.planted_model()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "dp.pt")
    loaded = load_model("planted.planted_model", tmp_path / "dp.pt", key_map={r"^module\.": ""})
    assert all(torch.equal(a, b) for a, b in zip(loaded.network.state_dict().values(), reference.state_dict().values()))
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet.pt does not fit Sequential: 0 of its 4 tensors found .* 4 missing"):
        load_model("planted.planted_model", tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"key_map='position': the weights hold \d+ tensors, the model 4"):
        load_model("planted.planted_model", tmp_path / "resnet.pt", key_map="position")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pt: cannot read it"):
        load_model("planted.planted_model", tmp_path / "junk.pt")


def test_map_keys_by_position_refuses_a_shape_mismatch():
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"weight 'y' \(2,\) falls on the model's 'b' \(3,\)"):
        map_keys({"x": torch.ones(2), "y": torch.ones(2)}, target, "position")


def test_a_lightning_checkpoint_loads_through_the_class_recorded_in_config_yaml(tmp_path):
    module = planted.PlantedModule(num_classes=3)
    with torch.no_grad():
        module.backbone.head.weight.add_(torch.randn(3, 4))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"no config.yaml with a model.class_path beside it"):
        load_model(str(run / "checkpoints" / "last.ckpt"))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": "planted.PlantedModule"}}))
    loaded = load_model(str(run / "checkpoints" / "last.ckpt"))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded.network(x), module.backbone(x))
    assert loaded.network is not module.backbone and isinstance(loaded.network, torch.nn.Sequential)
    with pytest.raises(ValueError, match=r"has no module attribute 'encoder'"):
        load_model(str(run / "checkpoints" / "last.ckpt"), model_attr="encoder")


def test_an_unknown_spec_is_named():
    with pytest.raises(ValueError, match=r"model 'resnet50': not 'timm:<name>', 'torchvision:<name>', a .ckpt file"):
        load_model("resnet50")
