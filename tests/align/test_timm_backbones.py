"""timm backbones in the training side: a ViT harmonized step (input gradient through attention, double
backprop), and the explanation monitor with its defaults on a timm CNN and a ViT."""

import lightning as L
import pytest
import torch

from align import HarmonizedClassifier
from align.losses import HarmonizationLoss, TaskLoss, input_saliency
from align.models import timm_model
from datamodules import ShortcutShapesDataModule
from explain.callbacks import ExplanationMonitor

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, global_pool="avg")


def tiny(name: str) -> torch.nn.Module:
    return timm_model("vit_tiny_patch16_224", 4, **TINY_VIT) if name == "vit" else timm_model("test_resnet", 4)


def test_vit_harmonized_step_reaches_the_attention_weights_through_double_backprop():
    model = tiny("vit").train()
    images, labels, human = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,)), torch.rand(6, 16, 16)
    logits, saliency = input_saliency(model, images, labels)
    assert saliency.shape == (6, 16, 16) and saliency.requires_grad  # create_graph=True: a function of the weights
    harmonization = HarmonizationLoss(levels=3)(saliency, human, None)
    loss = TaskLoss("ce")(logits, labels) + harmonization
    assert torch.isfinite(loss) and harmonization > 0
    # the harmonization term alone gives gradients to the attention (query/key/value) weights of every block
    qkv = [block.attn.qkv.weight for block in model.blocks]
    grads = torch.autograd.grad(harmonization, qkv)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # and they differ from the task term's: the term changes the step
    task_grads = torch.autograd.grad(TaskLoss("ce")(model(images), labels), qkv)
    assert not torch.allclose(grads[0], task_grads[0])


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_explanation_monitor_defaults_run_on_timm_models(tmp_path, name):
    L.seed_everything(0, verbose=False)
    module = HarmonizedClassifier(tiny(name), harmonization_weight=0.3, levels=3)
    data = ShortcutShapesDataModule(
        num_classes=4, image_size=16, train_size=16, val_size=8, test_size=8, batch_size=8, num_workers=0
    )
    monitor = ExplanationMonitor(model_attr="backbone")  # the class defaults
    trainer = L.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    trainer.fit(module, data)
    logged = {key for key in trainer.callback_metrics if key.startswith("explain/")}
    assert logged and all(torch.isfinite(trainer.callback_metrics[key]) for key in logged)
    for explainer in ("saliency", "sobol"):  # the default explainers and metrics, on every image of the set
        assert {f"explain/{explainer}/alignment", f"explain/{explainer}/deletion"} <= logged


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    from align.optim import weight_decay_groups

    model = tiny("vit")
    decay, no_decay = ({id(p) for p in group["params"]} for group in weight_decay_groups(model, 1e-5))
    # the reference's exclusions: embeddings (position and patch) and the class token
    assert {id(model.pos_embed), id(model.cls_token), id(model.patch_embed.proj.weight)} <= no_decay
    assert id(model.blocks[0].attn.qkv.weight) in decay and id(model.blocks[0].attn.qkv.bias) in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
