"""The simulatability table (docs/human-evaluation.md "Results"): the utility of every explainer of the project
for predicting a shortcut model's decisions, with the random and oracle controls, beside deletion fidelity and
spurious mass.

    python scripts/simulatability_table.py --checkpoint baseline_lipschitz=runs/baseline_lipschitz/seed0/checkpoints/last.ckpt \
        --checkpoint harmonized_lipschitz=runs/harmonized_lipschitz/seed0/checkpoints/last.ckpt --scenario bias

Scenarios (the observations, pairs of an image and the model's decision on it):

The data are those each checkpoint was trained with (the datamodule's options saved in the checkpoint), with
``--scenes`` test scenes.

* ``bias``: bias detection. ``--scenes`` scenes of the shortcut data's test set, each twice: as in the ``iid``
  split (the watermark agrees with the label 90% of the time) and as in ``flipped`` (it names a wrong class), so
  the watermark and the shape disagree on about half of the images; a model that reads the watermark decides by
  it there. The two versions of a scene are the same image but its watermark: they stay on one side of the
  train/test split (``image_ids``).
* ``failure``: failure cases. The same pool, reduced to every image where the model errs and as many where it is
  right (:func:`~explain.metrics.functional.simulatability.enrich_errors`).

Each explainer explains the model's decision (the target is the decision, not the label). The oracle map is the
data's ``spurious_mask`` (the watermark); the random map is a random region. Deletion (lower is better) and the
spurious mass are computed on the same observations with the project's metrics, and the script prints, per model,
the Spearman correlation of the explainers' ranking by utility with their ranking by deletion and by spurious mass.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from align.module import HarmonizedClassifier  # noqa: E402
from datamodules import ShortcutShapesDataModule  # noqa: E402
from explain.callbacks.registry import resolve_explainers  # noqa: E402
from explain.metrics import Deletion, SpuriousMass  # noqa: E402
from explain.metrics.functional.simulatability import (  # noqa: E402
    confidence_interval,
    enrich_errors,
    simulatability,
    with_controls,
)

#: every explainer of the project, with the options of the shortcut configs' monitor where they have some
EXPLAINERS = {
    "saliency": "saliency",
    "smoothgrad": "smoothgrad",
    "gradient_input": "gradient_input",
    "sobol": {"sobol": {"nb_design": 8}},
    "eva": {"eva": {"bound": "crown-ibp"}},
}


def observations(data: ShortcutShapesDataModule, scenes: int) -> dict[str, torch.Tensor]:
    """The ``bias`` pool: the first ``scenes`` test scenes as ``iid`` and as ``flipped`` images."""
    iid, flipped = data.dataset("iid"), data.dataset("flipped")
    scenes = min(scenes, len(iid))
    index = list(range(scenes))
    batch = {key: torch.stack([s[key] for s in iid.__getitems__(index) + flipped.__getitems__(index)])
             for key in ("image", "label", "spurious_mask")}
    batch["image_ids"] = torch.arange(scenes).repeat(2)
    return batch


def shortcut_options(checkpoint: Path) -> dict:
    """The options of the shortcut datamodule the checkpoint was trained with (Lightning saves them in it)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters", {})
    names = inspect.signature(ShortcutShapesDataModule).parameters
    return {key: value for key, value in saved.items() if key in names}


@torch.no_grad()
def decide(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])


def evaluate(name: str, checkpoint: Path, args: argparse.Namespace) -> list[dict]:
    model = HarmonizedClassifier.load_from_checkpoint(checkpoint, map_location="cpu").backbone.eval()
    data = ShortcutShapesDataModule(**{**shortcut_options(checkpoint), "test_size": args.scenes})
    pool = observations(data, args.scenes)
    pool["decision"] = decide(model, pool["image"])
    if args.scenario == "failure":
        keep = enrich_errors(pool["decision"], pool["label"], seed=0)
        pool = {key: value[keep] for key, value in pool.items()}
    images, decisions = pool["image"], pool["decision"]
    print(f"[{name}] {images.shape[0]} observations, accuracy of the model on them "
          f"{float((decisions == pool['label']).float().mean()):.3f}", flush=True)
    maps, rows = {}, []
    for spec in resolve_explainers([EXPLAINERS[e] for e in args.explainers]):
        start = time.perf_counter()
        cached = None if args.cache is None else args.cache / f"{name}-{args.scenario}-{args.scenes}-{spec.name}.pt"
        if cached is not None and cached.is_file():
            maps[spec.name] = torch.load(cached)
        else:
            explainer = spec.build(model)
            maps[spec.name] = torch.cat([explainer(x, y) for x, y in zip(images.split(64), decisions.split(64))])
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(maps[spec.name], cached)
        deletion, spurious = Deletion(), SpuriousMass()
        deletion.update(model=model, images=images, targets=decisions, maps=maps[spec.name])
        spurious.update(maps=maps[spec.name], spurious_mask=pool["spurious_mask"])
        rows.append({"model": name, "explainer": spec.name, "deletion": float(deletion.compute()),
                     "spurious": float(spurious.compute()), "seconds": time.perf_counter() - start})
        print(f"[{name}] {spec.name}: maps in {rows[-1]['seconds']:.0f} s", flush=True)
    start = time.perf_counter()
    result = simulatability(
        images, decisions, with_controls(maps, pool["spurious_mask"]), num_classes=data.num_classes,
        image_ids=pool["image_ids"], seeds=args.seeds, budget=args.budget, steps=args.steps,
    )  # fmt: skip
    print(f"[{name}] meta-predictors in {time.perf_counter() - start:.0f} s", flush=True)
    without = float(result["accuracy_without"].mean())
    rows += [{"model": name, "explainer": control} for control in ("random", "oracle")]
    for row in rows:
        utility = result["utility"][row["explainer"]]
        row["utility"] = confidence_interval(utility)
        row["accuracy_with"] = float(result["accuracy_with"][row["explainer"]].mean())
        row["accuracy_without"] = without
    return rows


def rank_agreement(rows: list[dict]) -> str:
    """Per model: Spearman of the explainers' utility with -deletion (lower deletion is better) and with
    the spurious mass (on the shortcut data the faithful map of a model that reads the watermark has mass there)."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        own = [row for row in rows if row["model"] == model and "deletion" in row]
        if len(own) < 3:
            continue
        utility = [row["utility"][0] for row in own]
        by_deletion = spearmanr(utility, [-row["deletion"] for row in own]).statistic
        by_spurious = spearmanr(utility, [row["spurious"] for row in own]).statistic
        lines.append(f"- `{model}`: Spearman(utility, -deletion) = {by_deletion:.2f}; "
                     f"Spearman(utility, spurious mass) = {by_spurious:.2f} ({len(own)} explainers)")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    header = "| model | explainer | utility (95% CI over seeds) | acc with | acc without | deletion ↓ | spurious mass |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        mean, low, high = row["utility"]
        cells = [f"`{row['model']}`", row["explainer"], f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]",
                 f"{row['accuracy_with']:.3f}", f"{row['accuracy_without']:.3f}",
                 f"{row['deletion']:.3f}" if "deletion" in row else "–",
                 f"{row['spurious']:.3f}" if "spurious" in row else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a HarmonizedClassifier checkpoint trained on the shortcut data (repeat)")
    parser.add_argument("--scenario", choices=("bias", "failure"), default="bias")
    parser.add_argument("--scenes", type=int, default=300, help="test scenes, each as an iid and a flipped image")
    parser.add_argument("--explainers", nargs="+", default=list(EXPLAINERS), choices=list(EXPLAINERS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=None, help="training observations (default: the train side)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table there")
    parser.add_argument("--cache", type=Path, default=None, help="keep the maps there (reused by the next run)")
    args = parser.parse_args(argv)
    args.checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--checkpoint {item!r}: expected NAME=PATH of an existing checkpoint file")
        args.checkpoints[name] = Path(path)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse(argv)
    torch.set_grad_enabled(True)
    rows = []
    for name, path in args.checkpoints.items():
        rows += evaluate(name, path, args)
        print(table([row for row in rows if row["model"] == name]), flush=True)
    text = table(rows) + "\n\nRanking agreement over the explainers:\n\n" + rank_agreement(rows)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
