"""Shared test setup: W&B never reaches the network or prompts, torch runs deterministically on CPU."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cli() -> list[str]:
    """CLI overrides that make any shortcut config a seconds-long CPU run (tiny data, no bar, no summary)."""
    return [
        "--data.train_size=32",
        "--data.val_size=16",
        "--data.test_size=16",
        "--data.batch_size=16",
        "--data.image_size=16",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
