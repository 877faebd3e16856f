"""train.py / align.cli: configs parse, fit and test from a checkpoint, one run directory, W&B mode, DDP."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from align import HarmonizedClassifier
from align.cli import main, resolve_wandb_mode

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
SHORTCUT = sorted((ROOT / "configs" / "shortcut").glob("*.yaml"))


@pytest.fixture
def tiny(tiny_cli: list[str]) -> list[str]:
    return [*tiny_cli, "--trainer.max_epochs=1"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(path.parent for path in root.glob("*/*/config.yaml"))


def test_the_shortcut_and_clickme_configs_exist():
    assert [path.stem for path in SHORTCUT] == [
        "baseline_cnn", "baseline_lipschitz", "baseline_lipschitz_resnet", "harmonized_cnn", "harmonized_lipschitz",
        "harmonized_vit", "rrr_cnn", "rrr_lipschitz",
    ]
    assert {path.stem for path in (ROOT / "configs" / "clickme").glob("*.yaml")} == {
        "harmonized_resnet50", "harmonized_lip_resnet", "harmonized_vit"
    }


def test_print_config_applies_overrides(capsys):
    config = str(ROOT / "configs" / "shortcut" / "harmonized_lipschitz.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--trainer.max_epochs=3", "--model.harmonization_weight=2", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["model"]["init_args"]["harmonization_weight"] == 2.0
    assert printed["model"]["init_args"]["backbone"]["class_path"] == "align.models.lip_vgg"
    assert printed["data"]["class_path"] == "datamodules.ShortcutShapesDataModule"
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"


@pytest.mark.parametrize("config", SHORTCUT, ids=lambda path: path.stem)
def test_fit_then_test_from_the_checkpoint(tmp_path, config, tiny):
    fit = main(["fit", "--config", str(config), *tiny, "--run.root", str(tmp_path), "--run.test_after_fit=false"])
    assert fit.trainer.current_epoch == 1
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.parent.name == config.stem  # runs/<experiment>/<version>
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["init_args"]["train_size"] == 32
    # the checkpoint alone rebuilds the model (the CLI stores the backbone's class_path/init_args)
    reloaded = HarmonizedClassifier.load_from_checkpoint(last)
    assert type(reloaded.backbone) is type(fit.model.backbone)
    assert reloaded.harmonization_weight == fit.model.harmonization_weight

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = main(["test", "--config", str(config), *tiny, "--run.root", str(tmp_path), "--ckpt_path", str(last)])
    # the restored ModelCheckpoint keeps the fit's directory: no "dirpath has changed" warning
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    metrics = test.trainer.callback_metrics
    for split in ("iid", "flipped"):
        assert {f"test/{split}/acc", f"test/{split}/alignment"} <= set(metrics)
    assert ("test/iid/certified_acc" in metrics) == ("lipschitz" in config.stem)
    assert test.model.harmonization_weight == fit.model.harmonization_weight


def test_demo_config_tests_after_fit_and_writes_everything_under_one_run_directory(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = ROOT / "configs" / "shortcut" / "harmonized_lipschitz.yaml"
    cli = main(["fit", "--config", str(config), *tiny, "--run.root", str(tmp_path), "--run.version", "v1"])
    run_dir = tmp_path / "harmonized_lipschitz" / "v1"
    assert run_dirs(tmp_path) == [run_dir]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert {"test/iid/acc", "test/flipped/acc"} <= set(cli.trainer.callback_metrics)  # run.test_after_fit: true


def test_last_checkpoint_is_the_latest_epoch_and_the_best_one_is_kept_apart(tmp_path, tiny):
    """With the learning rate at 0 val/acc never improves after epoch 0, so the best checkpoint stays epoch 0; last.ckpt
    must still hold the last epoch (Lightning 2.6's save_last=True would have written a copy of the best one)."""
    import torch

    config = ROOT / "configs" / "shortcut" / "baseline_cnn.yaml"
    fit = main(["fit", "--config", str(config), *tiny, "--trainer.max_epochs=3", "--run.root", str(tmp_path),
                "--run.test_after_fit=false", "--model.init_args.optimizer.init_args.lr=0"])
    (run_dir,) = run_dirs(tmp_path)
    files = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert files == ["epoch=0-step=2.ckpt", "last.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert fit.trainer.checkpoint_callback.best_model_path.endswith("epoch=0-step=2.ckpt")

    # `--ckpt_path last|best` of a later command: the experiment's newest run, not the command's own new directory
    for alias, name in (("last", "last.ckpt"), ("best", "epoch=0-step=2.ckpt")):
        test = main(["test", "--config", str(config), *tiny, "--run.root", str(tmp_path), "--ckpt_path", alias])
        assert test.config["test"]["ckpt_path"] == str(run_dir / "checkpoints" / name)
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no run under .*elsewhere.*baseline_cnn"):
        main(["test", "--config", str(config), *tiny, "--run.root", str(tmp_path / "elsewhere"), "--ckpt_path", "last"])
    # a fit resumes from the newest run's last.ckpt (3 epochs done: a 4th), and starts afresh, warned, without one
    resumed = main(["fit", "--config", str(config), *tiny, "--trainer.max_epochs=4", "--run.root", str(tmp_path),
                    "--run.test_after_fit=false", "--ckpt_path", "last"])
    assert resumed.config["fit"]["ckpt_path"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert resumed.trainer.global_step == 8
    with pytest.warns(UserWarning, match="no run under .*fresh.*starts from the model's initial weights"):
        fresh = main(["fit", "--config", str(config), *tiny, "--run.root", str(tmp_path / "fresh"),
                      "--run.test_after_fit=false", "--ckpt_path", "last"])
    assert fresh.config["fit"]["ckpt_path"] is None and fresh.trainer.global_step == 2


@pytest.mark.parametrize("logger", ["CSVLogger", "TensorBoardLogger"])
def test_other_loggers_write_into_the_run_directory(tmp_path, logger, tiny):
    config = ROOT / "configs" / "shortcut" / "baseline_cnn.yaml"
    args = ["fit", "--config", str(config), *tiny, "--run.root", str(tmp_path), "--run.test_after_fit=false"]
    main([*args, f"--trainer.logger={logger}", "--trainer.log_every_n_steps=1"])
    (run_dir,) = run_dirs(tmp_path)
    if logger == "CSVLogger":
        assert "train/loss" in (run_dir / "metrics.csv").read_text()
    else:
        assert list(run_dir.glob("events.out.tfevents.*"))


def test_wandb_mode_is_decided_without_prompting(tmp_path):
    netrc = tmp_path / "netrc"
    assert resolve_wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}) == "disabled"
    assert resolve_wandb_mode({"WANDB_API_KEY": "x", "NETRC": str(netrc)}) == "online"
    assert resolve_wandb_mode({"NETRC": str(netrc)}) == "offline"  # no file
    netrc.write_text("machine example.com login user password secret\n")
    assert resolve_wandb_mode({"NETRC": str(netrc)}) == "offline"
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert resolve_wandb_mode({"NETRC": str(netrc)}) == "online"
    netrc.write_text("machine wandb.example.org login user password secret\n")
    assert resolve_wandb_mode({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "online"
    netrc.write_text("this is not a netrc file\n")
    assert resolve_wandb_mode({"NETRC": str(netrc)}) == "offline"


def test_ddp_on_two_cpu_processes(tmp_path, tiny):
    config = ROOT / "configs" / "shortcut" / "harmonized_lipschitz.yaml"
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), *tiny,
        "--trainer.strategy=ddp", "--trainer.devices=2", "--run.root", str(tmp_path),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("ALIGN_RUN_VERSION", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)  # both processes wrote into the same run directory
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # the test after fit ends with the summary (rows iid and flipped), printed once: by rank 0 alone
    assert result.stdout.count("Test of harmonized_lipschitz/") == 1
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.split()[:1] in (["iid"], ["flipped"])]
    assert rows == ["iid", "flipped"] and "spurious cue" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("statistics", ["frozen", "ghost"])
def test_split_batch_statistics_train_under_ddp(tmp_path, tiny, statistics):
    """A BatchNorm CNN harmonized with the split step on 2 CPU processes: the fit runs (every parameter gets a
    gradient in each process, as DDP requires), and each BatchNorm layer's running statistics were updated once per
    optimizer step, as in a plain step."""
    import torch

    config = ROOT / "configs" / "shortcut" / "harmonized_cnn.yaml"
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), *tiny, "--data.train_size=64",
        "--data.annotated_fraction=0.3", "--trainer.max_epochs=2", "--trainer.strategy=ddp", "--trainer.devices=2",
        f"--model.init_args.batch_statistics={statistics}", "--run.root", str(tmp_path), "--run.test_after_fit=false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("ALIGN_RUN_VERSION", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps = state["global_step"]
    assert steps == 2 * 64 // (2 * 16)  # 2 epochs of 32 images per process in batches of 16
    tracked = [value.item() for name, value in state["state_dict"].items() if name.endswith("num_batches_tracked")]
    assert tracked and all(count == steps for count in tracked)


def test_processes_of_a_slurm_or_torchrun_job_share_the_run_version():
    from align.cli import _job_version

    assert _job_version({}) is None
    assert _job_version({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "1"}) is None  # one process: a time stamp
    assert _job_version({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "3"}) == "slurm-42.3"
    assert _job_version({"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "none"}) is None  # torchrun's default id
    assert _job_version({"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job7"}) == "torchrun-job7"
