"""Weight decay groups against the reference's rule (serre-lab/Harmonization training/loss.py): every trainable
variable except normalization layers, embeddings and the class token; biases included."""

import pytest
import torch
from torch import nn

from align.optim import weight_decay_groups


class TinyViTLike(nn.Module):
    """The parameter names of a timm VisionTransformer, plus a conv net's BatchNorm and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU())
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(4, 8, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.block = nn.Module()
        self.block.norm1 = nn.LayerNorm(8)
        self.block.qkv = nn.Linear(8, 24)
        self.block.gn = nn.GroupNorm(2, 8)
        self.temperature = nn.Parameter(torch.ones(()))  # a scalar of no excluded kind: decayed, as the reference
        self.words = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def reference_rule(name: str) -> bool:
    """The reference's name filter (``'bn/'``, ``normalization``, ``embed``, ``Norm``, ``norm``, ``class_token``),
    with torch's names for a BatchNorm (``stem.1``), a GroupNorm (``block.gn``) and timm's ``cls_token``."""
    excluded = ("norm", "embed", "class_token", "cls_token", "words", "stem.1.", "block.gn.")
    return not any(part in name.lower() for part in excluded)


def test_groups_follow_the_reference_rule_biases_decayed():
    model = TinyViTLike()
    decay, no_decay = weight_decay_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed == {n for n in trainable if reference_rule(n)}
    assert kept == trainable - decayed
    # spelled out: Conv/Linear biases and the scalar are decayed; norms, embeddings and the class token are not
    assert {"stem.0.bias", "block.qkv.bias", "head.bias", "temperature", "head.weight"} <= decayed
    assert kept == {
        "stem.1.weight", "stem.1.bias", "block.norm1.weight", "block.norm1.bias", "block.gn.weight", "block.gn.bias",
        "pos_embed", "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "words.weight",
    }
    assert not any(n.startswith("frozen") for n in decayed | kept)


def test_sgd_step_equals_the_reference_l2_term():
    """One SGD step on the reference's ``lambda * sum(v^2) / 2`` over the decayed variables equals one step with the
    groups' weight decay on a zero loss."""
    torch.manual_seed(0)
    model = TinyViTLike()
    for parameter in model.parameters():
        parameter.data.normal_()
    copy = TinyViTLike()
    copy.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(weight_decay_groups(model, 1e-2), lr=0.5)
    (sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)).backward()
    optimizer.step()
    reference = torch.optim.SGD([p for p in copy.parameters() if p.requires_grad], lr=0.5)
    l2 = sum(p.square().sum() / 2 for n, p in copy.named_parameters() if p.requires_grad and reference_rule(n))
    (1e-2 * l2).backward()
    reference.step()
    for (name, got), expected in zip(model.named_parameters(), copy.parameters()):
        torch.testing.assert_close(got, expected, msg=name)


def test_timm_vision_transformer_groups():
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    model = vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2,
                                                 num_classes=3)
    decay, no_decay = weight_decay_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.bias"} <= kept
    assert {"head.bias", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight"} <= decayed
    assert all(("norm" in n or "embed" in n or n == "cls_token") for n in kept)


def test_negative_or_nan_weight_decay_is_refused():
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(nn.Linear(2, 2), -1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(nn.Linear(2, 2), float("nan"))
