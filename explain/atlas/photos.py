"""The example data of ``make atlas``: the photos that ship with scikit-image, scikit-learn and matplotlib
(:func:`explain.networks.sample_photos`) and crops of each at several scales, written to a folder of PNGs.

    python -m explain.atlas.photos data/atlas_photos

A handful of photos predicts a handful of classes; their crops give each class enough images for a dictionary
(crops of a cat are still mostly "tabby"), as an ImageNet class's few hundred images do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

#: crop sides as fractions of the photo's short side, and the grid of crops per side
SCALES = ((1.0, 1), (0.7, 3), (0.5, 4), (0.35, 5))


def photo_crops(photo: Image.Image, scales: tuple[tuple[float, int], ...] = SCALES) -> list[Image.Image]:
    """Square crops of ``photo`` on a ``count x count`` grid, for each ``(fraction of the short side, count)``."""
    width, height = photo.size
    crops = []
    for fraction, count in scales:
        side = round(min(width, height) * fraction)
        for row in range(count):
            for column in range(count):
                top = round((height - side) * (row / (count - 1) if count > 1 else 0.5))
                left = round((width - side) * (column / (count - 1) if count > 1 else 0.5))
                crops.append(photo.crop((left, top, left + side, top + side)))
    return crops


def write_photo_crops(folder: str | Path, size: int = 256) -> Path:
    """Write ``folder/<photo>/<k>.png`` (short side ``size``) for every sample photo and crop; returns ``folder``."""
    from explain.networks import sample_photos

    folder = Path(folder)
    for name, photo in sample_photos().items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k, crop in enumerate(photo_crops(photo)):
            crop = crop.resize((size, size), Image.Resampling.BICUBIC)
            crop.save(folder / name / f"{k:02d}.png")
    return folder


if __name__ == "__main__":
    write_photo_crops(sys.argv[1] if len(sys.argv) > 1 else "data/atlas_photos")
