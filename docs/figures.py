"""The picture of the README and the site: what the demo's explainers see on `flipped` test images.

    python docs/figures.py runs/harmonized_lipschitz/<version>/checkpoints/last.ckpt docs/assets/demo-overlays.png

One row per image: the image (the watermark outlined in white), then Saliency, Sobol and EVA maps over it, then the
human map over it; the data are the demo's (`configs/data/shortcut.yaml`, seed 0). Excluded from the site.
"""

import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw

from align import HarmonizedClassifier
from datamodules import ShortcutShapesDataModule
from explain import EVA, Saliency, Sobol
from explain.callbacks.overlays import display_image, draw_outline, grid, overlay, to_uint8, upscale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--split", default="flipped", choices=["iid", "flipped"])
    args = parser.parse_args()

    model = HarmonizedClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu").backbone.eval()
    data = ShortcutShapesDataModule(seed=0)
    data.setup("test")
    batch = next(iter(data.test_dataloader()[data.test_split_names.index(args.split)]))
    images, labels = batch["image"][: args.images], batch["label"][: args.images]
    human, spurious = batch["heatmap"][: args.images], batch["spurious_mask"][: args.images]
    explainers = {"Saliency": Saliency(model), "Sobol": Sobol(model, grid_size=8, nb_design=32),
                  "EVA": EVA(model, grid_size=8, bound="best")}
    maps = {name: explainer(images, labels) for name, explainer in explainers.items()}
    predictions = model(images).argmax(1)
    rows = []
    for index in range(len(images)):
        tiles = [display_image(images[index])]
        tiles += [overlay(images[index], maps[name][index]) for name in maps]
        tiles.append(overlay(images[index], human[index]))
        tiles = [draw_outline(tile, spurious[index]) for tile in tiles]
        rows.append(upscale(to_uint8(torch.cat(tiles, dim=2)), 128))
    picture = grid(rows, nrow=1, padding=4)
    header = Image.new("RGB", (picture.shape[1], 22), "white")
    tile = rows[0].shape[1] // (len(maps) + 2)
    draw = ImageDraw.Draw(header)
    for column, title in enumerate(["image", *maps, "human map"]):
        draw.text((4 + column * tile + 6, 5), title, fill="black")
    picture = np.concatenate([np.asarray(header), picture], axis=0)
    Image.fromarray(picture).save(args.output, optimize=True)
    print(f"{args.output}: labels {labels.tolist()}, predictions {predictions.tolist()}")


if __name__ == "__main__":
    main()
