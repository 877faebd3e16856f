"""Synthetic data in the ClickMe formats, for tests, benchmarks and dry runs on machines without ClickMe.

* :func:`write_shard`: a TFRecord shard of ``tf.train.Example`` records with ``image`` (JPEG, RGB), ``heatmap``
  (JPEG, grayscale) and ``label`` (int64), as serre-lab distributes ClickMe (written with the ``tfrecord`` package).
* :func:`synthetic_record`: one such record, a random picture and a Gaussian blob as its human map. The picture
  is uniform noise (``kind="noise"``: the worst case for a JPEG decoder, 77 KB at 256x256) or smooth colour
  fields with texture at four scales (``kind="photo"``: about 35 KB at quality 90, closer to a natural photo).
* :func:`write_image_folder`: an ImageNet-style folder (one sub-folder per class) of random JPEGs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tfrecord.writer import TFRecordWriter

from explain.validation import one_of


def jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: random colour fields upsampled (bicubic) from 4, 16, 64 and 128 cells a side, with
    weights 0.6, 0.3, 0.5, 0.3: smooth regions, edges and texture, unlike noise."""

    def field(cells: int) -> np.ndarray:
        small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        return np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32) - 127.5

    image = 127.5 + sum(weight * field(cells) for cells, weight in ((4, 0.6), (16, 0.3), (64, 0.5), (128, 0.3)))
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_record(
    label: int, size: int = 64, seed: int = 0, kind: str = "noise", **overrides: Any
) -> dict[str, tuple[Any, str]]:
    """A ClickMe-format record for :class:`tfrecord.writer.TFRecordWriter`: random image, blob-shaped map.

    ``kind``: ``"noise"`` (uniform noise, JPEG quality 95) or ``"photo"`` (:func:`photo_like`, quality 90).
    ``overrides`` replace features (``image=(b"...", "byte")``) or drop them (``heatmap=None``)."""
    one_of("kind", kind, ("noise", "photo"))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        image = jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    else:
        image = jpeg(photo_like(rng, size), quality=90)
    yy, xx = np.mgrid[:size, :size]
    centre = rng.uniform(0.25, 0.75, 2) * size
    blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * (size / 8) ** 2))
    heatmap = (255 * blob).astype(np.uint8)
    datum = {"image": (image, "byte"), "heatmap": (jpeg(heatmap), "byte"), "label": (label, "int")}
    datum.update(overrides)
    return {key: value for key, value in datum.items() if value is not None}


def write_shard(path: str | Path, records: Iterable[dict[str, tuple[Any, str]]]) -> str:
    """Write records to a TFRecord file; returns its path."""
    writer = TFRecordWriter(str(path))
    for datum in records:
        writer.write(datum)
    writer.close()
    return str(path)


def write_shards(
    folder: str | Path,
    lengths: Sequence[int],
    num_classes: int,
    size: int = 256,
    prefix: str = "train",
    seed: int = 0,
    kind: str = "noise",
) -> list[str]:
    """Shards ``<prefix>-<s>.tfrecords`` of the given lengths; record ``k`` (over all shards) has label
    ``k % num_classes``, seed ``seed + k`` and an image of ``kind`` (:func:`synthetic_record`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s, length in enumerate(lengths):
        records = [synthetic_record((k + i) % num_classes, size, seed + k + i, kind) for i in range(length)]
        paths.append(write_shard(folder / f"{prefix}-{s:05d}.tfrecords", records))
        k += length
    return paths


def write_image_folder(folder: str | Path, per_class: Sequence[int], size: int = 256, seed: int = 0) -> str:
    """An ImageNet-style folder: class ``c`` is sub-folder ``class<c>`` holding ``per_class[c]`` random JPEGs."""
    rng = np.random.default_rng(seed)
    for c, count in enumerate(per_class):
        (Path(folder) / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            (Path(folder) / f"class{c:04d}" / f"{i}.jpg").write_bytes(jpeg(pixels))
    return str(folder)
