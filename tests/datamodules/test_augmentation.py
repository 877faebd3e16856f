"""Paired augmentation: image and human map get the same crop and flip."""

import pytest
import torch
import torch.nn.functional as F

from datamodules.augmentation import eval_transform, make_sample, train_transform


def smooth_map(size: int, seed: int = 0) -> torch.Tensor:
    """An asymmetric smooth map in [0, 1]: a ramp plus a blob off-centre, so crops and flips change it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 6, 6, generator=g)
    blob = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    ramp = torch.linspace(0, 1, size)[None, :].expand(size, size)
    out = blob + ramp
    return (out - out.min()) / (out.max() - out.min())


@pytest.mark.parametrize("crop", ["resized", "padded"])
def test_image_and_map_stay_aligned_float(crop):
    # the image's content IS its map: after any crop/flip, every channel must still equal the map
    transform = train_transform(32, crop=crop)
    heatmap = smooth_map(40 if crop == "resized" else 32)
    image = heatmap.expand(3, -1, -1).clone()
    outputs = []
    for _ in range(20):
        out_image, out_map = transform(image, heatmap)
        assert out_image.shape == (3, 32, 32) and out_map.shape == (32, 32)
        assert out_image.dtype == torch.float32 and out_map.dtype == torch.float32
        torch.testing.assert_close(out_image, out_map.expand(3, -1, -1), atol=1e-5, rtol=0)
        outputs.append(out_map)
    # the transform is random: not every draw gives the same output (so the check above is not vacuous)
    assert any(not torch.allclose(outputs[0], other) for other in outputs[1:])


def test_image_and_map_stay_aligned_uint8():
    # uint8 images (as decoded from files) take another resampling path; agree within rounding
    transform = train_transform(24, crop="resized")
    heatmap = smooth_map(48, seed=1)
    image = (heatmap * 255).round().to(torch.uint8).expand(3, -1, -1).clone()
    for _ in range(10):
        out_image, out_map = transform(image, heatmap)
        assert out_image.dtype == torch.float32 and 0 <= out_image.min() and out_image.max() <= 1
        torch.testing.assert_close(out_image, out_map.expand(3, -1, -1), atol=3 / 255, rtol=0)


def test_flip_happens_on_both():
    # with a left-right ramp, a flip reverses the ramp's direction in image and map together
    transform = train_transform(16, crop="padded", padding=0)
    ramp = torch.linspace(0, 1, 16)[None, :].expand(16, 16).contiguous()
    directions = set()
    for _ in range(30):
        image, heatmap = transform(ramp.expand(3, -1, -1), ramp)
        image_dir = bool(image[0, 0, -1] > image[0, 0, 0])
        assert image_dir == bool(heatmap[0, -1] > heatmap[0, 0])
        directions.add(image_dir)
    assert directions == {True, False}


def test_eval_transform_resizes_and_keeps_same_size_unchanged():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    heatmap = torch.rand(20, 30)
    out_image, out_map = eval_transform(16)(image, heatmap)
    assert out_image.shape == (3, 16, 16) and out_map.shape == (16, 16)
    same_image, same_map = eval_transform(20)(torch.rand(3, 20, 20), heatmap[:, :20])
    torch.testing.assert_close(same_map, heatmap[:, :20])


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="same height and width"):
        eval_transform(16)(torch.rand(3, 20, 20), torch.rand(10, 10))


def test_make_sample_types():
    sample = make_sample(torch.rand(3, 4, 4), 3, torch.rand(4, 4, dtype=torch.float64), True)
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == ()
    assert sample["heatmap"].dtype == torch.float32
    assert sample["has_heatmap"].dtype == torch.bool and sample["has_heatmap"].shape == ()
