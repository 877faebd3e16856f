"""ClickMe loading speed: records/s of our indexed loader against the reference tf.data pipeline, same shards.

Three sides, alternating pass by pass over the same shards (so a change of machine load hits all of them):

* ``ours``: ``ClickMeTFRecordDataset`` (index, checksums, ``decode_jpeg``, the reference map preprocessing, min-max)
  in a ``DataLoader`` with ``--workers`` workers (2), batch 64, 224 px, no augmentation (the reference has none):
  the workers hand over batches of the data contract (float32 images, 224x224 float32 maps).
* ``ours compact``: the same records with ``compact=True`` (uint8 images, blurred 64x64 maps from the workers,
  ``compact_batches=True`` of the DataModule); every batch is finished (``finish_batch``: float32 images, maps at
  224 px, min-max) in the timed loop, on the CPU of the main process (``--main-threads`` torch threads, 1: the
  workers hold the other cores), so both ends hold the same tensors.
* ``compact to GPU``: the same compact batches, not finished: what the workers deliver when training on a GPU,
  where ``on_after_batch_transfer`` finishes them on the device (two small kernels per batch, not timed here).
  Not the same end product as the reference's: read it as the loader's throughput, not as the target ratio.
* ``ours threads``: ``worker_threads=True`` of the DataModule: a ``ThreadedDataLoader`` whose ``--workers``
  workers are threads of this process (tf.data's model), compact samples finished on those threads into reused
  memory (``FinishingCollate``): the batches of the data contract, as ``ours`` (tested).
* ``reference``: ``benchmarks/tf_clickme_reference.py`` (serre-lab/Harmonization's pipeline: ``TFRecordDataset(
  num_parallel_reads=AUTOTUNE).map(parse, AUTOTUNE).batch(64).prefetch(AUTOTUNE)``), run by the Python of a
  separate TensorFlow environment (``--tf-python``, default ``/tmp/tfenv/bin/python``; ``python3 -m venv
  /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu``) as a long-lived subprocess (the ``tfrecord``
  package's protos clash with TensorFlow's in one process).

Every side gets the same cores (all the machine's, or those of ``taskset``). Besides records/s (median of the
passes) the script prints CPU milliseconds per record: ours counts the main process and its DataLoader workers,
the reference its whole process (all threads). On a loaded machine records/s depend on the share of the CPU each
side gets; CPU ms per record do much less.

The shards are synthetic ClickMe records (256x256 JPEG image and map), written once to ``--folder``: ``--data
noise`` (uniform noise, 77 KB JPEGs, the slowest to decode), ``photo`` (smooth fields with texture, ~35 KB at
quality 90, closer to natural photos) or ``both``.

    python benchmarks/bench_dataloader.py [--data both] [--records 1024] [--passes 5] [--workers 2]

Target: ours / reference >= 1.0 (records/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules import ClickMeTFRecordDataset
from datamodules.clickme_synthetic import write_shards
from datamodules.clickme_tfrecord import FinishingCollate, finish_batch
from datamodules.threaded_loader import ThreadedDataLoader

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children() -> set[int]:
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as file:
        return {int(pid) for pid in file.read().split()}


class Ours:
    """A DataLoader with persistent workers; ``run()`` is one timed pass: (records, seconds, CPU seconds of this
    process and of this loader's workers)."""

    def __init__(self, loader: DataLoader, finish: Callable[[dict], dict] | None) -> None:
        self.loader, self.finish = loader, finish
        before = children()
        self.run()  # warm-up: starts the workers, fills the page cache
        self.workers = sorted(children() - before)

    def workers_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in getattr(self, "workers", ()))

    def run(self) -> tuple[int, float, float]:
        main, workers, start, records = time.process_time(), self.workers_cpu(), time.perf_counter(), 0
        for batch in self.loader:
            if self.finish is not None:
                batch = self.finish(batch)
            records += batch["image"].shape[0]
        seconds, main = time.perf_counter() - start, time.process_time() - main
        self.main_share = main / (main + self.workers_cpu() - workers)
        return records, seconds, main + self.workers_cpu() - workers


class Reference:
    """The TF pipeline in its own process: each ``run()`` is one timed pass over the shards."""

    def __init__(self, python: str, shards: list[str], batch_size: int) -> None:
        command = [python, str(HERE / "tf_clickme_reference.py"), str(batch_size), *shards]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the TensorFlow reference did not start: {' '.join(command)}")
        self.threads = 0

    def run(self) -> tuple[int, float, float]:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        records, seconds, cpu, threads = self.process.stdout.readline().split()
        self.threads = max(self.threads, int(threads))
        return int(records), float(seconds), float(cpu)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # TensorFlow's teardown can be slow: its results are in already
            self.process.kill()


def make_shards(folder: Path, records: int, shards: int, kind: str) -> list[str]:
    """``bench-<kind>-*.tfrecords`` in ``folder``, written once (rewritten when the lengths differ)."""
    lengths = [records // shards + (s < records % shards) for s in range(shards)]
    prefix = f"bench-{kind}"
    paths = sorted(str(path) for path in folder.glob(f"{prefix}-*.tfrecords"))
    if not paths or ClickMeTFRecordDataset(paths, 8, 1000).records.lengths != lengths:
        for path in folder.glob(f"{prefix}-*"):
            path.unlink()
        paths = write_shards(folder, lengths, num_classes=1000, size=256, prefix=prefix, kind=kind)
    return paths


def bench(kind: str, args: argparse.Namespace) -> None:
    shards = make_shards(Path(args.folder), args.records, args.shards, kind)
    datasets = {
        "ours": (ClickMeTFRecordDataset(shards, args.image_size, 1000), None),
        "ours compact": (ClickMeTFRecordDataset(shards, args.image_size, 1000, compact=True), finish_batch),
        "compact to GPU": (ClickMeTFRecordDataset(shards, args.image_size, 1000, compact=True), None),
    }  # building the indexes is not timed
    if args.workers > 0:  # threads need at least one
        datasets["ours threads"] = (ClickMeTFRecordDataset(shards, args.image_size, 1000, compact=True), None)
    jpeg_kb = np.mean([len(datasets["ours"][0].records[i]["image_jpeg"]) for i in range(0, args.records, 16)]) / 1e3
    reference = None
    if Path(args.tf_python).exists():
        reference = Reference(args.tf_python, shards, args.batch_size)
    else:
        print(f"no TensorFlow environment at {args.tf_python}: only our side is measured")
    sides: dict[str, Ours | Reference] = {}
    for name, (dataset, finish) in datasets.items():
        if name == "ours threads":
            loader = ThreadedDataLoader(dataset, batch_size=args.batch_size, num_threads=args.workers,
                                        prefetch_batches=args.prefetch * args.workers, collate_fn=FinishingCollate())
        else:
            loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                persistent_workers=args.workers > 0,
                                prefetch_factor=args.prefetch if args.workers else None)
        sides[name] = Ours(loader, finish)  # runs a warm-up pass
    if reference is not None:
        reference.run()  # warm-up: TensorFlow's tracing and autotuning
        sides["reference"] = reference
    rates: dict[str, list[float]] = {name: [] for name in sides}
    cpu_ms: dict[str, list[float]] = {name: [] for name in sides}
    main_share: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.passes):
        for name, side in sides.items():
            records, seconds, cpu = side.run()
            rates[name].append(records / seconds)
            cpu_ms[name].append(1e3 * cpu / records)
            main_share[name].append(getattr(side, "main_share", 0.0))

    print(f"\n--data {kind}: {args.records} records in {args.shards} shards, 256x256 JPEGs (image {jpeg_kb:.0f} KB) -> "
          f"{args.image_size} px, batch {args.batch_size}, {args.workers} workers, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, main process {args.main_threads} torch "
          f"thread(s); median of {args.passes} alternating passes")
    for name in sides:
        if name == "reference":
            note = f" (one process, {sides[name].threads} threads)"
        else:
            note = f" ({100 * statistics.median(main_share[name]):.0f}% in the main process)"
        print(f"  {name:14s} {statistics.median(rates[name]):8.1f} records/s   "
              f"{statistics.median(cpu_ms[name]):6.2f} CPU ms/record{note}")
    if reference is not None:
        theirs = statistics.median(rates["reference"])
        for name in [name for name in ("ours", "ours compact", "ours threads") if name in sides]:
            print(f"  ratio {name} / reference: {statistics.median(rates[name]) / theirs:.2f} (target >= 1.0)")
        reference.close()
    with open("/proc/loadavg") as file:
        print(f"  load average after: {' '.join(file.read().split()[:3])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["noise", "photo", "both"], default="both")
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=4, help="prefetch_factor of the DataLoader")
    parser.add_argument("--main-threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "bench_clickme_shards"))
    parser.add_argument("--tf-python", default="/tmp/tfenv/bin/python")
    args = parser.parse_args()
    torch.set_num_threads(args.main_threads)
    for kind in ("noise", "photo") if args.data == "both" else (args.data,):
        bench(kind, args)


if __name__ == "__main__":
    main()
