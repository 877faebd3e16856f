"""The shortcut results table (README "Results"): every shortcut config x seed through the CLI, then mean ± std.

    python scripts/shortcut_table.py --root runs/table --seeds 0 1 2                       # CPU, one run at a time
    python scripts/shortcut_table.py --root runs/table --seeds 0 1 2 --parallel 4 --trainer.accelerator=gpu
    python scripts/shortcut_table.py --root runs/table --configs baseline_lipschitz --seeds 0 -- --trainer.max_epochs=2

1. Each run is ``python train.py fit --config configs/shortcut/<config>.yaml --seed_everything <seed>
   --run.root ROOT --run.experiment <config> --run.version seed<seed> --trainer.logger=CSVLogger`` plus the
   overrides (every option this script does not know, and everything after ``--``), so it fits with the
   config's defaults, then tests its best checkpoint on the ``iid`` and ``flipped`` splits (``run.test_after_fit``).
   The seed is the training seed (initial weights, shuffling, augmentation); the data (``data.seed``) stay the
   config's, so the spread is that of training. A run whose ``metrics.csv`` already holds its test metrics is
   not run again (``--force`` reruns it); its wall time is kept in ``ROOT/<config>/seed<seed>.time``.
2. From each run's ``metrics.csv`` (the last value of each key): the test accuracy on ``iid`` and ``flipped``,
   the gradient alignment (``test/iid/alignment``: Spearman of |gradient| with the human map / 0.65753), the
   certified accuracy (1-Lipschitz models), and the spurious mass of Saliency, Sobol and EVA that the
   ``ExplanationMonitor`` computes at test time on the tested checkpoint (``test/iid/explain/<explainer>/
   spurious_mass``, over its ``max_images`` first iid images) with the watermark's area share
   (``test/iid/explain/spurious_area``) for scale.
3. A markdown table of mean ± std (sample std over the seeds) is printed and written to ``ROOT/table.md``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train.py"
CONFIGS = (
    "baseline_cnn", "harmonized_cnn", "rrr_cnn", "baseline_lipschitz", "harmonized_lipschitz", "rrr_lipschitz",
    "baseline_lipschitz_resnet",
)
EXPLAINERS = ("saliency", "sobol", "eva")
#: table column -> metrics.csv key ({split} is --split, the split of the explanation and alignment columns)
COLUMNS = {
    "iid acc": "test/iid/acc",
    "flipped acc": "test/flipped/acc",
    "alignment": "test/{split}/alignment",
    **{f"{name} spurious": f"test/{{split}}/explain/{name}/spurious_mass" for name in EXPLAINERS},
    "certified acc": "test/{split}/certified_acc",
}
AREA_KEY = "test/{split}/explain/spurious_area"
#: options of train.py this script sets itself
RESERVED = ("--config", "--seed_everything", "--run.root", "--run.experiment", "--run.version", "--trainer.logger")


def run_dir(root: Path, config: str, seed: int) -> Path:
    return root / config / f"seed{seed}"


def command(config: str, seed: int, root: Path, overrides: Sequence[str]) -> list[str]:
    """The CLI call of one run."""
    return [
        sys.executable, str(TRAIN_SCRIPT), "fit",
        "--config", str(REPO / "configs" / "shortcut" / f"{config}.yaml"),
        "--seed_everything", str(seed),
        "--run.root", str(root), "--run.experiment", config, "--run.version", f"seed{seed}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]  # fmt: skip


def read_metrics(path: Path) -> dict[str, float]:
    """The last non-empty value of every key of a Lightning ``metrics.csv``."""
    values: dict[str, float] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in (None, ""):
                    values[key] = float(value)
    return values


def finished(root: Path, config: str, seed: int) -> bool:
    path = run_dir(root, config, seed) / "metrics.csv"
    return path.is_file() and "test/iid/acc" in read_metrics(path)


def train(config: str, seed: int, root: Path, overrides: Sequence[str], force: bool) -> None:
    """Run one config x seed (unless done), its output in ``ROOT/<config>/seed<seed>.log``, its wall time in
    ``.time``."""
    if finished(root, config, seed) and not force:
        print(f"[skip] {config} seed {seed}: already done", flush=True)
        return
    directory = run_dir(root, config, seed)
    if directory.exists():  # an unfinished or forced run: start afresh (the CLI would pick another directory)
        import shutil

        shutil.rmtree(directory)
    log = root / config / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[run] {config} seed {seed} -> {directory}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command(config, seed, root, overrides), stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed (exit {result.returncode}); see {log}")
    (root / config / f"seed{seed}.time").write_text(f"{seconds:.1f}\n")
    print(f"[done] {config} seed {seed}: {seconds:.0f} s", flush=True)


def collect(root: Path, config: str, seed: int, split: str = "iid") -> dict[str, float]:
    """The table's values of one run (missing keys are absent), ``time`` in seconds and ``area``."""
    metrics = read_metrics(run_dir(root, config, seed) / "metrics.csv")
    row = {column: metrics[key.format(split=split)] for column, key in COLUMNS.items() if
           key.format(split=split) in metrics}
    if AREA_KEY.format(split=split) in metrics:
        row["area"] = metrics[AREA_KEY.format(split=split)]
    timing = root / config / f"seed{seed}.time"
    if timing.is_file():
        row["time"] = float(timing.read_text())
    return row


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std, ddof 1) of the values, ``mean`` alone for one value, ``–`` for none."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict[str, float]]], split: str = "iid") -> str:
    """The markdown table: one line per config, mean ± std over its runs."""
    header = ["config", "seeds", *COLUMNS, "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    areas = []
    for config, runs in rows.items():
        cells = [f"`{config}`", str(len(runs))]
        for column in COLUMNS:
            cells.append(mean_std([run[column] for run in runs if column in run]))
        cells.append(mean_std([run["time"] for run in runs if "time" in run], digits=0))
        lines.append("| " + " | ".join(cells) + " |")
        areas += [run["area"] for run in runs if "area" in run]
    if areas:
        lines.append("")
        share = statistics.fmean(areas)
        lines.append(f"Watermark area share on the {split} images (what a uniform map scores): {share:.4f}")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/shortcut_table"), help="directory of the runs")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    parser.add_argument("--split", default="iid", choices=("iid", "flipped"), help="split of the explanations")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--table-only", action="store_true", help="train nothing, print the table of what is there")
    args, overrides = parser.parse_known_args(argv)
    overrides = [item for item in overrides if item != "--"]
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    clashes = [item for item in overrides if item.split("=")[0] in RESERVED]
    if clashes:
        parser.error(f"{clashes}: this script sets {RESERVED} itself")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> str:
    args, overrides = parse(argv)
    jobs = [(config, seed) for config in args.configs for seed in args.seeds]
    if not args.table_only:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(train, config, seed, args.root, overrides, args.force) for config, seed in jobs]
            errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:
            raise SystemExit("\n".join(str(error) for error in errors))
    rows = {}
    for config in args.configs:
        done = [seed for seed in args.seeds if finished(args.root, config, seed)]
        rows[config] = [collect(args.root, config, seed, args.split) for seed in done]
    text = table(rows, args.split)
    print(text)
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "table.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
