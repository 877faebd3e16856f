"""Model zoo: 1-Lipschitz gradient-norm-preserving networks (orthogonium convolutions, deel-torchlip layers),
standard baselines, and any timm or torchvision model by name with weights from a local file.

The project's own networks are ``nn.Sequential``s with named children ending in ``pool``, ``flatten``, ``head``,
so they can be split at the global pooling (CRAFT) and their last linear layer read (certification). Use them in
YAML as ``backbone: {class_path: align.models.lip_vgg, init_args: {num_classes: 4}}`` or
``backbone: {class_path: align.models.timm_model, init_args: {name: vit_small_patch16_224, num_classes: 4}}``.
"""

from align.models.lipschitz import (
    LipResidualBlock,
    OrthoConv2d,
    Shift,
    export_plain,
    lip_resnet,
    lip_vgg,
    orthogonal_kernels_once,
)
from align.models.pretrained import load_matching, read_state_dict
from align.models.standard import resnet18, resnet50, small_cnn, timm_model, torchvision_model

__all__ = [
    "LipResidualBlock",
    "OrthoConv2d",
    "Shift",
    "export_plain",
    "lip_resnet",
    "lip_vgg",
    "orthogonal_kernels_once",
    "load_matching",
    "read_state_dict",
    "resnet18",
    "resnet50",
    "small_cnn",
    "timm_model",
    "torchvision_model",
]
