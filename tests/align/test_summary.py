"""align.summary: the test run's rows read from logged keys, the table's columns, and the sentence's verdicts."""

import math

import pytest
import torch
from rich.console import Console

from align.summary import (
    POINTS_AT, SHORTCUT_GAP, footnotes, interpret, print_summary, split_results, summary_table,
)

SHORTCUT_RUN = {
    "test/iid/acc": torch.tensor(0.955),
    "test/iid/alignment": torch.tensor(1.035),
    "test/iid/certified_acc": torch.tensor(0.79),
    "test/iid/loss": torch.tensor(0.3),
    "test/iid/explain/sobol/spurious_mass": torch.tensor(0.27),
    "test/iid/explain/eva/spurious_mass": torch.tensor(0.04),
    "test/iid/explain/sobol/alignment": torch.tensor(0.5),
    "test/iid/explain/spurious_area": torch.tensor(0.015625),
    "test/flipped/acc": torch.tensor(0.674),
    "test/flipped/alignment": torch.tensor(0.86),
    "test/flipped/certified_acc": torch.tensor(0.5),
    "test/flipped/explain/sobol/spurious_mass": torch.tensor(0.25),
    "test/flipped/explain/eva/spurious_mass": torch.tensor(0.03),
    "test/flipped/explain/spurious_area": torch.tensor(0.015625),
    "val/acc": torch.tensor(0.9),
}


def render(table) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_rows_are_the_test_splits_in_the_datamodule_order_with_their_own_values():
    flipped, iid = split_results(SHORTCUT_RUN, splits=["flipped", "iid"])
    assert (iid.split, flipped.split) == ("iid", "flipped")
    assert iid.accuracy == pytest.approx(0.955) and flipped.accuracy == pytest.approx(0.674)
    assert iid.alignment == pytest.approx(1.035) and flipped.certified_accuracy == pytest.approx(0.5)
    assert iid.spurious_mass == pytest.approx({"sobol": 0.27, "eva": 0.04})  # not the explainer's alignment
    assert flipped.spurious_mass == pytest.approx({"sobol": 0.25, "eva": 0.03})
    assert iid.spurious_area == 0.015625


def test_a_single_unnamed_test_split_and_missing_columns():
    (only,) = split_results({"test/acc": 0.7, "test/alignment": 0.5, "val/acc": 0.1})
    assert (only.split, only.accuracy, only.alignment, only.certified_accuracy) == ("test", 0.7, 0.5, None)
    assert only.spurious_mass == {} and only.spurious_area is None
    assert split_results({"val/acc": 0.1}) == []


def test_the_table_shows_every_column_and_leaves_out_those_no_split_has():
    text = render(summary_table(split_results(SHORTCUT_RUN)))
    header, rule, iid, flipped = [line for line in text.splitlines() if line.strip()][:4]
    assert header.split() == ["split", "acc", "align*", "certified", "sobol†", "eva†", "area†"]
    # 0.27 / 0.015625 = 17.28: the mass and its ratio to the area share; eva 0.04 / 0.015625 = 2.56
    assert iid.split() == ["iid", "0.955", "1.035", "0.790", "27%", "17x", "4.0%", "2.6x", "1.6%"]
    assert flipped.split()[:3] == ["flipped", "0.674", "0.860"]
    plain = render(summary_table(split_results({"test/acc": 0.7})))
    assert plain.split()[:2] == ["split", "acc"] and "align" not in plain and "certified" not in plain


def test_the_sentence_reads_the_shortcut_and_the_explainer_that_points_at_it():
    sentence = interpret(split_results(SHORTCUT_RUN))
    assert sentence.startswith("The model relies on the spurious cue: flipped accuracy 0.67 against iid 0.95")
    assert "Sobol puts 27% of its mass on the spurious region, 1.6% of the image (17x its area)" in sentence


@pytest.mark.parametrize("flipped, verdict", [(0.955 - SHORTCUT_GAP - 0.01, "relies on"),
                                              (0.955 - SHORTCUT_GAP + 0.01, "does not rely on")])
def test_the_verdict_follows_the_gap_between_iid_and_flipped(flipped, verdict):
    sentence = interpret(split_results({**SHORTCUT_RUN, "test/flipped/acc": flipped}))
    assert sentence.startswith(f"The model {verdict} the spurious cue")


def test_no_explainer_above_the_threshold_is_said_so():
    area = 0.015625
    metrics = {"test/iid/acc": 1.0, "test/flipped/acc": 1.0, "test/iid/explain/spurious_area": area,
               "test/iid/explain/saliency/spurious_mass": POINTS_AT * area * 0.9,
               "test/iid/explain/sobol/spurious_mass": area}
    sentence = interpret(split_results(metrics))
    assert "does not rely on" in sentence
    assert f"no explainer puts more than {POINTS_AT:g}x the area share" in sentence and "Saliency, 2.8%" in sentence


def test_print_summary_prints_the_table_the_footnotes_and_the_sentence():
    console = Console(width=120, record=True, color_system=None)
    rows = print_summary(SHORTCUT_RUN, ceiling=0.65753, title="Test of demo/1", console=console)
    text = console.export_text()
    assert len(rows) == 2 and "Test of demo/1" in text
    assert "/ 0.6575, the human inter-rater ceiling" in text and "above 1 is possible" in text
    assert text.rstrip().endswith("(17x its area).")
    assert math.isclose(rows[0].accuracy, 0.955, rel_tol=1e-6)


def test_footnotes_explain_only_the_columns_shown():
    only_accuracy = split_results({"test/acc": 0.7})
    assert footnotes(only_accuracy, ceiling=0.65753) == []
    notes = footnotes(split_results(SHORTCUT_RUN), ceiling=0.5)
    assert notes[0].startswith("* alignment: Spearman(saliency, human map) / 0.5,") and notes[1].startswith("†")
