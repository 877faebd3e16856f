"""Write synthetic ClickMe-format data: TFRecord shards (train and val) and an ImageNet-style folder.

For dry runs and speed measurements of the ClickMe recipe on a machine without ClickMe (records of random pictures
with a Gaussian blob as human map, written with the ``tfrecord`` package; see ``datamodules.clickme_synthetic``).

    python scripts/make_clickme_shards.py /tmp/clickme_synth --train-shards 8 --records-per-shard 128 \\
        --val-shards 2 --imagenet-per-class 4 --num-classes 1000

then train on it:

    python train.py fit --config configs/clickme/harmonized_resnet50.yaml \\
        --data.init_args.train_shards='/tmp/clickme_synth/train-*.tfrecords' \\
        --data.init_args.val_shards='/tmp/clickme_synth/val-*.tfrecords' \\
        --data.init_args.unannotated_dir=/tmp/clickme_synth/imagenet
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.clickme_synthetic import write_image_folder, write_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write (created)")
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--val-shards", type=int, default=2)
    parser.add_argument("--records-per-shard", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--imagenet-per-class", type=int, default=2, help="unannotated images per class (0: none)")
    parser.add_argument("--size", type=int, default=256, help="side of the images and maps (ClickMe: 256)")
    args = parser.parse_args()

    out = Path(args.out)
    train = write_shards(out, [args.records_per_shard] * args.train_shards, args.num_classes, args.size, "train")
    val = write_shards(out, [args.records_per_shard] * args.val_shards, args.num_classes, args.size, "val", seed=10**6)
    print(f"{len(train)} train and {len(val)} val shards of {args.records_per_shard} records in {out}")
    if args.imagenet_per_class:
        folder = write_image_folder(out / "imagenet", [args.imagenet_per_class] * args.num_classes, args.size)
        print(f"{args.imagenet_per_class * args.num_classes} unannotated images in {folder}")


if __name__ == "__main__":
    main()
