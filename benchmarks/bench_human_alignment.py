"""Time of the human-alignment benchmark (``python -m align.human_alignment``): 3 networks on 512 synthetic ClickMe
records (256x256 "photo" JPEGs, as serre-lab's shards), at the reference's 224x224, reference saliency.

    python benchmarks/bench_human_alignment.py [--records 512] [--image-size 224] [--threads 2]

Target (issue 22): under 2 minutes on the project's 2-core CPU machine, for the whole command (data reading,
decoding, the reference's preprocessing of the maps, 3 x 512 forward and backward passes, the metrics, the CSV and
the figure). The networks are ImageNet-sized heads (1000 classes) with random local weights files: timm
``resnet18``, torchvision ``mobilenet_v3_small`` and timm ``vit_tiny_patch16_224``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.human_alignment import main  # noqa: E402
from datamodules.clickme_synthetic import write_shards  # noqa: E402

NETWORKS = (("timm", "resnet18"), ("torchvision", "mobilenet_v3_small"), ("timm", "vit_tiny_patch16_224"))


def weights_file(folder: Path, kind: str, arch: str) -> Path:
    torch.manual_seed(0)
    if kind == "timm":
        import timm

        model = timm.create_model(arch, num_classes=1000)
    else:
        import torchvision

        model = torchvision.models.get_model(arch, num_classes=1000)
    path = folder / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return path


def run(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder, [args.records // 4] * 4, 1000, size=256, prefix="val", kind="photo")
        models = [f"{kind}:{arch}:{weights_file(folder, kind, arch)}" for kind, arch in NETWORKS]
        command = ["--shards", str(folder / "val-*.tfrecords"), "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size), "--num-workers", "1", "--accelerator", "cpu",
                   "--devices", "1", "--out", str(folder / "out")]
        for model in models:
            command += ["--model", model]
        start = time.perf_counter()
        main(command)
        seconds = time.perf_counter() - start
    print(f"{len(NETWORKS)} networks x {args.records} records at {args.image_size}px, {args.threads} threads: "
          f"{seconds:.1f} s (target < 120 s)")
    return seconds


if __name__ == "__main__":
    run()
