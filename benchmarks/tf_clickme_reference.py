"""The reference ClickMe input pipeline (serre-lab/Harmonization ``common/clickme_dataset.py``), timed pass by pass.

Run by ``bench_dataloader.py`` with the Python of a separate TensorFlow environment (the ``tfrecord`` package's
protos clash with TensorFlow's in one process). Written from the reference's description, not copied:
``TFRecordDataset(num_parallel_reads=AUTOTUNE).map(parse, AUTOTUNE).batch(64).prefetch(AUTOTUNE)``, where ``parse``
decodes both JPEGs, resizes the image to 224 (bilinear), the map 256 -> 64 (bilinear), blurs it with the 10x10
Gaussian of sigma 10 (``conv2d`` ``SAME``) and resizes it to 224 (bilinear), and one-hot encodes the label.
TensorFlow's defaults are kept: ``decode_jpeg``'s ``dct_method=""`` (libjpeg's fast integer IDCT), thread pools
sized by TensorFlow from the visible cores, AUTOTUNE parallelism.

Protocol (stdin/stdout, one line each): ``python tf_clickme_reference.py <batch size> <shard>...``; every line read
from stdin runs one pass over the shards and answers ``<records> <seconds> <cpu seconds> <threads>`` (CPU time of
the whole process, all threads; the most threads seen during the pass); end of input ends it.
"""

import os
import sys
import time

import tensorflow as tf


def kernel(size: int = 10, sigma: float = 10.0) -> tf.Tensor:
    xs = tf.range(-(size - 1) // 2, (size - 1) // 2 + 1, dtype=tf.float32)
    ys = tf.range((size - 1) // 2, -(size - 1) // 2 - 1, -1, dtype=tf.float32)
    x, y = tf.meshgrid(xs, ys)
    values = tf.exp(-(x**2 + y**2) / (2 * sigma**2))
    return (values / tf.reduce_sum(values))[:, :, None, None]


KERNEL = kernel()
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "heatmap": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def parse(record):
    data = tf.io.parse_single_example(record, FEATURES)
    image = tf.cast(tf.reshape(tf.io.decode_jpeg(data["image"]), (256, 256, 3)), tf.float32)
    image = tf.image.resize(image, (224, 224), method="bilinear")
    heatmap = tf.cast(tf.reshape(tf.io.decode_jpeg(data["heatmap"]), (256, 256, 1)), tf.float32)
    heatmap = tf.image.resize(heatmap, (64, 64), method="bilinear")
    heatmap = tf.nn.conv2d(heatmap[None], KERNEL, [1, 1, 1, 1], "SAME")[0]
    heatmap = tf.image.resize(heatmap, (224, 224), method="bilinear")
    return image, heatmap, tf.one_hot(tf.cast(data["label"], tf.int32), 1000)


def main() -> None:
    batch_size, shards = int(sys.argv[1]), sys.argv[2:]
    options = tf.data.Options()
    options.deterministic = True
    dataset = tf.data.TFRecordDataset(shards, num_parallel_reads=tf.data.AUTOTUNE).with_options(options)
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    print("ready", flush=True)
    for _ in sys.stdin:
        start, cpu, records, threads = time.perf_counter(), time.process_time(), 0, 0
        for images, _, _ in dataset:
            records += int(images.shape[0])
            threads = max(threads, len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0)
        print(records, time.perf_counter() - start, time.process_time() - cpu, threads, flush=True)


if __name__ == "__main__":
    main()
