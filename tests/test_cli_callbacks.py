"""The explanation callbacks of the configs: resolved by the CLI, composable, and logging during a real fit."""

import csv
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from align.cli import main
from explain.callbacks import ExplanationMonitor

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shortcut" / "harmonized_lipschitz.yaml"
EXPERIMENTS = sorted(path for folder in ("shortcut", "clickme") for path in (ROOT / "configs" / folder).glob("*.yaml"))


def printed_config(config: Path, capsys, *overrides: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def explainer_names(callback: dict) -> list[str]:
    names = []
    for item in callback["init_args"]["explainers"]:
        names += [item] if isinstance(item, str) else list(item)
    return names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_print_config_shows_the_monitor_of_every_experiment(config, capsys):
    """Each experiment references a callbacks file; jsonargparse resolves it into trainer.callbacks."""
    printed = printed_config(config, capsys)
    callbacks = printed["trainer"]["callbacks"]
    (monitor,) = [c for c in callbacks if c["class_path"] == "explain.callbacks.ExplanationMonitor"]
    args = monitor["init_args"]
    assert args["model_attr"] == "backbone"
    expected = ["saliency", "sobol"] + (["eva"] if "lip" in config.stem else [])
    assert explainer_names(monitor) == expected
    assert {"alignment", "deletion"} <= {m if isinstance(m, str) else next(iter(m)) for m in args["metrics"]}
    # the rest of the trainer group is still there (it used to come from configs/trainer/*.yaml)
    trainer_file = "gpus.yaml" if config.parent.name == "clickme" else "shortcut.yaml"
    reference = yaml.safe_load((ROOT / "configs" / "trainer" / trainer_file).read_text())
    assert {key: printed["trainer"][key] for key in reference} == reference
    # the options are accepted by the classes (unknown explainer/metric options fail in the constructor)
    ExplanationMonitor(**args)


def test_callbacks_can_be_added_and_changed_on_the_command_line(capsys):
    printed = printed_config(
        DEMO, capsys, "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks+=LearningRateMonitor"
    )
    classes = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert classes == ["explain.callbacks.ExplanationMonitor", "lightning.pytorch.callbacks.LearningRateMonitor"]
    assert printed["trainer"]["callbacks"][0]["init_args"]["every_n_epochs"] == 1
    assert printed["checkpoint"]["monitor"] == "val/acc"  # the CLI's checkpoint group is untouched


def test_demo_fit_logs_explanations_through_the_cli(tmp_path, tiny_cli):
    """A tiny fit of the demo config (its monitor every epoch, 2 epochs) with a CSV logger: the explain/ keys
    are in metrics.csv, drift from the second evaluation on; ModelCheckpoint and an added callback still run."""
    args = [
        "fit", "--config", str(DEMO), *tiny_cli, "--run.root", str(tmp_path), "--run.version", "v1",
        "--run.test_after_fit=false", "--trainer.max_epochs=2", "--trainer.logger=CSVLogger",
        "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.num_samples=4",
        "--trainer.callbacks.max_images=4", "--trainer.callbacks+=LearningRateMonitor",
    ]
    cli = main(args)
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert {ExplanationMonitor, LearningRateMonitor, ModelCheckpoint} <= set(kinds)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    assert monitor.explainer_names == ["saliency", "sobol", "eva"] and monitor._evaluations == 2
    run_dir = tmp_path / "harmonized_lipschitz" / "v1"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value not in ("", None)}
    for explainer in ("saliency", "sobol", "eva"):
        for key in ("alignment", "alignment/spearman", "alignment/dice", "alignment/iou", "deletion",
                    "drift_vs_previous", "drift_vs_first"):
            assert f"explain/{explainer}/{key}" in logged, (explainer, key)
    drift = [row["explain/eva/drift_vs_first"] for row in rows if row.get("explain/eva/drift_vs_first")]
    assert len(drift) == 1 and -1.0 <= float(drift[0]) <= 1.0  # no reference at the first evaluation
    assert (run_dir / "explanations" / "epoch=0001" / "explain.eva.overlays.png").is_file()
