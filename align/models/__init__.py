"""Model zoo: 1-Lipschitz networks on deel-torchlip and standard baselines.

Every model is an ``nn.Sequential`` with named children ending in ``pool``, ``flatten``, ``head``, so it can be
split at the global pooling (CRAFT) and its last linear layer read (certification). Use them in YAML as
``backbone: {class_path: align.models.lip_vgg, init_args: {num_classes: 4}}``.
"""

from align.models.lipschitz import LipResidualBlock, Shift, export_plain, lip_resnet, lip_vgg
from align.models.standard import resnet18, resnet50, small_cnn

__all__ = ["LipResidualBlock", "Shift", "export_plain", "lip_resnet", "lip_vgg", "resnet18", "resnet50", "small_cnn"]
