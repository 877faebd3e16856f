"""split_model, CRAFT and EVA on timm models: a CNN through forward_features/forward_head, a vision transformer
through its patch tokens."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from explain import EVA, Craft  # noqa: E402
from explain.bounds import UnsupportedLayerError  # noqa: E402
from explain.concepts import split_model  # noqa: E402

VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


def timm_cnn():
    return timm.create_model("test_resnet", num_classes=3).eval()


def timm_vit(global_pool="avg"):
    return timm.create_model("vit_tiny_patch16_224", num_classes=3, global_pool=global_pool, **VIT).eval()


def images(n=6, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_split_of_a_timm_cnn_is_exact():
    model = timm_cnn()
    g, h = split_model(model)
    x = images(3)
    with torch.no_grad():
        latent = g(x)
        assert latent.ndim == 4 and latent.min() >= 0  # post-ReLU features of forward_features
        torch.testing.assert_close(h(latent), model(x), rtol=0, atol=0)


def test_split_of_a_vit_reshapes_the_patch_tokens_and_is_exact():
    model = timm_vit()
    x = images(3)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [B, 1 + 16, 24]: the class token, then a 4 x 4 grid of patches
        g, h = split_model(model)
        latent = g(x)
        assert latent.shape == (3, 24, 4, 4)
        # patch (row 1, column 2) is token 1 + 1 * 4 + 2
        torch.testing.assert_close(latent[:, :, 1, 2], tokens[:, 1 + 4 + 2])
        torch.testing.assert_close(h(latent), model(x), rtol=1e-5, atol=1e-6)
        g, h = split_model(model, sign_split=True)  # signed tokens: cat(relu(z), relu(-z))
        latent = g(x)
        assert latent.shape == (3, 48, 4, 4) and latent.min() >= 0
        torch.testing.assert_close(h(latent), model(x), rtol=1e-5, atol=1e-6)


def test_split_errors_for_a_map_pooled_vit_and_an_at_name():
    with pytest.raises(ValueError, match="global_pool='avg' or 'token'"):
        split_model(timm_vit(global_pool="map"))
    with pytest.raises(ValueError, match="forward_features"):
        split_model(timm_cnn(), at="layer1")


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_craft_fits_and_ranks_concepts_on_timm_models(name):
    model = timm_cnn() if name == "cnn" else timm_vit()
    g, h = split_model(model, sign_split=name == "vit")
    craft = Craft(g, h, n_concepts=3, nmf={"max_iter": 50}).fit(images(), class_id=1)
    assert craft.W.shape == (3, g(images(1)).shape[1]) and craft.W.min() >= 0
    importance = craft.importance(images())
    assert importance.shape == (3,) and torch.isfinite(importance).all() and (importance >= 0).all()
    assert importance.max() > importance.min()  # a ranking, not a tie
    maps = craft.concept_maps(images(2))
    assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all()


def test_eva_refuses_attention_with_a_clear_error():
    with pytest.raises(UnsupportedLayerError, match="VisionTransformer|Attention"):  # names the layer
        EVA(timm_vit(), eps=0.01, grid_size=2)(images(1), torch.tensor([0]))


def test_class_token_vit_splits_before_its_last_block_exactly():
    model = timm_vit(global_pool="token")
    x = images(3)
    g, h = split_model(model)
    with torch.no_grad():
        latent = g(x)
        assert latent.shape == (3, 24 + 24, 4, 4)  # patches, then the class token's 24 channels at every location
        tokens = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))  # block L-1 = block 0
        torch.testing.assert_close(latent[:, :24, 1, 2], tokens[:, 1 + 4 + 2])
        torch.testing.assert_close(latent[:, 24:, 3, 0], tokens[:, 0])
        torch.testing.assert_close(h(latent), model(x), rtol=1e-5, atol=1e-5)
        # the patches drive the logit through the last block's attention
        moved = latent.clone()
        moved[:, :24] += torch.randn(3, 24, 4, 4, generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(h(moved), model(x), atol=1e-3)


@pytest.mark.parametrize("dictionary", ["nmf", "topk_sae"])
def test_craft_on_a_class_token_vit(dictionary):
    model = timm_vit(global_pool="token")
    g, h = split_model(model, sign_split=dictionary == "nmf")  # an SAE takes the signed tokens as they are
    options = {"epochs": 3, "progress": False, "top_k": 1} if dictionary == "topk_sae" else {"max_iter": 50}
    craft = Craft(g, h, n_concepts=3, dictionary=dictionary, dictionary_options=options).fit(images(), class_id=1)
    importance = craft.importance(images())
    assert importance.shape == (3,) and torch.isfinite(importance).all() and importance.max() > 0
    maps = craft.concept_maps(images(2))
    assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all()
