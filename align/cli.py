"""The project's ``LightningCLI``: ``python train.py fit --config configs/shortcut/harmonized_lipschitz.yaml``.

On top of Lightning's CLI (subclass mode for the model and the data, every ``--trainer.*``/``--model.*``/
``--data.*`` override, ``--print_config``, seeded by default) it adds:

* one directory per run, ``<run.root>/<run.experiment>/<run.version>/`` (default ``runs/<config name>/<time>``),
  holding the resolved ``config.yaml``, ``checkpoints/`` and the logger's files (the W&B offline run, or the
  CSV/TensorBoard logs);
* a W&B logger by default, online only when the user is logged in (see :func:`resolve_wandb_mode`), never
  prompting; the resolved config is also logged to every logger;
* a ``checkpoint`` group (``ModelCheckpoint``: ``last.ckpt`` plus the best ``val/acc``);
* a rich progress bar;
* ``run.test_after_fit``: after ``fit``, test the best checkpoint on the datamodule's test splits.
"""

from __future__ import annotations

import netrc
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from align.module import HarmonizedClassifier

#: environment variable through which the DDP processes that Lightning launches get the run version of rank 0
VERSION_ENV = "ALIGN_RUN_VERSION"
WANDB_PROJECT = "aligned-vision"


def resolve_wandb_mode(environ: dict[str, str] | None = None) -> str:
    """W&B mode for this run, decided without ever prompting.

    1. ``WANDB_MODE`` when set (``online``, ``offline``, ``disabled``, ...): the user's choice wins;
    2. ``online`` when ``WANDB_API_KEY`` is set, or when the netrc file (``NETRC`` or ``~/.netrc``, where
       ``wandb login`` writes) holds credentials for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai);
    3. ``offline`` otherwise: the run is written under the run directory; upload it later with ``wandb sync``.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(environ.get("NETRC", Path(environ.get("HOME", Path.home())) / ".netrc")).expanduser()
    try:
        if path.is_file() and netrc.netrc(path).authenticators(host):
            return "online"
    except (netrc.NetrcParseError, OSError):
        pass
    return "offline"


class LoggedConfigCallback(SaveConfigCallback):
    """Writes the resolved ``config.yaml`` into the run directory and logs the same config to every logger."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def _job_version(environ: Mapping[str, str]) -> str | None:
    """A run version shared by every process of a multi-process job started by SLURM (``srun``, one task per
    process) or torchrun with an ``--rdzv-id``; None otherwise (a single process picks a fresh time stamp)."""
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and environ.get("SLURM_JOB_ID"):
        return f"slurm-{environ['SLURM_JOB_ID']}.{environ.get('SLURM_STEP_ID', '0')}"
    run_id = environ.get("TORCHELASTIC_RUN_ID", "none")
    if int(environ.get("WORLD_SIZE", "1")) > 1 and run_id != "none":  # torchrun's default id "none" is not unique
        return f"torchrun-{run_id}"
    return None


def _class_name(value: Any) -> str:
    class_path = value.get("class_path", "") if isinstance(value, (dict, Namespace)) else ""
    return class_path.rsplit(".", 1)[-1]


class AlignCLI(LightningCLI):
    """``LightningCLI`` with run directories, W&B by default, checkpoints, a rich bar and test-after-fit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", HarmonizedClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggedConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)  # the optimizer is a model argument
        trainer_defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": WANDB_PROJECT},
            },
            **kwargs.pop("trainer_defaults", {}),
        }
        super().__init__(*args, trainer_defaults=trainer_defaults, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="Directory holding every run.")
        parser.add_argument(
            "--run.experiment", type=str | None, default=None, help="Experiment name (default: the config's name)."
        )
        parser.add_argument(
            "--run.version", type=str | None, default=None, help="Run name within the experiment (default: time)."
        )
        parser.add_argument(
            "--run.test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint."
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": True})

    # ---------------------------------------------------------------- run directory
    def _run_dir(self, config: Namespace) -> Path:
        """``<root>/<experiment>/<version>``, the same on every process of a DDP run: the processes Lightning
        launches itself inherit rank 0's version (``ALIGN_RUN_VERSION``); under SLURM or torchrun every process
        derives it from the job id (:func:`_job_version`); with another launcher pass ``--run.version``."""
        experiment = config.run.experiment
        if not experiment:
            configs = [str(path) for path in (config.get("config") or [])]
            experiment = Path(configs[-1]).stem if configs else "default"
        version = config.run.version
        if not version and os.environ.get("LOCAL_RANK", "0") != "0":
            version = os.environ.get(VERSION_ENV)  # a DDP process launched by rank 0: use rank 0's directory
        if not version:
            job = _job_version(os.environ)  # the same on every process: no collision check, no time stamp
            version = job or time.strftime("%Y%m%d-%H%M%S")
            if self.subcommand != "fit":
                version = f"{version}-{self.subcommand}"
            base, suffix = version, 1
            while job is None and (Path(config.run.root) / experiment / version).exists():
                version, suffix = f"{base}-{suffix}", suffix + 1
        os.environ[VERSION_ENV] = version  # inherited by the DDP processes Lightning launches from this one
        config.run.experiment, config.run.version = experiment, version
        return Path(config.run.root) / experiment / version

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        run_dir = self._run_dir(config)
        config.trainer.default_root_dir = str(run_dir)
        if config.checkpoint.dirpath is None:
            ckpt_path = config.get("ckpt_path") if self.subcommand != "fit" else None
            if ckpt_path and Path(ckpt_path).is_file():
                # test/validate/predict restore the fit's ModelCheckpoint state: keep its directory (they write no
                # checkpoint), else Lightning warns that the directory changed and drops the best-k bookkeeping
                config.checkpoint.dirpath = str(Path(ckpt_path).parent)
            else:
                config.checkpoint.dirpath = str(run_dir / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            self._place_logger(logger, run_dir, config)

    @staticmethod
    def _place_logger(logger: Any, run_dir: Path, config: Namespace) -> None:
        """Point a logger's files at the run directory (unless the user gave another place)."""
        name = _class_name(logger)
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None:
            return
        if name == "WandbLogger":  # its mode is set in instantiate_trainer
            if init.get("save_dir") in (None, "."):
                init.save_dir = str(run_dir)
            if init.get("name") is None:
                init.name = f"{config.run.experiment}/{config.run.version}"
        elif name in ("CSVLogger", "TensorBoardLogger"):
            if init.get("save_dir") in (None, "", "."):
                init.save_dir = str(run_dir)
                init.name, init.version = "", ""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and isinstance(getattr(logger, "_wandb_init", None), dict):
                # given to wandb.init explicitly (wandb keeps the settings of the first run of a process)
                if logger._wandb_init.get("mode") is None:
                    logger._wandb_init["mode"] = resolve_wandb_mode()
        return trainer

    # ---------------------------------------------------------------- subcommands
    def after_fit(self) -> None:
        if self.config.fit.run.test_after_fit:
            checkpoint = self.trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()

    def after_predict(self) -> None:
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        """Close this run's W&B run, so that a next CLI run in the same process gets its own (Lightning's
        WandbLogger would otherwise reuse the run still open)."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero and logger._experiment is not None:
                logger.experiment.finish()


def main(args: Any = None) -> AlignCLI:
    """Entry point of ``train.py``; ``args`` as for ``LightningCLI`` (None: the command line)."""
    return AlignCLI(args=args)
