"""The answer of a test run in one compact table and one sentence (what ``make demo`` ends with).

Rows are the test splits, columns the test accuracy, the human alignment, the certified accuracy (1-Lipschitz
networks) and, per explainer of the ``ExplanationMonitor``, the spurious mass: the share of the map's positive
mass on the region that ``spurious_mask`` marks (the shortcut data's watermark), beside that region's share of the
image, which is what a uniform map scores.

Alignment is the reference metric of Fel et al. 2022: the mean Spearman rho between the saliency map and the human
map divided by the human inter-rater ceiling (ClickMe: 0.65753). 1 means "as close to the human map as two halves
of the human participants are to each other"; a model can score above 1.

    >>> metrics = {"test/iid/acc": 0.955, "test/iid/alignment": 0.87, "test/flipped/acc": 0.674,
    ...            "test/flipped/alignment": 0.86, "test/iid/explain/sobol/spurious_mass": 0.27,
    ...            "test/iid/explain/spurious_area": 0.0156}
    >>> results = split_results(metrics)
    >>> [(r.split, r.accuracy, r.spurious_mass) for r in results]
    [('iid', 0.955, {'sobol': 0.27}), ('flipped', 0.674, {})]
    >>> print(interpret(results))
    The model relies on the spurious cue: flipped accuracy 0.67 against iid 0.95; Sobol puts 27% of its mass on the spurious region, 1.6% of the image (17x its area).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

#: a gap of iid over flipped accuracy above this reads as "the model relies on the spurious cue"
SHORTCUT_GAP = 0.05
#: an explainer whose spurious mass is more than this many times the area share "points at" the spurious region
POINTS_AT = 2.0
#: how explainer names are written in the sentence
DISPLAY_NAMES = {"eva": "EVA", "sobol": "Sobol", "saliency": "Saliency", "smoothgrad": "SmoothGrad"}

_ACCURACY = re.compile(r"^(?P<prefix>[^/]+)(?:/(?P<split>[^/]+))?/acc$")
_SPURIOUS = re.compile(r"/explain/(?P<explainer>[^/]+)/spurious_mass$")


@dataclass(frozen=True)
class SplitResult:
    """The numbers of one test split (None: not logged, e.g. certified accuracy of a network that is not
    1-Lipschitz)."""

    split: str
    accuracy: float | None = None
    alignment: float | None = None
    certified_accuracy: float | None = None
    spurious_mass: dict[str, float] = field(default_factory=dict)  # explainer -> share of its mass on the region
    spurious_area: float | None = None  # the region's share of the image


def _number(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def split_results(
    metrics: Mapping[str, Any], prefix: str = "test", splits: Sequence[str] | None = None
) -> list[SplitResult]:
    """Read ``<prefix>/<split>/{acc, alignment, certified_acc}``, ``<prefix>/<split>/explain/<explainer>/
    spurious_mass`` and ``<prefix>/<split>/explain/spurious_area`` (or the same keys without ``<split>`` when the
    data has a single test split) from logged metrics, e.g. ``trainer.callback_metrics``.

    Args:
        metrics: metric name -> number or 0-d tensor.
        prefix: the stage prefix of the keys.
        splits: the order of the rows (e.g. ``datamodule.test_split_names``); by default the order of the keys.
    """
    found: list[str] = []  # "" for the keys without a split
    for key in metrics:
        match = _ACCURACY.match(key)
        if match and match["prefix"] == prefix and (match["split"] or "") not in found:
            found.append(match["split"] or "")
    wanted = list(splits or ())
    order = [split for split in wanted if split in found] + [split for split in found if split not in wanted]
    return [_split_result(metrics, split, f"{prefix}/{split}" if split else prefix) for split in order]


def _split_result(metrics: Mapping[str, Any], split: str, base: str) -> SplitResult:
    def get(name: str) -> float | None:
        value = metrics.get(f"{base}/{name}")
        return None if value is None else _number(value)

    spurious = {}
    for key, value in metrics.items():
        match = _SPURIOUS.search(key)
        if match and key == f"{base}/explain/{match['explainer']}/spurious_mass":
            spurious[match["explainer"]] = _number(value)
    return SplitResult(split or base, get("acc"), get("alignment"), get("certified_acc"), spurious,
                       get("explain/spurious_area"))


def _cell(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _percent(value: float) -> str:
    return f"{value:.0%}" if value >= 0.1 else f"{value:.1%}"


def _spurious_cell(mass: float | None, area: float | None) -> str:
    if mass is None or not math.isfinite(mass):
        return "–"
    if area is None or area <= 0:
        return _percent(mass)
    ratio = mass / area
    return f"{_percent(mass)} {ratio:.0f}x" if ratio >= 10 else f"{_percent(mass)} {ratio:.1f}x"


def summary_table(results: Sequence[SplitResult], title: str | None = None) -> Table:
    """A rich table: one row per split; columns that no split has are left out. A spurious-mass cell reads
    ``27% 17x``: the share of the explainer's mass on the spurious region and that share over the region's
    area share (1x: no more than a uniform map)."""
    explainers = list(dict.fromkeys(name for result in results for name in result.spurious_mass))
    areas = [result.spurious_area for result in results if result.spurious_area is not None]
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("split", no_wrap=True)
    columns: list[tuple[str, Any]] = [
        ("acc", lambda r: _cell(r.accuracy)),
        ("align*", lambda r: _cell(r.alignment)),
        ("certified", lambda r: _cell(r.certified_accuracy)),
    ]
    columns = [(name, fn) for name, fn in columns if any(fn(r) != "–" for r in results)]
    columns += [(f"{name}†", lambda r, name=name: _spurious_cell(r.spurious_mass.get(name), r.spurious_area))
                for name in explainers]
    if areas:
        columns.append(("area†", lambda r: "–" if r.spurious_area is None else _percent(r.spurious_area)))
    for name, _ in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for result in results:
        table.add_row(result.split, *(fn(result) for _, fn in columns))
    return table


def footnotes(results: Sequence[SplitResult], ceiling: float) -> list[str]:
    """What the table's ``*`` and ``†`` mean (``ceiling``: the one that divided the alignment)."""
    notes = []
    if any(result.alignment is not None for result in results):
        notes.append(f"* alignment: Spearman(saliency, human map) / {ceiling:.4g}, the human inter-rater ceiling; 1 "
                     "is human-level agreement, and above 1 is possible.")
    if any(result.spurious_mass for result in results):
        notes.append("† share of each explainer's map on the spurious region (area: the region's share of the "
                     "image), then mass / area: 1x for a uniform map.")
    return notes


def interpret(results: Sequence[SplitResult]) -> str:
    """One sentence that reads the table: does the model rely on the spurious cue (accuracy on ``flipped``, where
    the cue names a wrong class, against ``iid``), and which explainer puts most of its mass on it."""
    by_split = {result.split: result for result in results}
    iid, flipped = by_split.get("iid"), by_split.get("flipped")
    if iid and flipped and iid.accuracy is not None and flipped.accuracy is not None:
        gap = iid.accuracy - flipped.accuracy
        verdict = "relies on" if gap > SHORTCUT_GAP else "does not rely on"
        sentence = (f"The model {verdict} the spurious cue: flipped accuracy {flipped.accuracy:.2f} against iid "
                    f"{iid.accuracy:.2f}")
    elif results and results[0].accuracy is not None:
        first = results[0]
        sentence = f"Test accuracy {first.accuracy:.2f}"
        if first.alignment is not None:
            sentence += f", alignment {first.alignment:.2f} of the human inter-rater ceiling"
    else:
        return "No test accuracy was logged."
    reference = iid or results[0]
    area = reference.spurious_area
    if reference.spurious_mass and area:
        name, mass = max(reference.spurious_mass.items(), key=lambda item: item[1])
        shown = DISPLAY_NAMES.get(name, name)
        if mass > POINTS_AT * area:
            sentence += (f"; {shown} puts {_percent(mass)} of its mass on the spurious region, {area:.1%} of the image "
                         f"({mass / area:.0f}x its area)")
        else:
            sentence += (f"; no explainer puts more than {POINTS_AT:g}x the area share on the spurious region "
                         f"(most: {shown}, {mass:.1%} on {area:.1%} of the image)")
    return sentence + "."


def print_summary(metrics: Mapping[str, Any], ceiling: float, splits: Sequence[str] | None = None,
                  title: str | None = None, console: Console | None = None) -> list[SplitResult]:
    """Print :func:`summary_table`, its :func:`footnotes` and :func:`interpret` of ``metrics`` (nothing when no test
    accuracy was logged); return the rows."""
    results = split_results(metrics, splits=splits)
    if not results:
        return results
    console = console or Console()
    console.print(summary_table(results, title=title))
    for note in footnotes(results, ceiling):
        console.print(note, style="dim", highlight=False)
    console.print(interpret(results), style="bold", highlight=False)
    return results
