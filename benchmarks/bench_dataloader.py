"""ClickMe loading speed: records/s of our indexed loader against the reference tf.data pipeline, same shards.

Ours: ``ClickMeTFRecordDataset`` (index, checksums, ``decode_jpeg``, the reference map preprocessing, min-max) in a
``DataLoader`` with ``--workers`` workers (2), batch 64, 224 px, no augmentation (the reference has none).
Reference: ``benchmarks/tf_clickme_reference.py`` (serre-lab/Harmonization's pipeline: ``TFRecordDataset(
num_parallel_reads=AUTOTUNE).map(parse, AUTOTUNE).batch(64).prefetch(AUTOTUNE)``), run by the Python of a separate
TensorFlow environment (``--tf-python``, default ``/tmp/tfenv/bin/python``; ``python3 -m venv /tmp/tfenv &&
/tmp/tfenv/bin/pip install tensorflow-cpu``) as a long-lived subprocess, so the two sides alternate pass by pass on
the same cores. The shards are synthetic ClickMe records (256x256 JPEG image and map), written once to ``--folder``.

    python benchmarks/bench_dataloader.py [--records 1024] [--passes 5] [--workers 2] [--tf-python PATH]

Target: ours / reference >= 1.0 (records/s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datamodules import ClickMeTFRecordDataset
from datamodules.clickme_synthetic import write_shards

HERE = Path(__file__).resolve().parent


def our_pass(loader: DataLoader) -> tuple[int, float]:
    start, records = time.perf_counter(), 0
    for batch in loader:
        records += batch["image"].shape[0]
    return records, time.perf_counter() - start


class Reference:
    """The TF pipeline in its own process: each ``run()`` is one timed pass over the shards."""

    def __init__(self, python: str, shards: list[str], batch_size: int) -> None:
        command = [python, str(HERE / "tf_clickme_reference.py"), str(batch_size), *shards]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the TensorFlow reference did not start: {' '.join(command)}")

    def run(self) -> tuple[int, float]:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        records, seconds = self.process.stdout.readline().split()
        return int(records), float(seconds)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # TensorFlow's teardown can be slow: its results are in already
            self.process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "bench_clickme_shards"))
    parser.add_argument("--tf-python", default="/tmp/tfenv/bin/python")
    args = parser.parse_args()

    folder = Path(args.folder)
    lengths = [args.records // args.shards + (s < args.records % args.shards) for s in range(args.shards)]
    shards = sorted(str(path) for path in folder.glob("bench-*.tfrecords"))
    if not shards or ClickMeTFRecordDataset(shards, 8, 1000).records.lengths != lengths:  # write them once
        for path in folder.glob("bench-*"):
            path.unlink()
        shards = write_shards(folder, lengths, num_classes=1000, size=256, prefix="bench")
    dataset = ClickMeTFRecordDataset(shards, args.image_size, 1000)  # builds the indexes (not timed)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    reference = Reference(args.tf_python, shards, args.batch_size) if Path(args.tf_python).exists() else None
    if reference is None:
        print(f"no TensorFlow environment at {args.tf_python}: only our side is measured")

    our_pass(loader)  # warm-up: worker start, page cache
    if reference is not None:
        reference.run()
    ours, theirs = [], []
    for _ in range(args.passes):
        records, seconds = our_pass(loader)
        ours.append(records / seconds)
        if reference is not None:
            records, seconds = reference.run()
            theirs.append(records / seconds)

    print(f"{args.records} records in {args.shards} shards, 256x256 JPEGs -> {args.image_size} px, batch "
          f"{args.batch_size}, {args.workers} workers, torch {torch.__version__}; median of {args.passes} passes")
    print(f"ours (indexed map-style, decode_jpeg):   {statistics.median(ours):8.1f} records/s")
    if theirs:
        print(f"reference (tf.data, AUTOTUNE):           {statistics.median(theirs):8.1f} records/s")
        print(f"ratio ours / reference: {statistics.median(ours) / statistics.median(theirs):.2f} (target >= 1.0)")
        reference.close()


if __name__ == "__main__":
    main()
