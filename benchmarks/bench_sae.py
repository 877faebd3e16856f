"""SAE training throughput: the project's loop (``explain.concepts.sae``) against overcomplete's ``train_sae``.

Same data (planted sparse activations, float32), same model (overcomplete's ``TopKSAE`` with the same start:
atoms at random data rows, encoder at their transpose), same loss (``top_k_auxiliary_loss``), optimizer (Adam),
batch size, epochs, gradient clipping and device. overcomplete's side gets a ``DataLoader(TensorDataset(x),
shuffle=True)``, as its examples do, with its default ``monitoring=1`` (per-step loss, R² and L0 read on the host)
and with ``monitoring=0``; the project's side gets the tensor (shuffled minibatches by indexing) and the same
DataLoader. The sides alternate ``--repeats`` times after a warm-up and the medians are compared (rows per
second; ratio = ours / overcomplete's, target >= 1).

    python benchmarks/bench_sae.py [--rows 20000] [--channels 256] [--concepts 1024] [--top-k 16] [--epochs 2]
        [--batch-size 1024] [--repeats 3] [--device cpu|cuda]

``--monitor``: instead, the cost of ConceptMonitor with a TopK SAE on the demo fit
(``configs/shortcut/harmonized_lipschitz.yaml`` through ``align.cli.main``, its ExplanationMonitor removed, as in
``bench_callbacks.py``), at the monitor's default schedule (``every_n_epochs=5``: epochs 0 and 5 of the demo's
10), classes 0 and 1. One fit; the time inside the monitor's hook gives ``with / (with - hook)`` (target <= 1.10).

    python benchmarks/bench_sae.py --monitor [--max-epochs N] [-- CLI overrides]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from explain.concepts.overcomplete_import import sae as oc_sae
from explain.concepts.sae import TopKSAE


def planted(rows: int, channels: int, atoms: int, active: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(atoms, channels, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(rows, atoms, generator=generator).argsort(dim=1)[:, :active]
    codes = torch.zeros(rows, atoms).scatter_(1, chosen, torch.rand(rows, active, generator=generator) + 0.5)
    return (codes @ dictionary + 0.01 * torch.randn(rows, channels, generator=generator)).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def monitor_overhead(max_epochs: int | None, overrides: list[str]) -> None:
    import os
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_callbacks import DEMO, fit_seconds, split_config

    from explain.callbacks import ConceptMonitor

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    durations: list[float] = []
    original = ConceptMonitor.on_validation_epoch_end

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            durations.append(time.perf_counter() - start)

    ConceptMonitor.on_validation_epoch_end = timed
    monitor = {"class_path": "explain.callbacks.ConceptMonitor", "init_args": {
        "classes": [0, 1], "model_attr": "backbone",
        "craft_options": {"dictionary": "topk_sae", "dictionary_options": {"progress": False}}}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        without, _, _ = split_config(DEMO, tmp)
        config = yaml.safe_load(without.read_text())
        config["trainer"]["callbacks"] = [*(config["trainer"].get("callbacks") or []), monitor]
        with_monitor = tmp / "with_concept_monitor.yaml"
        with_monitor.write_text(yaml.safe_dump(config, sort_keys=False))
        extra = ([] if max_epochs is None else [f"--trainer.max_epochs={max_epochs}"]) + overrides
        seconds = fit_seconds(with_monitor, tmp / "runs", "with", extra)
    hook = sum(durations)
    print(f"demo fit with ConceptMonitor (TopK SAE, every_n_epochs=5, classes 0 and 1): {seconds:.1f} s, "
          f"{hook:.1f} s of it in {len(durations)} calls of the monitor's hook")
    print(f"ratio from the hook's time, with / (with - hook): {seconds / (seconds - hook):.3f} (target <= 1.10)")


def main() -> None:
    import sys

    argv = sys.argv[1:]
    if "--monitor" in argv:
        overrides = argv[argv.index("--") + 1:] if "--" in argv else []
        head = argv[: argv.index("--")] if "--" in argv else argv
        max_epochs = int(head[head.index("--max-epochs") + 1]) if "--max-epochs" in head else None
        monitor_overhead(max_epochs, overrides)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--concepts", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = planted(args.rows, args.channels, args.concepts // 4, 8, device)
    options = {"top_k": args.top_k, "epochs": args.epochs, "batch_size": args.batch_size, "lr": 3e-3,
               "clip_grad": 1.0, "seed": 0}

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(x), batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def ours(data) -> None:
        TopKSAE(args.concepts, **options).fit(data)

    def theirs(monitoring: int) -> None:
        template = TopKSAE(args.concepts, **options)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = template._build(args.channels, x).to(device)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        with contextlib.redirect_stdout(io.StringIO()):  # train_sae prints a line per epoch
            oc_sae.train_sae(model, loader(), oc_sae.losses.top_k_auxiliary_loss, optimizer, nb_epochs=args.epochs,
                             clip_grad=1.0, monitoring=monitoring, device=device)

    sides = {
        "ours (tensor)": lambda: ours(x),
        "ours (DataLoader)": lambda: ours(loader()),
        "train_sae (monitoring=1)": lambda: theirs(1),
        "train_sae (monitoring=0)": lambda: theirs(0),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in sides.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    rows = args.rows * args.epochs
    speed = {name: rows / statistics.median(values) for name, values in times.items()}
    print(f"device {device}, x {tuple(x.shape)}, {args.concepts} concepts, top_k {args.top_k}, batch "
          f"{args.batch_size}, {args.epochs} epochs, torch threads {torch.get_num_threads()}")
    for name, value in speed.items():
        print(f"  {name:26s} {value:12.0f} rows/s")
    for ours_name in ("ours (tensor)", "ours (DataLoader)"):
        for their_name in ("train_sae (monitoring=1)", "train_sae (monitoring=0)"):
            print(f"  ratio {ours_name} / {their_name}: {speed[ours_name] / speed[their_name]:.2f}")


if __name__ == "__main__":
    main()
