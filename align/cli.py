"""The project's ``LightningCLI``: ``python train.py fit --config configs/shortcut/harmonized_lipschitz.yaml``.

On top of Lightning's CLI (subclass mode for the model and the data, every ``--trainer.*``/``--model.*``/
``--data.*`` override, ``--print_config``, seeded by default) it adds:

* one directory per run, ``<run.root>/<run.experiment>/<run.version>/`` (default ``runs/<config name>/<time>``,
  created atomically with a ``-1``, ``-2``, ... suffix when taken: :func:`claim_run_dir`), holding the resolved
  ``config.yaml``, ``checkpoints/`` and the logger's files (the W&B offline run, or the CSV/TensorBoard logs);
* a W&B logger by default, online only when the user is logged in and W&B's host answers (see
  :func:`choose_wandb_mode`), never prompting nor blocking; the resolved config is also logged to every logger;
* ``--ckpt_path`` checked before Lightning reads it (:func:`check_checkpoint`), and a warning naming every
  ``--model.*`` value that the checkpoint's hyperparameters replace;
* a ``checkpoint`` group (``ModelCheckpoint``: the best ``val/acc``) and a ``last_checkpoint`` group (``last.ckpt``,
  rewritten at every validation);
* a rich progress bar;
* ``run.test_after_fit``: after ``fit``, test the best checkpoint on the datamodule's test splits (skipped with a
  notice when it has none: :func:`has_test_split`);
* after every test, a compact summary (one row per test split, :mod:`align.summary`) and one sentence that reads
  it, instead of Lightning's per-dataloader tables (back with ``--run.lightning_tables=true``);
* a quiet start: library notices that are not about the run are filtered by message and module
  (:func:`explain.quiet.quiet_library_notices`).
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from align.module import HarmonizedClassifier
from align.summary import print_summary
from explain.metrics.functional.alignment import CLICKME_CEILING
from explain.quiet import quiet_library_notices

#: environment variable through which the DDP processes that Lightning launches get the run version of rank 0
VERSION_ENV = "ALIGN_RUN_VERSION"
WANDB_PROJECT = "aligned-vision"


#: W&B's default API host before its base URL moved; ``wandb login`` wrote its credentials under this name
LEGACY_WANDB_HOST = "api.wandb.ai"
#: seconds the connectivity probe waits for W&B's host before the run falls back to offline
WANDB_PROBE_TIMEOUT = 3.0


def wandb_base_url(environ: Mapping[str, str] | None = None) -> str:
    """W&B's configured base URL: ``WANDB_BASE_URL`` when set, else the ``base_url`` of W&B's settings files
    (``$WANDB_CONFIG_DIR/settings`` or ``~/.config/wandb/settings``, then ``./wandb/settings``; ``wandb login
    --host`` writes there), else W&B's default; read with W&B's own ``wandb.Settings``."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_BASE_URL"):
        return environ["WANDB_BASE_URL"]
    import wandb

    config_dir = Path(environ.get("WANDB_CONFIG_DIR") or Path("~", ".config", "wandb")).expanduser()
    settings = wandb.Settings(silent=True, settings_system=str(config_dir / "settings"))
    settings.update_from_system_settings()  # the global file, then the workspace's wandb/settings
    return settings.base_url


def _netrc_hosts(environ: Mapping[str, str]) -> set[str]:
    """The netrc machine names that hold W&B credentials for its configured host."""
    parsed = urlparse(wandb_base_url(environ))
    hosts = {host for host in (parsed.netloc, parsed.hostname) if host}
    if not environ.get("WANDB_BASE_URL"):
        hosts.add(LEGACY_WANDB_HOST)  # W&B's default host forwards to api.wandb.ai, where older logins are stored
    return hosts


def resolve_wandb_mode(environ: Mapping[str, str] | None = None) -> str:
    """W&B mode for this run, decided without ever prompting (and without the network: see :func:`choose_wandb_mode`).

    1. ``WANDB_MODE`` when set to a non-empty value (``online``, ``offline``, ``disabled``, ...): the user's choice
       wins; an empty ``WANDB_MODE`` counts as unset;
    2. ``online`` when ``WANDB_API_KEY`` is set, or when the netrc file (``NETRC`` or ``~/.netrc``, where
       ``wandb login`` writes) holds credentials for W&B's configured host (:func:`wandb_base_url`);
    3. ``offline`` otherwise: the run is written under the run directory; upload it later with ``wandb sync``.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    path = Path(environ.get("NETRC", Path(environ.get("HOME", Path.home())) / ".netrc")).expanduser()
    try:
        if path.is_file():
            credentials = netrc.netrc(path)
            if any(credentials.authenticators(host) for host in _netrc_hosts(environ)):
                return "online"
    except (netrc.NetrcParseError, OSError):
        pass
    return "offline"


def wandb_reachable(base_url: str, timeout: float = WANDB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the host of ``base_url`` opens within ``timeout`` seconds (name resolution
    included: the probe runs in a daemon thread that is abandoned after ``timeout``)."""
    parsed = urlparse(base_url)
    if not parsed.hostname:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def choose_wandb_mode(environ: Mapping[str, str] | None = None, timeout: float = WANDB_PROBE_TIMEOUT) -> str:
    """:func:`resolve_wandb_mode`, then, when it says ``online``, a connectivity probe of W&B's configured host
    (:func:`wandb_reachable`): unreachable within ``timeout`` seconds, the run goes ``offline`` with a warning
    instead of blocking (W&B itself waits about 100 s, then fails the run)."""
    mode = resolve_wandb_mode(environ)
    if mode != "online":
        return mode
    base_url = wandb_base_url(environ)
    if wandb_reachable(base_url, timeout):
        return mode
    rank_zero_warn(
        f"W&B credentials found but {base_url} is not reachable (probed for up to {timeout:g} s): this run logs to "
        "W&B offline (upload it later with `wandb sync <run dir>/wandb/offline-run-*`); set WANDB_MODE to choose "
        "yourself"
    )
    return "offline"


class LoggedConfigCallback(SaveConfigCallback):
    """Writes the resolved ``config.yaml`` into the run directory and logs the same config to every logger."""

    @override
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


#: ``--ckpt_path`` values that Lightning resolves itself (not file paths)
CHECKPOINT_ALIASES = ("best", "last", "hpc", "registry")
#: aliases resolved here, in the experiment's runs: Lightning would look in this invocation's own, new run directory
RUN_ALIASES = ("best", "last")


def resolve_checkpoint_alias(alias: str, experiment_dir: Path) -> Path:
    """``--ckpt_path last`` or ``best``: the newest run of the experiment (``<root>/<experiment>/<version>``, the
    latest-written ``checkpoints/last.ckpt``), its ``last.ckpt`` or the best checkpoint its ``ModelCheckpoint``
    recorded. Every invocation of the CLI gets a new run directory, where Lightning's own resolution of these
    aliases would find nothing and go on from untrained weights.

    Raises:
        FileNotFoundError: no run of the experiment has a ``last.ckpt``, or its best checkpoint is gone.
    """
    runs = sorted(experiment_dir.glob("*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(
            f"--ckpt_path {alias}: no run under {experiment_dir} has a checkpoints/last.ckpt (set --run.root and "
            "--run.experiment to the fit's, or give the checkpoint file's path)"
        )
    last = runs[-1]
    if alias == "last":
        return last
    states = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    best = [state.get("best_model_path") for key, state in states.items()
            if key.startswith("ModelCheckpoint") and state.get("monitor")]
    best = [Path(path) for path in best if path]
    if not best or not best[0].is_file():
        raise FileNotFoundError(
            f"--ckpt_path best: {last} records no best checkpoint that still exists ({best[0] if best else 'none'}); "
            "give the checkpoint file's path"
        )
    return best[0]


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise an error naming ``path`` when it is not a readable Lightning checkpoint (missing, empty, truncated,
    not a checkpoint at all); Lightning's own errors say "PytorchStreamReader failed" or "Ran out of input".

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an empty file, a file that does not load, or one without a ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"--ckpt_path {path}: the checkpoint file is empty (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on the damage
        raise ValueError(
            f"--ckpt_path {path}: cannot read the checkpoint ({type(error).__name__}: {error}); the file is truncated "
            "or not a PyTorch checkpoint"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (no 'state_dict' in it)")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (lists and tuples are leaves, compared as lists)."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def has_test_split(datamodule: Any) -> bool:
    """Whether ``datamodule`` can be tested: its ``has_test_split`` when it defines one (a ClickMe folder without
    ``test.csv``, TFRecords without ``test_shards``), else whether it defines ``test_dataloader`` at all."""
    if datamodule is None:
        return False
    declared = getattr(datamodule, "has_test_split", None)
    if declared is not None:
        return bool(declared)
    return is_overridden("test_dataloader", datamodule, LightningDataModule)


def claim_run_dir(parent: Path, version: str) -> str:
    """Create ``parent/<version>`` atomically (``os.mkdir`` fails if it exists, even when another process created
    it a microsecond ago) and return the name it got: ``version``, else ``version-1``, ``version-2``, ... So two
    fits started in the same second never share a directory (nor overwrite each other's config and checkpoints)."""
    parent.mkdir(parents=True, exist_ok=True)
    name, suffix = version, 1
    while True:
        try:
            os.mkdir(parent / name)
            return name
        except FileExistsError:
            name, suffix = f"{version}-{suffix}", suffix + 1


def _class_name(value: Any) -> str:
    class_path = value.get("class_path", "") if isinstance(value, (dict, Namespace)) else ""
    return class_path.rsplit(".", 1)[-1]


class AlignCLI(LightningCLI):
    """``LightningCLI`` with run directories, W&B by default, checkpoints, a rich bar and test-after-fit."""

    _asked_model: Namespace | None = None  # the model config asked for, when a --ckpt_path will replace it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_library_notices()
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

    @override
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
        parser.add_argument(
            "--run.lightning_tables", type=bool, default=False,
            help="Also print Lightning's per-dataloader tables of every test metric (default: the summary only; "
            "this flag sets Lightning's `verbose` of `test`).",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": False})
        # last.ckpt: the state after the latest validation. Since Lightning 2.6, ModelCheckpoint(save_last=True)
        # writes last.ckpt only when a top-k checkpoint is saved at the same step, so with the best-val/acc
        # checkpoint it was a copy of the best epoch, and a resume from it went back in time. A second
        # ModelCheckpoint without a monitor keeps one file, rewritten at every validation.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.filename": "last", "last_checkpoint.save_top_k": 1,
                             "last_checkpoint.enable_version_counter": False})

    # ---------------------------------------------------------------- --ckpt_path
    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads it: the file must load (an empty, truncated or
        garbage file gets an error naming it), and the model config asked for is kept, so that
        :meth:`before_instantiate_classes` can name every value the checkpoint's hyperparameters replace."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in RUN_ALIASES:
            config = self.config[subcommand]
            try:
                ckpt_path = str(resolve_checkpoint_alias(ckpt_path, Path(config.run.root) / self._experiment(config)))
            except FileNotFoundError as error:
                if subcommand != "fit":  # testing untrained weights is never what was asked
                    raise
                # a fit with --ckpt_path last resumes when it can (a requeued job's first run starts afresh), as
                # Lightning's own alias does
                rank_zero_warn(f"{error}: the fit starts from the model's initial weights")
                ckpt_path = None
            else:
                rank_zero_info(f"--ckpt_path {config.ckpt_path}: {ckpt_path}")
            config.ckpt_path = ckpt_path
        self._asked_model = None
        if ckpt_path and ckpt_path not in CHECKPOINT_ALIASES:
            if "://" not in str(ckpt_path):  # remote checkpoints (fsspec URLs) are Lightning's to read
                check_checkpoint(ckpt_path)
            self._asked_model = self.config[subcommand].model.clone()

    def _warn_checkpoint_overrides(self, config: Namespace) -> None:
        """LightningCLI rebuilds the model from the ``--ckpt_path`` checkpoint's hyperparameters, which replace the
        config's and the command line's ``--model.*`` values: say which, with both values."""
        if self._asked_model is None:
            return
        asked, used = _flatten(self._asked_model.as_dict()), _flatten(config.model.as_dict())
        changed = [key for key in sorted(asked.keys() & used.keys()) if asked[key] != used[key]]
        if changed:
            listed = "; ".join(f"model.{key}: asked {asked[key]!r}, the checkpoint's {used[key]!r} is used"
                               for key in changed)
            rank_zero_warn(
                f"--ckpt_path {config.ckpt_path}: the checkpoint's hyperparameters replace the model config: {listed}. "
                "The model is rebuilt as it was trained; to change these values, start a new fit without --ckpt_path"
            )

    # ---------------------------------------------------------------- run directory
    @staticmethod
    def _experiment(config: Namespace) -> str:
        """``--run.experiment``, by default the name of the last ``--config`` file (``default`` without one)."""
        if config.run.experiment:
            return config.run.experiment
        configs = [str(path) for path in (config.get("config") or [])]
        return Path(configs[-1]).stem if configs else "default"

    def _run_dir(self, config: Namespace) -> Path:
        """``<root>/<experiment>/<version>``, the same on every process of a DDP run: the processes Lightning
        launches itself inherit rank 0's version (``ALIGN_RUN_VERSION``); under SLURM or torchrun every process
        derives it from the job id (:func:`_job_version`); with another launcher pass ``--run.version``."""
        experiment = self._experiment(config)
        version = config.run.version
        if not version and os.environ.get("LOCAL_RANK", "0") != "0":
            version = os.environ.get(VERSION_ENV)  # a DDP process launched by rank 0: use rank 0's directory
        if not version:
            job = _job_version(os.environ)  # the same on every process of the job: shared, never suffixed
            version = job or time.strftime("%Y%m%d-%H%M%S")
            if self.subcommand != "fit":
                version = f"{version}-{self.subcommand}"
            if job is None and os.environ.get("LOCAL_RANK", "0") == "0":
                version = claim_run_dir(Path(config.run.root) / experiment, version)
        os.environ[VERSION_ENV] = version  # inherited by the DDP processes Lightning launches from this one
        config.run.experiment, config.run.version = experiment, version
        return Path(config.run.root) / experiment / version

    @override
    def before_instantiate_classes(self) -> None:
        if os.environ.get("WANDB_MODE") == "":
            del os.environ["WANDB_MODE"]  # unset, as resolve_wandb_mode reads it (W&B's settings refuse "")
        config = self.config[self.subcommand]
        self._warn_checkpoint_overrides(config)
        run_dir = self._run_dir(config)
        config.trainer.default_root_dir = str(run_dir)
        ckpt_path = config.get("ckpt_path") if self.subcommand != "fit" else None
        for group in (config.checkpoint, config.last_checkpoint):
            if group.dirpath is None:
                if ckpt_path and Path(ckpt_path).is_file():
                    # test/validate/predict restore the fit's ModelCheckpoint state: keep its directory (they write
                    # no checkpoint), else Lightning warns that the directory changed and drops the best-k bookkeeping
                    group.dirpath = str(Path(ckpt_path).parent)
                else:
                    group.dirpath = str(run_dir / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            self._place_logger(logger, run_dir, config)
        if self.subcommand == "test":  # the summary replaces Lightning's tables (its `verbose`)
            config.verbose = config.run.lightning_tables

    @staticmethod
    def _place_logger(logger: Any, run_dir: Path, config: Namespace) -> None:
        """Point a logger's files at the run directory (unless the user gave another place)."""
        name = _class_name(logger)
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None:
            return
        if name == "WandbLogger":
            if init.get("mode") is None and not init.get("offline"):
                # given to wandb.init explicitly (wandb keeps the settings of the first run of a process)
                init.mode = choose_wandb_mode()
            if init.get("save_dir") in (None, "."):
                init.save_dir = str(run_dir)
            if init.get("name") is None:
                init.name = f"{config.run.experiment}/{config.run.version}"
        elif name in ("CSVLogger", "TensorBoardLogger"):
            if init.get("save_dir") in (None, "", "."):
                init.save_dir = str(run_dir)
                init.name, init.version = "", ""

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
                # Lightning always passes anonymous=None to wandb.init, which then warns "The anonymous setting has
                # no effect"; leave the setting out (it does nothing in wandb >= 0.19)
                logger._wandb_init.pop("anonymous", None)
        return trainer

    # ---------------------------------------------------------------- subcommands
    def after_fit(self) -> None:
        if self.config.fit.run.test_after_fit and not has_test_split(self.datamodule):
            rank_zero_info(
                f"run.test_after_fit: {type(self.datamodule).__name__} has no test split (e.g. a ClickMe folder "
                "without test.csv), so the test after fit is skipped"
            )
        elif self.config.fit.run.test_after_fit:
            # the path itself: "best" would make Lightning warn that it picks the first of the two ModelCheckpoints
            monitored = [callback for callback in self.trainer.checkpoint_callbacks if callback.monitor]
            best = monitored[0].best_model_path if monitored else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None,
                              verbose=self.config.fit.run.lightning_tables)
            self._print_summary()
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._print_summary()
        self._finish_wandb()

    def _print_summary(self) -> None:
        """The test's answer on rank zero: :func:`align.summary.print_summary` of the logged test metrics."""
        if not self.trainer.is_global_zero:
            return
        config = self.config[self.subcommand]
        ceiling = getattr(self.model, "hparams", {}).get("alignment_ceiling", CLICKME_CEILING)
        print_summary(self.trainer.callback_metrics, ceiling,
                      splits=getattr(self.datamodule, "test_split_names", None),
                      title=f"Test of {config.run.experiment}/{config.run.version}")

    def after_predict(self) -> None:
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        """Close this run's W&B run, so that a next CLI run in the same process gets its own (Lightning's
        WandbLogger would otherwise reuse the run still open)."""
        if not any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            return
        import wandb

        if self.trainer.is_global_zero and wandb.run is not None:  # the run the WandbLogger opened, if it did
            wandb.finish()


def configs_root() -> Path:
    """The configs shipped with the package (``align/configs``; in the repository, a link to ``configs/``)."""
    return Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the packaged experiment configs, e.g. ``shortcut/harmonized_lipschitz`` (the parts that others
    reference, ``data/``, ``trainer/`` and ``callbacks/``, are left out)."""
    root = configs_root()
    parts = ("data", "trainer", "callbacks")
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.glob("*/*.yaml")
                  if path.parent.name not in parts)


def resolve_config(value: str) -> str:
    """``--config`` value -> a path: an existing file as given, else a packaged config by name (``shortcut/
    harmonized_lipschitz``, ``.yaml`` optional, ``configs/`` prefix optional). Inline YAML (anything with ``:``
    or a brace) is returned unchanged.

    Raises:
        FileNotFoundError: neither a file nor a packaged config; the message lists the packaged ones.
    """
    if Path(value).is_file() or any(char in value for char in ":{}\n"):
        return value
    name = value.removeprefix("configs/").removesuffix(".yaml")
    candidate = configs_root() / f"{name}.yaml"
    if name and candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"--config {value}: no such file, and no packaged config of that name; packaged configs: "
        f"{', '.join(packaged_configs())}"
    )


def _resolve_config_args(args: list[str]) -> list[str]:
    """Every ``--config X`` / ``--config=X`` of a command line through :func:`resolve_config`."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = resolve_config(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + resolve_config(arg.removeprefix("--config="))
    return resolved


def main(args: Any = None) -> AlignCLI:
    """Entry point of ``train.py`` and ``python -m align.train``; ``args`` as for ``LightningCLI`` (None: the
    command line). ``--config`` also takes the name of a packaged config (:func:`resolve_config`)."""
    if args is None:  # resolved in place: LightningCLI warns when given both args and a command line
        try:
            sys.argv[1:] = _resolve_config_args(sys.argv[1:])
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
    elif isinstance(args, (list, tuple)):
        args = _resolve_config_args([str(arg) for arg in args])
    return AlignCLI(args=args)
