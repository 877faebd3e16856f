"""The registry: classes register themselves where they are defined, and one parser reads every item shape."""

import functools

import pytest
from torch import nn

from explain.attributions.saliency import Saliency, SmoothGrad
from explain.attributions.sobol import Sobol
from explain.callbacks.registry import resolve_explainers, resolve_metrics
from explain.metrics import Deletion, HumanAlignment
from explain.registry import EXPLAINERS, METRICS, register_explainer, registered_name


def test_the_built_in_classes_are_registered_by_their_decorator():
    assert set(EXPLAINERS) >= {"saliency", "smoothgrad", "gradient_input", "sobol", "eva"}
    assert set(METRICS) >= {"alignment", "deletion", "insertion", "mufidelity", "stability"}
    assert EXPLAINERS["sobol"] is Sobol and METRICS["deletion"] is Deletion
    assert registered_name(SmoothGrad) == "smoothgrad" and registered_name(nn.Linear) is None


def test_register_refuses_a_second_class_under_a_taken_name():
    taken = r"two explainers are registered as 'sobol': explain\.attributions\.sobol\.Sobol and .*OtherSobol"
    with pytest.raises(ValueError, match=taken):
        register_explainer("sobol")(type("OtherSobol", (Sobol,), {}))
    with pytest.raises(ValueError, match="identifier"):
        register_explainer("not a name")
    register_explainer("sobol")(Sobol)  # registering the same class again is harmless
    assert EXPLAINERS["sobol"] is Sobol
    import importlib

    import explain.attributions.sobol as module

    try:  # a reload defines the class anew under the same qualified name: it replaces the old one
        reloaded = importlib.reload(module).Sobol
        assert reloaded is not Sobol and EXPLAINERS["sobol"] is reloaded
    finally:
        register_explainer("sobol")(Sobol)
        module.Sobol = Sobol


def test_one_parser_reads_names_options_callables_instances_and_class_paths_for_both_kinds():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    bound = Saliency(model)
    specs = resolve_explainers(
        [
            {"plain": "saliency"},
            {"sobol": {"nb_design": 4, "grid_size": 2}},
            functools.partial(SmoothGrad, nb_samples=2),
            {"mine": bound},
            {"class_path": "explain.attributions.saliency.GradientInput", "init_args": {"reduce": "sum"}},
        ]
    )
    assert [s.name for s in specs] == ["plain", "sobol", "smoothgrad", "mine", "gradient_input"]
    built = [s.build(model) for s in specs]
    assert [type(e).__name__ for e in built] == ["Saliency", "Sobol", "SmoothGrad", "Saliency", "GradientInput"]
    assert built[1].nb_design == 4 and built[2].nb_samples == 2 and built[3] is bound and built[4].reduce == "sum"

    metrics = resolve_metrics(
        [
            "alignment",
            {"deletion": {"steps": 4}},
            {"sharp": HumanAlignment(top_fraction=0.05)},
            {"class_path": "explain.metrics.fidelity.Insertion", "init_args": {"steps": 3}},
            functools.partial(METRICS["mufidelity"], nb_samples=5),  # a callable: named after the class it builds
        ]
    )
    assert list(metrics) == ["alignment", "deletion", "sharp", "insertion", "mufidelity"]
    assert metrics["deletion"].steps == 4 and metrics["insertion"].steps == 3
    assert metrics["sharp"].top_fraction == 0.05 and metrics["mufidelity"].nb_samples == 5
    (only,) = resolve_metrics(functools.partial(Deletion, steps=2)).values()
    assert isinstance(only, Deletion) and only.steps == 2


def test_parser_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown metric 'deletoin': registered names are \["):
        resolve_metrics(["deletoin"])
    with pytest.raises(ValueError, match=r"metric 'deletion': Unexpected keyword arguments: `stepz`"):
        resolve_metrics({"deletion": {"stepz": 3}})  # a Metric takes **kwargs: torchmetrics refuses the typo
    with pytest.raises(ValueError, match="metric 'deletion': steps must be a positive int"):
        resolve_metrics({"deletion": {"steps": 0}})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['grid'\] for explainer 'sobol'"):
        resolve_explainers({"sobol": {"grid": 3}})
    with pytest.raises(ValueError, match="two metrics are named"):
        resolve_metrics(["deletion", Deletion()])
    with pytest.raises(TypeError, match="not an explain.metrics.ExplanationMetric subclass"):
        resolve_metrics([nn.Linear])
    with pytest.raises(TypeError, match="returned a Saliency, not an explain.metrics.ExplanationMetric"):
        resolve_metrics([lambda: Saliency(nn.Linear(2, 2))])
    with pytest.raises(TypeError, match="returned a Linear, not an explain.Explainer"):
        resolve_explainers([lambda model: nn.Linear(2, 2)])[0].build(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="as an explainer"):
        resolve_explainers([nn.Linear(2, 2)])  # a module is not a factory of explainers
    with pytest.raises(ImportError, match="cannot import 'explain.Nope'"):
        resolve_explainers([{"class_path": "explain.Nope"}])
    with pytest.raises(ValueError, match="extra keys"):
        resolve_explainers([{"class_path": "explain.attributions.sobol.Sobol", "options": {}}])


def test_jsonargparse_hands_class_path_blocks_over_as_mappings():
    # the item types of the callbacks keep jsonargparse from building callables of its own making, so the
    # registry never has to look inside them
    from jsonargparse import ArgumentParser

    from explain.callbacks.registry import ExplainerItem

    parser = ArgumentParser()
    parser.add_argument("--explainers", type=list[ExplainerItem])
    config = parser.parse_args(
        ["--explainers=[saliency, {class_path: explain.attributions.sobol.Sobol, init_args: {nb_design: 2}}]"]
    )
    items = parser.instantiate_classes(config).explainers
    assert items[1] == {"class_path": "explain.attributions.sobol.Sobol", "init_args": {"nb_design": 2}}
    (_, spec) = resolve_explainers(items)
    assert spec.name == "sobol" and spec.build(nn.Linear(2, 2)).nb_design == 2
