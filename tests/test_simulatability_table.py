"""scripts/simulatability_table.py: the bias pool, the ranking agreement, the table, one short end-to-end run."""

import importlib.util
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from datamodules import ShortcutShapesDataModule

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("simulatability_table", ROOT / "scripts" / "simulatability_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bias_pool_pairs_each_scene_as_iid_and_flipped():
    script = load_script()
    data = ShortcutShapesDataModule(test_size=10, train_size=8, val_size=8)
    pool = script.observations(data, 10)
    assert pool["image"].shape == (20, 3, 32, 32) and pool["image_ids"].tolist() == list(range(10)) * 2
    # the two versions of a scene differ only on the watermark
    differs = (pool["image"][:10] != pool["image"][10:]).any(1)
    assert not differs[~pool["spurious_mask"][:10]].any() and differs.any()
    assert torch.equal(pool["label"][:10], pool["label"][10:])


def test_rank_agreement_is_spearman_over_the_explainers():
    script = load_script()
    rows = [{"model": "m", "explainer": name, "utility": (u, u, u), "deletion": d, "spurious": s}
            for name, u, d, s in [("a", 0.1, 0.5, 0.2), ("b", 0.3, 0.4, 0.1), ("c", 0.2, 0.9, 0.6)]]
    rows.append({"model": "m", "explainer": "random", "utility": (0.0, -0.1, 0.1)})  # controls are not ranked
    text = script.rank_agreement(rows)
    utility = [0.1, 0.3, 0.2]
    assert f"{spearmanr(utility, [-0.5, -0.4, -0.9]).statistic:.2f}" in text
    assert f"{spearmanr(utility, [0.2, 0.1, 0.6]).statistic:.2f}" in text


@pytest.mark.slow
def test_short_run_on_a_checkpoint(tmp_path, tiny_cli):
    from align.cli import main

    config = ROOT / "configs" / "shortcut" / "baseline_lipschitz.yaml"
    main(["fit", "--config", str(config), *tiny_cli, "--trainer.max_epochs=1", "--trainer.callbacks=[]",
          "--trainer.logger=false", "--run.root", str(tmp_path), "--run.test_after_fit=false"])
    (checkpoint,) = tmp_path.glob("*/*/checkpoints/last.ckpt")
    script = load_script()
    text = script.main(["--checkpoint", f"m={checkpoint}", "--scenes", "12", "--seeds", "2", "--steps", "3",
                        "--explainers", "saliency", "gradient_input", "--cache", str(tmp_path / "maps"),
                        "--out", str(tmp_path / "table.md")])
    for name in ("saliency", "gradient_input", "random", "oracle"):
        assert f"| `m` | {name} |" in text
    assert (tmp_path / "table.md").read_text().startswith("| model |")
    assert len(list((tmp_path / "maps").glob("*.pt"))) == 2
    assert script.shortcut_options(checkpoint)["image_size"] == 16  # the data the model was trained on
    with pytest.raises(SystemExit):
        script.parse(["--checkpoint", "m=/no/such.ckpt"])
