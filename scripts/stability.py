"""MeGe and ReCo (Fel, Vigouroux et al. 2022) of explainers, from k models trained on k folds with the project's CLI.

    python scripts/stability.py --config configs/shortcut/baseline_cnn.yaml --folds 4 --explainers saliency sobol
    python scripts/stability.py --config configs/shortcut/baseline_cnn.yaml --folds 4 --explainers saliency sobol \
        --skip-training                                  # reuse the fold models trained before
    python scripts/stability.py --config configs/shortcut/baseline_cnn.yaml --folds 4 --explainers saliency \
        "{sobol: {nb_design: 16}}" -- --trainer.max_epochs=3    # explainer options; overrides for the CLI

1. Model ``i`` is trained on every fold but ``i`` by ``python train.py fit --config CONFIG
   --data.init_args.num_folds=k --data.init_args.fold=i --run.root ROOT --run.experiment EXPERIMENT
   --run.version fold<i> --run.test_after_fit=false [overrides]`` (one process per fold), so the runs are
   ``ROOT/EXPERIMENT/fold<i>/`` with ``checkpoints/last.ckpt``. ``--skip-training`` reuses them instead.
2. The evaluation set holds the first ``--images-per-fold`` images of each held-out fold (the datamodule of run
   ``i``, rebuilt from its ``config.yaml``, serves fold ``i`` unaugmented through ``heldout_dataloader()``),
   each with its fold. The datamodule must take ``num_folds``/``fold`` (``ShortcutShapesDataModule``,
   ``ClickMeFolderDataModule``).
3. For each explainer, :func:`explain.metrics.mege_reco`'s pairs give MeGe = 1 / (1 + mean S=) and
   ReCo = max TPR + TNR - 1; the table is printed and written to ``ROOT/EXPERIMENT/stability.{json,csv}``.

Explainers are registered names (``saliency``, ``smoothgrad``, ``gradient_input``, ``sobol``, ``eva``) or YAML
mappings ``"{name: {options}}"``, as in the callbacks' configs. Every fold model starts from the same seed
(``seed_everything`` of the config), so the folds differ by their training data only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import subprocess
import sys
import warnings
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning import LightningDataModule
from torch import Tensor, nn

import datamodules  # noqa: F401  (as in train.py: data class_paths may use the package's short names)
from align import HarmonizedClassifier
from align.cli import main as cli_main
from align.models import export_plain
from datamodules.folds import FoldedData, missing_fold_members
from explain.callbacks.registry import ExplainerSpec, resolve_explainers
from explain.metrics.functional.stability import fold_pair_distances, mege_score, reco_score

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
#: CLI options this script sets for every fold, which the extra overrides may not change
RESERVED = (
    "--run.root",
    "--run.experiment",
    "--run.version",
    "--data.num_folds",
    "--data.init_args.num_folds",
    "--data.fold",
    "--data.init_args.fold",
)


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The script's options and the LightningCLI overrides (everything after ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="stability.py",
        description="Train k fold models with the project's CLI and print MeGe and ReCo for each explainer.",
        epilog="Arguments after `--` go to the CLI for every fold, e.g. -- --trainer.max_epochs=3",
    )
    parser.add_argument("--config", action="append", required=True, help="CLI config (repeat to compose).")
    parser.add_argument("--folds", type=int, default=4, help="k: number of folds and of models (>= 2).")
    parser.add_argument(
        "--explainers", nargs="+", default=["saliency"], help='names, or YAML mappings "{sobol: {nb_design: 16}}".'
    )
    parser.add_argument("--images-per-fold", type=int, default=32, help="Held-out images per fold to explain.")
    parser.add_argument("--root", default="runs", help="Directory of the runs (the CLI's --run.root).")
    parser.add_argument("--experiment", default=None, help="Experiment directory (default: <config>-<k>folds).")
    parser.add_argument("--skip-training", action="store_true", help="Reuse ROOT/EXPERIMENT/fold<i> checkpoints.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images explained at a time.")
    parser.add_argument("--device", default=None, help="Device of the evaluation (default: cuda if available).")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds must be >= 2 (MeGe/ReCo compare models trained on different folds), got {args.folds}")
    if args.images_per_fold < 1:
        parser.error(f"--images-per-fold must be >= 1, got {args.images_per_fold}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    for override in overrides:
        if override.split("=", 1)[0] in RESERVED:
            parser.error(
                f"{override!r}: the script sets {override.split('=', 1)[0]} for every fold; use --root, "
                "--experiment and --folds instead"
            )
    if args.experiment is None:
        args.experiment = f"{Path(args.config[-1]).stem}-{args.folds}folds"
    return args, overrides


def explainer_specs(items: Sequence[str]) -> list[ExplainerSpec]:
    """Explainer specs from names or YAML mappings (``"{sobol: {nb_design: 16}}"``)."""
    try:
        parsed = [yaml.safe_load(item) if item.lstrip().startswith("{") else item for item in items]
        return resolve_explainers(parsed)
    except (ValueError, TypeError, ImportError, yaml.YAMLError) as error:
        raise SystemExit(f"stability.py: error: --explainers: {error}") from error


# ------------------------------------------------------------------------------------------------ data configs
def resolved_config(configs: Sequence[str], overrides: Sequence[str]) -> dict[str, Any]:
    """The config the CLI would run, ``--print_config`` of ``train.py fit`` (checks the overrides too)."""
    args = ["fit", *(arg for config in configs for arg in ("--config", config)), *overrides, "--print_config"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            cli_main(args)
        except SystemExit as exit_info:
            if exit_info.code not in (0, None):
                raise SystemExit(
                    f"stability.py: error: the CLI rejected {' '.join(args[:-1])} (its message is above)"
                ) from None
    return yaml.safe_load(printed.getvalue())


def check_fold_support(data: dict[str, Any], where: str) -> None:
    """Raise a clear error unless the datamodule of ``data`` (``class_path``/``init_args``) has folds."""
    class_path = data.get("class_path", "") if isinstance(data, dict) else ""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise SystemExit(
            f"stability.py: error: {where}: cannot import the datamodule {class_path!r}: {error}"
        ) from error
    missing = missing_fold_members(cls)
    if missing:
        raise SystemExit(
            f"stability.py: error: {where}: the datamodule {class_path} has no folds support (it needs the "
            f"arguments num_folds and fold and a heldout_dataloader() method, datamodules.folds.FoldedData; "
            f"missing: {missing}). Use a datamodule that has them, such as "
            "datamodules.ShortcutShapesDataModule or datamodules.ClickMeFolderDataModule"
        )


def build_datamodule(data: dict[str, Any]) -> LightningDataModule:
    """The datamodule of a ``class_path``/``init_args`` block, built by jsonargparse as the CLI builds it."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    return parser.instantiate(parser.parse_object({"data": data})).data


# ------------------------------------------------------------------------------------------------ training
def fold_arguments(
    configs: Sequence[str], folds: int, fold: int, root: str, experiment: str, overrides: Sequence[str] = ()
) -> list[str]:
    """The ``train.py`` arguments that train model ``fold`` (every fold but ``fold``) into ``root/experiment``."""
    return [
        "fit",
        *(arg for config in configs for arg in ("--config", config)),
        f"--data.init_args.num_folds={folds}",
        f"--data.init_args.fold={fold}",
        f"--run.root={root}",
        f"--run.experiment={experiment}",
        f"--run.version=fold{fold}",
        "--run.test_after_fit=false",  # before the overrides, so a user may turn it back on
        *overrides,
    ]


def run_dirs(root: str, experiment: str, folds: int) -> list[Path]:
    return [Path(root) / experiment / f"fold{fold}" for fold in range(folds)]


def train_folds(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    """Train the k fold models, one ``train.py`` process each (a process per run also suits DDP launches)."""
    existing = [str(path) for path in run_dirs(args.root, args.experiment, args.folds) if path.exists()]
    if existing:
        raise SystemExit(
            f"stability.py: error: {', '.join(existing)} already exist: pass --skip-training to reuse their "
            "checkpoints, or choose another --experiment or --root"
        )
    for fold in range(args.folds):
        command = [sys.executable, str(TRAIN_SCRIPT), *fold_arguments(
            args.config, args.folds, fold, args.root, args.experiment, overrides
        )]
        print(f"[stability] training fold model {fold + 1}/{args.folds}: {' '.join(command[1:])}", flush=True)
        returncode = subprocess.run(command, check=False).returncode
        if returncode != 0:
            raise SystemExit(f"stability.py: error: training fold {fold} failed (exit code {returncode})")


def checked_runs(root: str, experiment: str, folds: int) -> list[tuple[Path, dict[str, Any]]]:
    """``(run directory, saved config)`` of every fold run; clear errors for missing or mismatched runs."""
    runs = run_dirs(root, experiment, folds)
    missing = [
        str(path)
        for run in runs
        for path in (run / "config.yaml", run / "checkpoints" / "last.ckpt")
        if not path.is_file()
    ]
    if missing:
        raise SystemExit(
            f"stability.py: error: missing fold runs for --skip-training: {', '.join(missing)}. Train them by "
            "running without --skip-training, or point --root/--experiment/--folds at existing runs"
        )
    checked = []
    for fold, run in enumerate(runs):
        config = yaml.safe_load((run / "config.yaml").read_text())
        data = config.get("data") or {}
        check_fold_support(data, str(run / "config.yaml"))
        init = data.get("init_args") or {}
        if (init.get("num_folds"), init.get("fold")) != (folds, fold):
            raise SystemExit(
                f"stability.py: error: {run} was trained with num_folds={init.get('num_folds')}, "
                f"fold={init.get('fold')}; expected num_folds={folds}, fold={fold} (check --folds)"
            )
        checked.append((run, config))
    return checked


# ------------------------------------------------------------------------------------------------ evaluation
def load_backbone(checkpoint: Path, device: torch.device) -> nn.Module:
    """The network of a ``HarmonizedClassifier`` checkpoint, in eval mode on ``device``.

    A 1-Lipschitz network (``lipschitz_body = True``) is exported to its plain equivalent first
    (:func:`align.models.export_plain`): the same function, without recomputing the constrained weights at every
    forward (Sobol runs thousands of them). The copy keeps ``lipschitz_body``.
    """
    network = HarmonizedClassifier.load_from_checkpoint(checkpoint, map_location=device).backbone
    if getattr(network, "lipschitz_body", False):
        network = export_plain(network)
    return network.to(device).eval()


def heldout_images(data: dict[str, Any], count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` images and labels of the held-out fold of the datamodule of ``data`` (unaugmented)."""
    datamodule = build_datamodule(data)
    if not isinstance(datamodule, FoldedData):
        raise SystemExit(f"stability.py: error: {type(datamodule).__name__} has no heldout_dataloader() (no folds)")
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, labels, taken = [], [], 0
    for batch in datamodule.heldout_dataloader():
        images.append(batch["image"][: count - taken])
        labels.append(batch["label"][: count - taken])
        taken += images[-1].shape[0]
        if taken >= count:
            break
    if not taken:
        raise SystemExit(f"stability.py: error: the held-out fold {data['init_args']['fold']} is empty")
    return torch.cat(images), torch.cat(labels)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])
    return (predictions == labels).double().mean().item()


def stability_table(
    models: Sequence[nn.Module],
    images: Tensor,
    labels: Tensor,
    fold_of_sample: Tensor,
    specs: Sequence[ExplainerSpec],
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One row per explainer: MeGe, ReCo and the sizes of ``S=`` (both models right) and ``S!=`` (exactly one)."""
    rows = []
    for spec in specs:
        consistent, inconsistent = fold_pair_distances(models, images, labels, fold_of_sample, spec.build, batch_size)
        rows.append({
            "explainer": spec.name,
            "mege": mege_score(consistent).item(),
            "reco": reco_score(consistent, inconsistent).item(),
            "consistent_pairs": consistent.numel(),
            "inconsistent_pairs": inconsistent.numel(),
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'explainer':<16}{'MeGe':>8}{'ReCo':>8}{'S= pairs':>10}{'S!= pairs':>11}"]
    for row in rows:
        lines.append(
            f"{row['explainer']:<16}{row['mege']:>8.4f}{row['reco']:>8.4f}"
            f"{row['consistent_pairs']:>10d}{row['inconsistent_pairs']:>11d}"
        )
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value  # NaN (an empty set of pairs) is null in strict JSON


def write_results(directory: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """``stability.json`` (everything) and ``stability.csv`` (the table) in ``directory``."""
    json_path, csv_path = directory / "stability.json", directory / "stability.csv"
    rows = summary["results"]
    serialisable = {
        **summary,
        "results": [{**row, "mege": _json_number(row["mege"]), "reco": _json_number(row["reco"])} for row in rows],
    }
    json_path.write_text(json.dumps(serialisable, indent=2) + "\n")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the script (``argv`` as on the command line); returns the summary also written to JSON."""
    args, overrides = parse_args(argv)
    specs = explainer_specs(args.explainers)  # unknown names fail before any training
    if not args.skip_training:
        config = resolved_config(args.config, overrides)
        check_fold_support(config.get("data") or {}, " ".join(args.config))
        train_folds(args, overrides)
    runs = checked_runs(args.root, args.experiment, args.folds)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = [load_backbone(run / "checkpoints" / "last.ckpt", device) for run, _ in runs]
    images, labels, folds, heldout_accuracy = [], [], [], []
    for fold, (run, config) in enumerate(runs):
        x, y = heldout_images(config["data"], args.images_per_fold)
        x, y = x.to(device), y.to(device)
        images.append(x)
        labels.append(y)
        folds.append(torch.full_like(y, fold))
        heldout_accuracy.append(accuracy(models[fold], x, y, args.batch_size))
    images, labels, folds = torch.cat(images), torch.cat(labels), torch.cat(folds)

    rows = stability_table(models, images, labels, folds, specs, args.batch_size)
    directory = Path(args.root) / args.experiment
    summary = {
        "config": list(args.config),
        "overrides": overrides,
        "explainers": list(args.explainers),
        "experiment": str(directory),
        "folds": args.folds,
        "images_per_fold": args.images_per_fold,
        "num_images": images.shape[0],
        "checkpoints": [str(run / "checkpoints" / "last.ckpt") for run, _ in runs],
        "heldout_accuracy": heldout_accuracy,
        "results": rows,
    }
    json_path, csv_path = write_results(directory, summary)
    print(
        f"\nMeGe / ReCo (Fel et al. 2022) of {args.folds} fold models, {images.shape[0]} held-out images "
        f"(up to {args.images_per_fold} per fold), {directory}"
    )
    print("accuracy of each model on its held-out fold: " + ", ".join(f"{acc:.3f}" for acc in heldout_accuracy))
    print(format_table(rows))
    if any(math.isnan(row["mege"]) or math.isnan(row["reco"]) for row in rows):
        print(
            "nan: a set of pairs is empty (MeGe needs pairs where both models are right, ReCo also pairs where "
            "exactly one is): train longer or raise --images-per-fold"
        )
    print(f"written: {json_path}, {csv_path}")
    return summary


if __name__ == "__main__":
    main()
