"""Simulatability (Colin et al. 2022) with a meta-predictor: the protocol on a toy model whose decision is a known
function of a known region, the controls, the split, reproducibility, and the Metric."""

import pytest
import torch
from scipy import stats
from torch import nn

from explain.metrics import Simulatability
from explain.metrics.functional.simulatability import (
    attention_guidance,
    confidence_interval,
    enrich_errors,
    observation_split,
    random_region_maps,
    simulatability,
    with_controls,
)

SIZE = 16
REGION = (slice(SIZE - 6, SIZE - 2), slice(SIZE - 6, SIZE - 2))  # where the model looks (bottom right)
DISTRACTOR = (slice(1, 7), slice(1, 7))  # a louder cue that agrees with the decision 75% of the time


def toy_observations(n=400, seed=0):
    """Images of noise; the model's decision is 1 when the red channel of REGION is brighter than grey (a subtle
    +-0.2 offset), a known function of a known region. A large green patch in DISTRACTOR agrees with the
    decision on 75% of the images: the easy cue a predictor without help learns first."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    decisions = torch.randint(2, (n,), generator=generator)
    images[:, 0, REGION[0], REGION[1]] += (0.4 * decisions.float() - 0.2)[:, None, None]
    agrees = torch.rand(n, generator=generator) < 0.75
    images[:, 1, DISTRACTOR[0], DISTRACTOR[1]] = torch.where(agrees, decisions, 1 - decisions).float()[:, None, None]
    region, distractor = torch.zeros(n, SIZE, SIZE), torch.zeros(n, SIZE, SIZE)
    region[:, REGION[0], REGION[1]] = 1
    distractor[:, DISTRACTOR[0], DISTRACTOR[1]] = 1
    return images, decisions, region, distractor


def test_oracle_helps_random_and_wrong_region_do_not():
    images, decisions, region, distractor = toy_observations()
    maps = with_controls({"wrong_region": distractor}, oracle=region)
    result = simulatability(images, decisions, maps, seeds=5, budget=100, steps=150)
    intervals = {name: confidence_interval(values) for name, values in result["utility"].items()}
    oracle_mean, oracle_low, _ = intervals["oracle"]
    assert oracle_low > 0 and oracle_mean > 0.1, intervals  # high utility, interval above 0
    for name in ("random", "wrong_region"):
        mean, low, high = intervals[name]
        assert low <= 0 <= high and abs(mean) < 0.1, (name, intervals)  # about zero
        assert mean < oracle_mean - 0.1, (name, intervals)
    # the predictor without explanations learned the loud cue, not the region: about 75% of its decisions
    assert 0.7 < float(result["accuracy_without"].mean()) < 0.95


def test_seeds_make_it_reproducible():
    images, decisions, region, _ = toy_observations(n=80)
    run = lambda seeds: simulatability(images, decisions, {"r": region}, seeds=seeds, steps=15)  # noqa: E731
    first, again, other = run([3]), run([3]), run([4])
    assert torch.equal(first["accuracy_without"], again["accuracy_without"])
    assert torch.equal(first["utility"]["r"], again["utility"]["r"])
    # another seed draws another split: the test sets differ
    assert not torch.equal(observation_split(80, seed=3)[1], observation_split(80, seed=4)[1])
    assert other["seeds"].tolist() == [4]


def test_split_keeps_the_images_of_each_side_apart():
    image_ids = torch.arange(30).repeat_interleave(3)  # 3 observations of each image (e.g. 3 models)
    train, test = observation_split(90, 0.3, seed=1, image_ids=image_ids)
    assert set(image_ids[train].tolist()).isdisjoint(image_ids[test].tolist())
    assert sorted(torch.cat([train, test]).tolist()) == list(range(90))
    assert len(set(image_ids[test].tolist())) == 9  # 30% of the 30 images
    with pytest.raises(ValueError, match="image_ids has 5 entries for 90"):
        observation_split(90, image_ids=torch.arange(5))
    with pytest.raises(ValueError, match="at least two"):
        observation_split(4, image_ids=torch.zeros(4))


def test_failure_scenario_is_enriched_in_errors():
    labels = torch.arange(100) % 4
    decisions = labels.clone()
    decisions[:10] = (labels[:10] + 1) % 4  # 10 errors
    chosen = enrich_errors(decisions, labels, error_share=0.5, seed=0)
    assert chosen.numel() == 20 and set(range(10)) <= set(chosen.tolist())
    assert (decisions[chosen] != labels[chosen]).float().mean() == 0.5
    with pytest.raises(ValueError, match="no error"):
        enrich_errors(labels, labels)


def test_confidence_interval_is_students():
    values = torch.tensor([0.1, 0.3, 0.2, 0.5, 0.05])
    mean, low, high = confidence_interval(values, 0.9)
    expected = stats.t.interval(0.9, 4, loc=values.double().mean().item(), scale=stats.sem(values.numpy()))
    assert (low, high) == pytest.approx(expected, rel=1e-6)
    assert mean == pytest.approx(0.23)


def test_attention_guidance_is_the_cross_entropy_to_the_explanation():
    log_attention = torch.randn(2, 4, 4).flatten(1).log_softmax(1).view(2, 4, 4)
    explanation = torch.zeros(2, 8, 8)
    explanation[0, :2, :2] = 1.0  # all of image 0's mass in cell (0, 0) of the 4x4 grid
    # image 1 has no positive mass: left out
    expected = -log_attention[0, 0, 0]
    assert attention_guidance(log_attention, explanation).item() == pytest.approx(expected.item(), rel=1e-6)


def test_controls_and_bad_input():
    maps = {"sobol": torch.rand(6, 8, 8)}
    controls = with_controls(maps, oracle=torch.ones(6, 8, 8, dtype=torch.bool))
    assert set(controls) == {"sobol", "random", "oracle"}
    assert torch.equal(controls["random"], random_region_maps((6, 8, 8)))  # seeded
    with pytest.raises(ValueError, match="names of the controls"):
        with_controls({"random": torch.rand(6, 8, 8)})
    with pytest.raises(ValueError, match="oracle map has shape"):
        with_controls(maps, oracle=torch.ones(5, 8, 8))
    images = torch.rand(6, 3, 8, 8)
    with pytest.raises(ValueError, match="6 images but 5 decisions"):
        simulatability(images, torch.zeros(5), maps)
    with pytest.raises(ValueError, match="maps 'sobol' has shape"):
        simulatability(images, torch.zeros(6), {"sobol": torch.rand(6, 4, 4)})
    with pytest.raises(ValueError, match="decisions must lie in"):
        simulatability(images, torch.full((6,), 3), maps, num_classes=2)
    with pytest.raises(ValueError, match="steps"):
        Simulatability(steps=0)


class RegionModel(nn.Module):
    """Decides 1 when the red channel of REGION is brighter than grey: the toy's model, as a network."""

    def forward(self, images):
        score = images[:, 0, REGION[0], REGION[1]].mean((1, 2)) - 0.5
        return torch.stack([-score, score], 1)


def test_metric_accumulates_decisions_and_reports_controls():
    images, decisions, region, _ = toy_observations(n=64)
    metric = Simulatability(max_observations=48, seeds=2, steps=10)
    for chunk in range(0, 64, 16):
        part = slice(chunk, chunk + 16)
        metric.update(maps=region[part], images=images[part], model=RegionModel(), spurious_mask=region[part].bool())
    assert int(metric.count) == 48  # capped
    assert torch.equal(torch.cat(metric.decisions), decisions[:48])  # the model's decisions, not labels
    scores = metric.compute()
    assert set(scores) == {"utility", "utility_low", "utility_high", "accuracy_without", "random", "oracle"}
    assert scores["utility_low"] <= scores["utility"] <= scores["utility_high"]
    # the maps are the oracle here: the same utility
    assert scores["utility"].item() == pytest.approx(scores["oracle"].item())
    without_mask = Simulatability(seeds=1, steps=5)
    without_mask.update(maps=region[:8], images=images[:8], model=RegionModel())
    assert "oracle" not in without_mask.compute()


def test_monitor_option_logs_the_utility_and_its_controls(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
    from test_callbacks import Recorder, TinyData, fit, monitor

    recorder = Recorder()
    callback = monitor(
        explainers=["saliency"], metrics=[], max_images=None, simulatability={"seeds": 2, "steps": 5}
    )
    fit(tmp_path, [callback], epochs=1, logger=recorder, data=TinyData(spurious=True))
    for key in ("", "/utility_low", "/utility_high", "/accuracy_without", "/random", "/oracle"):
        values = recorder.values(f"explain/saliency/simulatability{key}")
        assert len(values) == 1 and values[0] == values[0], key  # logged once, not NaN
    with pytest.raises(ValueError, match="steps"):
        monitor(simulatability={"steps": 0})
