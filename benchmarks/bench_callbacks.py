"""Cost of watching explanations: wall time of the demo fit WITH the default ExplanationMonitor over the same fit
WITHOUT it, in one process (target: ratio <= 1.10).

The demo config (``configs/shortcut/harmonized_lipschitz.yaml``) is run through the project's LightningCLI
(``align.cli.main``, what ``train.py`` runs) twice per round: once with its callbacks minus every
``ExplanationMonitor``, once with the monitor of the config (or, if the config has none, the default
``ExplanationMonitor(model_attr="backbone")``: Saliency + Sobol + EVA for a 1-Lipschitz backbone, every epoch).
The demo's monitor is ``configs/callbacks/explain_lipschitz.yaml``, referenced by ``trainer.callbacks``. A short
warm-up fit comes first; then ``--repeats`` rounds alternate the two sides (so a change of machine load hits
both) and the medians are compared. W&B runs offline, as in ``make demo``; runs go to a temporary directory;
``run.test_after_fit`` is off (the test pass would dilute the ratio). The time spent inside the monitor's hooks
is also measured, giving a second ratio ``with / (with - hooks)`` that a change of machine load between the two
fits does not distort.

    python benchmarks/bench_callbacks.py [--config configs/shortcut/harmonized_lipschitz.yaml] [--repeats 1]
        [--max-epochs N] [--threads N] [-- CLI overrides for every fit, e.g. --trainer.logger=false]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "shortcut" / "harmonized_lipschitz.yaml"
MONITOR = "explain.callbacks.ExplanationMonitor"
DEFAULT_MONITOR = {"class_path": MONITOR, "init_args": {"model_attr": "backbone"}}


def _is_monitor(callback) -> bool:
    return isinstance(callback, dict) and callback.get("class_path", "").endswith("ExplanationMonitor")


def _inline(value, base: Path):
    """A ``key: path/to/part.yaml`` reference of the config (relative to it) loaded in place."""
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        return yaml.safe_load((base / value).read_text()) or {}
    return value


def split_config(path: Path, out: Path) -> tuple[Path, Path, dict]:
    """Two copies of the config: without any ExplanationMonitor, and with one (the config's or the default)."""
    config = yaml.safe_load(path.read_text()) or {}
    trainer_base = path.parent
    if isinstance(config.get("trainer"), str):  # trainer: ../trainer/x.yaml (its own references are relative to it)
        trainer_base = (path.parent / config["trainer"]).parent
    config = {key: _inline(value, path.parent) for key, value in config.items()}
    trainer = config.setdefault("trainer", {})
    callbacks = _inline(trainer.get("callbacks"), trainer_base) or []  # callbacks: ../callbacks/x.yaml
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    monitors = [c for c in callbacks if _is_monitor(c)] or [DEFAULT_MONITOR]
    others = [c for c in callbacks if not _is_monitor(c)]
    paths = []
    for name, chosen in (("without", others), ("with", others + monitors)):
        trainer["callbacks"] = chosen
        target = out / f"{path.stem}-{name}.yaml"
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(target)
    return paths[0], paths[1], monitors[0]


def time_monitor_hooks() -> list[float]:
    """Wrap the ExplanationMonitor's hooks with timers; returns the list their durations are appended to."""
    from explain.callbacks import ExplanationMonitor

    durations: list[float] = []
    for hook in ("setup", "on_validation_epoch_start", "on_validation_batch_end", "on_validation_epoch_end"):
        original = getattr(ExplanationMonitor, hook)

        def timed(self, *args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                durations.append(time.perf_counter() - start)

        setattr(ExplanationMonitor, hook, timed)
    return durations


def fit_seconds(config: Path, root: Path, version: str, extra: list[str]) -> float:
    from align.cli import main

    args = ["fit", "--config", str(config), "--run.root", str(root), "--run.version", version,
            "--trainer.enable_progress_bar=false", "--run.test_after_fit=false", *extra]
    start = time.perf_counter()
    main(args)
    wandb = sys.modules.get("wandb")  # imported by a WandbLogger, if the fit had one
    if wandb is not None and wandb.run is not None:  # close the offline run, or the next fit would reuse it
        wandb.finish()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (without, with) after the warm-up")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.epilog = "Arguments after `--` go to the CLI for every fit, e.g. -- --trainer.logger=false"
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not args.config.is_file():
        raise SystemExit(f"{args.config} does not exist yet: pass --config <the demo config>")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    extra = ([] if args.max_epochs is None else [f"--trainer.max_epochs={args.max_epochs}"]) + overrides
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        without, with_monitor, monitor = split_config(args.config, tmp)
        print(f"config: {args.config}\nmonitor: {monitor}")
        warmup = [*overrides, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
        fit_seconds(without, tmp / "runs", "warmup", warmup)
        durations = time_monitor_hooks()
        times: dict[str, list[float]] = {"without": [], "with": [], "hooks": []}
        for round_ in range(args.repeats):
            for name, config in (("without", without), ("with", with_monitor)):
                durations.clear()
                seconds = fit_seconds(config, tmp / "runs", f"{name}-{round_}", extra)
                times[name].append(seconds)
                if name == "with":
                    times["hooks"].append(sum(durations))
                print(f"  round {round_}: {name:>7} monitor {seconds:8.1f} s", flush=True)
    base, watched = statistics.median(times["without"]), statistics.median(times["with"])
    hooks = statistics.median(times["hooks"])
    print(f"fit without ExplanationMonitor: {base:.1f} s (median of {args.repeats})")
    print(f"fit with    ExplanationMonitor: {watched:.1f} s (median of {args.repeats}), {hooks:.1f} s of it inside "
          "the monitor's hooks")
    print(f"ratio with / without: {watched / base:.3f} (target <= 1.10)")
    # the same ratio from the time spent in the monitor, insensitive to the load changing between the two fits
    print(f"ratio from the hooks' time, with / (with - hooks): {watched / (watched - hooks):.3f}")


if __name__ == "__main__":
    main()
