"""Craft(dictionary=...): importance, concept maps and gallery with every dictionary."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from torch import nn

from explain.concepts import Craft, make_dictionary

matplotlib.use("Agg")

FAST = {
    "nmf": {},
    "semi_nmf": {"max_iter": 100},
    "archetypal": {"max_iter": 50},
    "topk_sae": {"epochs": 3, "progress": False, "top_k": 2},
    "batchtopk_sae": {"epochs": 3, "progress": False, "top_k": 2},
    "jumprelu_sae": {"epochs": 3, "progress": False},
    "archetypal_sae": {"epochs": 3, "progress": False, "top_k": 2},
}


def signed_model():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh())  # signed activations
    h = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return g, h


@pytest.mark.parametrize("name", list(FAST))
def test_importance_maps_and_gallery_with_every_dictionary(name):
    g, h = signed_model()
    if name == "nmf":
        g = nn.Sequential(g, nn.ReLU())
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    craft = Craft(g, h, n_concepts=4, patch_size=8, stride=4, dictionary=name, dictionary_options=FAST[name])
    craft.fit(images, class_id=1)
    assert craft.dictionary_.name == name and craft.W_.shape == (4, 8)
    importance = craft.importance(images, nb_design=4)
    assert importance.shape == (4,) and torch.isfinite(importance).all()
    # the codes decode linearly: the importance's masked latents are codes @ W
    u = craft.transform(images)
    assert torch.allclose(craft.dictionary_.decode(u.reshape(-1, 4)), u.reshape(-1, 4) @ craft.W_, atol=1e-5)
    assert craft.concept_maps(images, method="activation").shape == (4, 4, 16, 16)
    if craft.dictionary_.gives_maps:
        maps = craft.concept_maps(images)
        assert maps.shape == (4, 4, 16, 16) and (maps >= 0).all()
        pooled = craft._latents(images).mean(dim=(2, 3))
        absent = craft.dictionary_.encode(pooled) == 0  # a concept absent from an image has a zero map
        assert (maps.flatten(2).amax(dim=2)[absent] == 0).all()
    else:
        with pytest.raises(NotImplementedError, match="gives no concept maps"):
            craft.concept_maps(images)
    assert craft.gallery(top_k=2) is not None


def test_sae_maps_are_the_encoder_gradient():
    g, h = signed_model()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    craft = Craft(g, h, n_concepts=4, patch_size=8, stride=4, dictionary="topk_sae",
                  dictionary_options=FAST["topk_sae"]).fit(images, class_id=0)
    activations = craft._latents(images)  # [B, c, h, w]
    pooled = activations.mean(dim=(2, 3))
    weight = craft.dictionary_.model_.encoder.final_block[0].weight.detach()
    active = craft.dictionary_.encode(pooled) > 0
    jacobian = torch.where(active[:, :, None], weight[None], torch.zeros(()))  # d topk(W a + b) / da, by hand
    size = activations.shape[-2] * activations.shape[-1]
    expected = torch.einsum("brc,bchw->brhw", jacobian, activations).clamp_min(0) / size
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bicubic", align_corners=False).clamp_min(0)
    assert torch.allclose(craft.concept_maps(images), expected, atol=1e-5)


def test_nmf_needs_nonnegative_activations_but_saes_do_not():
    g, h = signed_model()
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="negative activations"):
        Craft(g, h, n_concepts=3, patch_size=8, stride=4).fit(images)
    Craft(g, h, n_concepts=3, patch_size=8, stride=4, dictionary="topk_sae",
          dictionary_options=FAST["topk_sae"]).fit(images)


def test_dictionary_arguments_are_checked():
    g, h = signed_model()
    with pytest.raises(ValueError, match="unknown dictionary 'ica'"):
        Craft(g, h, n_concepts=3, dictionary="ica")
    with pytest.raises(ValueError, match="has 5 atoms but n_concepts=3"):
        Craft(g, h, n_concepts=3, dictionary=make_dictionary("topk_sae", 5))
    with pytest.raises(TypeError, match="unexpected keyword"):
        Craft(g, h, n_concepts=3, dictionary="topk_sae", dictionary_options={"rank": 2})


def test_decompose_keeps_the_dictionary():
    g, h = signed_model()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    craft = Craft(g, h, n_concepts=3, patch_size=8, stride=4, dictionary="topk_sae",
                  dictionary_options=FAST["topk_sae"]).fit(images)
    child = craft.decompose(0, g, n_concepts=2, top_fraction=1.0)
    assert child.dictionary_.name == "topk_sae" and child.W_.shape == (2, 8)
