"""``python -m explain.atlas``: the concept atlas of a model over a data set, as a static site.

    python -m explain.atlas --model timm:resnet50 --weights resnet50.pth --data images/ --out atlas/
    python -m explain.atlas --model runs/shortcut/v0/checkpoints/last.ckpt \
        --data datamodules.ShortcutShapesDataModule --data.num_classes 4 --out atlas/ --trainer.devices 2
    python -m explain.atlas --config configs/atlas/efficientnet_lite0.yaml --print_config
    python -m explain.atlas compare atlas_baseline/ atlas_harmonized/ --out compare/

jsonargparse, as LightningCLI: a ``--config`` file, every option overridable (``--concepts.n_concepts 8``,
``--trainer.devices 8``), ``--print_config``. The atlas folder holds the resolved ``config.yaml``, as the run
folders of ``train.py``. Several GPUs or nodes: ``--trainer.devices``/``--trainer.num_nodes`` and Lightning's DDP
(``torchrun``, SLURM), exactly as training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from explain.atlas.concepts import ConceptOptions
from explain.quiet import quiet_library_notices

#: Trainer settings of an atlas run (the user's --trainer.* win)
TRAINER_DEFAULTS = {
    "trainer.logger": False, "trainer.enable_checkpointing": False, "trainer.enable_model_summary": False,
    "trainer.inference_mode": False,  # stage 2 differentiates (MACO) inside predict_step
    "trainer.devices": 1,
}


def atlas_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m explain.atlas", description=__doc__.split("\n\n")[0],
                            default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=str, required=True,
                       help="timm:<name>, torchvision:<name>, a Lightning .ckpt, or package.module.function")
    group.add_argument("--weights", type=Optional[str], default=None, help="local weights file (state dict)")
    group.add_argument("--key_map", type=Union[str, dict[str, str], None], default=None,
                       help="'position', or {regex: replacement} applied to the weights' names")
    group.add_argument("--model_options", type=dict[str, Any], default={}, help="keyword arguments of the model")
    group.add_argument("--lightning_class", type=Optional[str], default=None,
                       help="LightningModule class of a .ckpt when no config.yaml records it")
    group.add_argument("--model_attr", type=Optional[str], default=None,
                       help="attribute of that LightningModule holding the network (default: backbone or model)")
    group.add_argument("--layer", type=Optional[str], default=None,
                       help="last child of input_to_latent (split_model's at; default: before global pooling)")
    group.add_argument("--sign_split", type=bool, default=False,
                       help="factorise cat(relu(z), relu(-z)): signed activations (ViTs, GroupSort networks)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Union[str, LightningDataModule], required=True,
                       help="a folder of image files, or a LightningDataModule (class_path / init_args)")
    group.add_argument("--data_split", type=str, default="val",
                       help="datamodule split read: predict, val, test or train")
    group.add_argument("--image_size", type=int, default=224, help="input side (image folders)")
    group.add_argument("--mean", type=Optional[list[float]], default=None,
                       help="input normalisation (default: the model's, else ImageNet's; datamodules: none)")
    group.add_argument("--std", type=Optional[list[float]], default=None, help="see --mean")
    group.add_argument("--interpolation", type=Optional[str], default=None, help="resize mode (default: the model's)")
    group.add_argument("--crop_pct", type=Optional[float], default=None, help="centre crop fraction (default 0.875)")
    group.add_argument("--max_images", type=int, default=64, help="images kept per predicted class")
    group.add_argument("--batch_size", type=int, default=32)
    group.add_argument("--num_workers", type=int, default=0)
    group.add_argument("--classes", type=Optional[list[int]], default=None,
                       help="class indices to explain (default: every class the model predicts on the data)")
    group.add_argument("--class_names", type=Optional[str], default=None, help="text file, one class name a line")
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=str, required=True, help="the atlas folder (resumed when it exists)")
    group.add_argument("--title", type=Optional[str], default=None)
    group.add_argument("--render", type=bool, default=True, help="write the site (stage 3)")
    parser.add_class_arguments(ConceptOptions, "concepts")
    parser.add_class_arguments(Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.set_defaults(TRAINER_DEFAULTS)
    return parser


def _make_trainer(options: dict[str, Any]):
    def make(callbacks: list) -> Trainer:
        settings = dict(options)
        extra = list(settings.pop("callbacks", None) or [])
        progress = [RichProgressBar()] if settings.get("enable_progress_bar", True) is not False else []
        return Trainer(**settings, callbacks=[*progress, *extra, *callbacks])

    return make


def run(config: Namespace, parser: ArgumentParser) -> Path | None:
    """Build the atlas of ``config`` (parsed by :func:`atlas_parser`)."""
    from explain.atlas.build import build_atlas
    from explain.atlas.data import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, datamodule_dataset, preprocessing
    from explain.atlas.models import load_model

    init = parser.instantiate_classes(config)
    loaded = load_model(init.model, init.weights, init.key_map, init.model_options, init.lightning_class,
                        init.model_attr)
    names = dict(enumerate(loaded.class_names or []))
    if isinstance(init.data, str):
        mean = tuple(init.mean or loaded.mean or IMAGENET_MEAN)
        std = tuple(init.std or loaded.std or IMAGENET_STD)
        transform = preprocessing(init.image_size, mean, std, init.interpolation or loaded.interpolation or "bilinear",
                                  init.crop_pct or loaded.crop_pct or 0.875)
        dataset = ImageFiles(init.data, transform)
        title = f"{loaded.spec} on {Path(init.data).name}"
    else:
        mean, std = tuple(init.mean or (0.0, 0.0, 0.0)), tuple(init.std or (1.0, 1.0, 1.0))
        dataset = datamodule_dataset(init.data, init.data_split)
        names.update(dict(enumerate(getattr(init.data, "class_names", None) or [])))
        title = f"{loaded.spec} on {type(init.data).__name__}"
    if init.class_names:
        lines = Path(init.class_names).read_text().splitlines()
        names.update({i: line.strip() for i, line in enumerate(lines) if line.strip()})
    trainer = init.trainer if isinstance(init.trainer, dict) else vars(init.trainer)
    config_text = parser.dump(config, skip_none=False)
    return build_atlas(
        loaded, dataset, init.out, _make_trainer(dict(trainer)), layer=init.layer, sign_split=init.sign_split,
        max_images=init.max_images, batch_size=init.batch_size, num_workers=init.num_workers, classes=init.classes,
        class_names=names, title=init.title or title, mean=mean, std=std, concept_options=init.concepts,
        render=init.render, config_text=config_text,
    )


def compare_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m explain.atlas compare",
                            description="What changed between two atlases of the same classes.", default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("a", type=str, help="the first atlas (e.g. the baseline)")
    parser.add_argument("b", type=str, help="the second atlas (e.g. the harmonized model)")
    parser.add_argument("--out", type=str, required=True, help="the comparison folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="cosine below which a pair is not a match")
    parser.add_argument("--match", type=str, default="atoms",
                        help="atoms: cosine of the concept atoms (same network, e.g. fine-tuned); maps: cosine of "
                             "the concepts' maps on the images both atlases share (independently trained networks)")
    parser.add_argument("--render", type=bool, default=True)
    return parser


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_library_notices()
    if argv[:1] == ["compare"]:
        from explain.atlas.links.compare import compare_atlases

        parser = compare_parser()
        config = parser.parse_args(argv[1:])
        return compare_atlases(config.a, config.b, config.out, threshold=config.threshold, match=config.match,
                               render=config.render)
    parser = atlas_parser()
    return run(parser.parse_args(argv), parser)
