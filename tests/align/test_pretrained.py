"""timm_model / torchvision_model and the loading of local weights files: name-and-shape matching, a fresh head,
clear errors."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from align.models import load_matching, timm_model, torchvision_model

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_timm_model_builds_any_model_with_its_kwargs():
    model = timm_model("vit_tiny_patch16_224", 4, **TINY_VIT, drop_path_rate=0.1)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert model.patch_embed.patch_size == (8, 8) and len(model.blocks) == 2
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert timm_model("test_resnet", 3).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_imagenet_file_into_a_4_class_model_loads_the_whole_backbone_and_a_new_head(tmp_path, caplog):
    imagenet = timm_model("vit_tiny_patch16_224", 1000, **TINY_VIT)
    path = tmp_path / "vit.pth"
    torch.save(imagenet.state_dict(), path)
    torch.manual_seed(1)
    fresh_head = timm_model("vit_tiny_patch16_224", 4, **TINY_VIT).head.weight.detach().clone()
    torch.manual_seed(1)  # the same fresh head as above: the file must not change it
    with caplog.at_level(logging.INFO):
        model = timm_model("vit_tiny_patch16_224", 4, pretrained_file=path, **TINY_VIT)
    source, target = imagenet.state_dict(), model.state_dict()
    backbone = [name for name in target if not name.startswith("head.")]
    assert backbone and all(torch.equal(target[name], source[name]) for name in backbone)
    assert target["head.weight"].shape == (4, 32)
    torch.testing.assert_close(model.head.weight.detach(), fresh_head)
    assert "head.weight" in caplog.text and "shape differs" in caplog.text  # the skipped head is logged


def test_full_match_from_safetensors_and_torch_files_gives_the_same_function(tmp_path):
    source = timm_model("test_resnet", 5).eval()
    images = torch.rand(2, 3, 32, 32)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        state = {name: value.contiguous() for name, value in source.state_dict().items()}
        save_file(state, path) if path.suffix == ".safetensors" else torch.save({"state_dict": state}, path)
        model = timm_model("test_resnet", 5, pretrained_file=path).eval()
        report = load_matching(model, path)
        assert report.loaded == sorted(source.state_dict()) and not report.mismatched and not report.missing
        with torch.no_grad():
            torch.testing.assert_close(model(images), source(images))


def test_a_file_that_matches_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="no tensor .* matches"):
        timm_model("test_resnet", 4, pretrained_file=path)


def test_a_corrupt_or_missing_file_is_an_error_naming_the_path(tmp_path):
    for name in ("broken.pth", "broken.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"\x00not a weights file\xff" * 10)
        with pytest.raises(ValueError, match=f"cannot read the weights file {path}"):
            timm_model("test_resnet", 4, pretrained_file=path)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        timm_model("test_resnet", 4, pretrained_file=tmp_path / "absent.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        timm_model("test_resnet", 4, pretrained_file=path)


def test_torchvision_model_shares_the_loading(tmp_path):
    imagenet = torchvision_model("resnet18", 1000)
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = torchvision_model("resnet18", 4, weights_file=path)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (4, 512)
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        torchvision_model("resnet19", 4)
