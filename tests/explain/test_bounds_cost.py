"""The cost model of full CROWN (explain/bounds/cost.py) and EVA's ``bound="auto"``."""

import logging

import torch
from torch import nn

import explain.attributions.eva as eva_module
from explain import EVA
from explain.bounds import build_graph, margin_upper_bounds
from explain.bounds.cost import estimate_full_crown
from explain.bounds.crown import ROW_PROGRESS


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def _rows_run(graph, lower, upper, targets) -> int:
    done = []
    token = ROW_PROGRESS.set(done.append)
    try:
        margin_upper_bounds(graph, lower, upper, targets, "crown", lipschitz_boxes=False)
    finally:
        ROW_PROGRESS.reset(token)
    return sum(done)


def test_the_estimate_bounds_the_rows_full_crown_runs_and_counts_none_when_all_is_stable():
    """The interval boxes contain full CROWN's, so the neurons unstable on them are at least those full CROWN
    tightens: the estimated rows are an upper bound of the rows it runs (counted through its progress hook), and
    not a loose one on this network; a zero radius has no unstable neuron and no row."""
    graph = build_graph(_network())
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    for eps in (0.02, 0.1):
        estimate = estimate_full_crown(graph, x - eps, x + eps)
        run = _rows_run(graph, x - eps, x + eps, y)
        assert 0 < run <= estimate.rows <= 3 * run, (eps, run, estimate)
        assert estimate.coefficients > 0 and estimate.seconds > 0
    none = estimate_full_crown(graph, x, x)
    assert none.rows == 0 and _rows_run(graph, x, x, y) == 0


def test_auto_takes_full_crown_within_the_budget_and_crown_ibp_beyond_it(monkeypatch, caplog):
    model = _network()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    auto = EVA(model, eps=0.05, grid_size=2)
    assert auto.bound == "auto"
    torch.testing.assert_close(auto(x, y), EVA(model, eps=0.05, grid_size=2, bound="crown")(x, y))
    monkeypatch.setattr(eva_module, "AUTO_BUDGET_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, logger="explain.attributions.eva"):
        maps = auto(x, y)
    torch.testing.assert_close(maps, EVA(model, eps=0.05, grid_size=2, bound="crown-ibp")(x, y))
    assert auto.last_bound == "crown-ibp" and auto.last_estimate.rows > 0
    assert "unstable neurons" in caplog.text and "crown-ibp" in caplog.text


def test_a_long_explicit_full_crown_logs_its_estimate_and_the_cheaper_options(monkeypatch, caplog):
    monkeypatch.setattr(eva_module, "LONG_BOUND_SECONDS", 0.0)
    model = _network()
    with caplog.at_level(logging.WARNING, logger="explain.attributions.eva"):
        EVA(model, eps=0.05, grid_size=2, bound="crown")(torch.rand(1, 3, 8, 8), torch.tensor([2]))
    assert "s per image" in caplog.text and "crown_classes" in caplog.text
