"""``batch_size="auto"`` for CRAFT, MACO and the dictionaries: parts that run out of memory above some batch give
the results of a fixed small batch, and the size that fit is remembered and logged once."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from explain.batching import AutoBatchSize
from explain.callbacks import ConceptMonitor, FeatureVizMonitor
from explain.concepts import Craft, make_dictionary
from explain.concepts import dictionary as dictionary_module
from explain.featureviz import logit, maco, power_law_spectrum


def out_of_memory(size: int, cpu_error: bool) -> RuntimeError:
    if cpu_error:
        return RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                            f"you tried to allocate {size << 30} bytes. Error code 12")
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Gate(nn.Module):
    """The identity on batches of at most ``limit`` rows, an out-of-memory error above; ``calls`` records the
    batch sizes it was given."""

    def __init__(self, limit: int, cpu_error: bool = False) -> None:
        super().__init__()
        self.limit, self.cpu_error, self.calls = limit, cpu_error, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise out_of_memory(x.shape[0], self.cpu_error)
        return x


def auto_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "batch_size='auto'" in r.getMessage()]


def images(count=4, seed=0):
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def craft_parts(limit: int, cpu_error: bool = False):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    gate_in, gate_out = Gate(limit, cpu_error), Gate(limit, cpu_error)
    return nn.Sequential(gate_in, body), nn.Sequential(gate_out, head), gate_in, gate_out


def craft_results(craft: Craft, x: torch.Tensor) -> dict[str, torch.Tensor]:
    craft.fit(x, class_id=1)
    return {"W": craft.W_, "U": craft.crops_u_, "importance": craft.importance(x[:2], nb_design=8, per_image=True),
            "maps": craft.concept_maps(x[:2]), "transform": craft.transform(x[:2])}


@pytest.mark.parametrize("cpu_error", [False, True])
def test_craft_auto_gives_the_results_of_a_fixed_small_batch(cpu_error, caplog):
    x = images()
    g, h, _, _ = craft_parts(limit=10**9)
    expected = craft_results(Craft(g, h, n_concepts=3, patch_size=4, stride=4, batch_size=3), x)
    g, h, gate_in, gate_out = craft_parts(limit=5, cpu_error=cpu_error)
    craft = Craft(g, h, n_concepts=3, patch_size=4, stride=4, batch_size="auto")
    with caplog.at_level(logging.INFO, logger="explain.batching"):
        results = craft_results(craft, x)
        for name, value in expected.items():
            torch.testing.assert_close(results[name], value, rtol=1e-4, atol=1e-5, msg=name)
        assert max(gate_in.calls) > 5 and max(gate_out.calls) > 5  # started above the limit, and came down
        fitted = craft.auto_batch_size.fitted
        # input_to_latent on the crops (16 of them, resized) and on images, latent_to_logit on masked latents
        assert {key[0] for key in fitted} == {"input_to_latent", "latent_to_logit"}
        assert all(size <= 5 for size in fitted.values())
        lines = auto_lines(caplog)
        assert len(lines) == len(fitted)
        # a second round starts from the sizes that fit: no failed attempt, no new log line
        gate_in.calls.clear(), gate_out.calls.clear()
        again = craft_results(craft, x)
        torch.testing.assert_close(again["importance"], expected["importance"], rtol=1e-4, atol=1e-5)
        assert max(gate_in.calls + gate_out.calls) <= 5
    assert auto_lines(caplog) == lines


def test_craft_refuses_a_bad_batch_size():
    for bad in ("Auto", 0, 1.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int, got .* \\(or 'auto'"):
            Craft(nn.Identity(), batch_size=bad)


# ---------------------------------------------------------------------------------------------- dictionaries
def signed_rows(n=40, c=6, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


DICTIONARIES = {
    "nmf": {},
    "semi_nmf": {"max_iter": 50},
    "archetypal": {"max_iter": 20, "encode_iter": 50},
    "topk_sae": {"epochs": 2, "progress": False, "top_k": 2},
    "batchtopk_sae": {"epochs": 2, "progress": False, "top_k": 2},
    "jumprelu_sae": {"epochs": 2, "progress": False},
    "archetypal_sae": {"epochs": 2, "progress": False, "top_k": 2, "n_candidates": 20},
}


def with_fixed_rows(dictionary, rows, method, x):
    """``method(x)`` with ``encode_batch_size=rows`` instead of ``"auto"``."""
    auto = dictionary.auto_batch_size
    dictionary.encode_batch_size, dictionary.auto_batch_size = rows, None
    try:
        return method(x)
    finally:
        dictionary.encode_batch_size, dictionary.auto_batch_size = "auto", auto


def fragile(fn, limit, calls, cpu_error=False):
    def run(x, *args, **kwargs):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise out_of_memory(x.shape[0], cpu_error)
        return fn(x, *args, **kwargs)

    return run


@pytest.mark.parametrize("name", sorted(DICTIONARIES))
def test_dictionary_encoding_auto_gives_the_codes_of_a_fixed_small_batch(name, monkeypatch, caplog):
    x = signed_rows()
    x = x.abs() if name == "nmf" else x
    fitted = make_dictionary(name, 4, encode_batch_size="auto", **DICTIONARIES[name]).fit(x)
    assert fitted.get_params()["encode_batch_size"] == "auto"
    new = signed_rows(n=30, seed=1)
    new = new.abs() if name == "nmf" else new
    expected = with_fixed_rows(fitted, 3, fitted.encode, new)
    calls: list[int] = []
    monkeypatch.setattr(fitted, "_encode", fragile(fitted._encode, 5, calls, cpu_error=name == "nmf"))
    with caplog.at_level(logging.INFO, logger="explain.batching"):
        codes = fitted.encode(new)
        torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-6)
        # all 30 rows at once first (the start, 65536, is more), then halved from 30: 15, 7, then 3 fits
        assert calls == [30, 15, 7] + [3] * 10
        assert fitted.auto_batch_size.fitted == {("encode", 6, torch.float32, torch.device("cpu")): 3}
        calls.clear()
        torch.testing.assert_close(fitted.encode(new), codes)
        assert max(calls) <= 5
    assert len(auto_lines(caplog)) == 1


@pytest.mark.parametrize("name", ["nmf", "topk_sae"])
def test_code_jacobian_auto_gives_the_jacobian_of_a_fixed_small_batch(name, monkeypatch):
    x = signed_rows()
    x = x.abs() if name == "nmf" else x
    fitted = make_dictionary(name, 4, encode_batch_size="auto", **DICTIONARIES[name]).fit(x)
    expected = with_fixed_rows(fitted, 1, fitted.code_jacobian, x)  # one row at a time: nothing shared
    calls: list[int] = []
    if name == "nmf":
        monkeypatch.setattr(dictionary_module, "nnls_jacobian", fragile(dictionary_module.nnls_jacobian, 7, calls))
    else:
        monkeypatch.setattr(fitted, "_jacobian", fragile(fitted._jacobian, 7, calls))
    torch.testing.assert_close(fitted.code_jacobian(x), expected, rtol=1e-5, atol=1e-6)
    assert max(calls) > 7 and fitted.auto_batch_size.fitted[("code_jacobian", 6, torch.float32, x.device)] == 5


def test_sae_training_batch_size_is_never_auto():
    with pytest.raises(ValueError, match="training minibatch, which changes the fit"):
        make_dictionary("topk_sae", 4, batch_size="auto")
    with pytest.raises(ValueError, match="encode_batch_size must be a positive int"):
        make_dictionary("nmf", 4, encode_batch_size=0)


# ---------------------------------------------------------------------------------------------- MACO
class GatedCNN(nn.Module):
    def __init__(self, limit: int, cpu_error: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = Gate(limit, cpu_error)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(self.gate(x))


def run_maco(model, batch_size):
    return maco(logit(model, 1), image_size=12, steps=3, crops_per_step=8, magnitude=power_law_spectrum(12),
                batch_size=batch_size)


@pytest.mark.parametrize("cpu_error", [False, True])
def test_maco_auto_gives_the_image_of_a_fixed_small_batch(cpu_error, caplog):
    whole = run_maco(GatedCNN(10**9), None)
    small = run_maco(GatedCNN(10**9), 3)
    model = GatedCNN(limit=3, cpu_error=cpu_error)
    auto = AutoBatchSize("maco")
    with caplog.at_level(logging.INFO, logger="explain.batching"):
        image, alpha = run_maco(model, auto)
        for expected in (small, whole):  # chunks of 3 crops, and all 8 at once: the same steps
            torch.testing.assert_close(image, expected[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(alpha, expected[1], rtol=1e-4, atol=1e-5)
        assert max(model.gate.calls) == 8 and auto.fitted == {("objective", 3, 12, 12, torch.float32,
                                                                torch.device("cpu")): 2}
        model.gate.calls.clear()
        run_maco(model, auto)  # the size is remembered from call to call
        assert max(model.gate.calls) <= 3
    assert len(auto_lines(caplog)) == 1


def test_maco_refuses_to_split_a_scalar_objective():
    model = GatedCNN(10**9)
    mean_logit = lambda crops: model(crops)[:, 1].mean()  # noqa: E731
    with pytest.raises(ValueError, match="scalar, which cannot be split"):
        maco(mean_logit, image_size=12, steps=1, crops_per_step=4, magnitude=power_law_spectrum(12), batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        maco(mean_logit, image_size=12, steps=1, magnitude=power_law_spectrum(12), batch_size="all")


# ---------------------------------------------------------------------------------------------- monitors
def test_monitors_share_one_auto_batch_size(caplog):
    monitor = FeatureVizMonitor([0], maco_options={"batch_size": "auto"})
    assert isinstance(monitor.maco_options["batch_size"], AutoBatchSize)
    with pytest.raises(ValueError, match="maco_options batch_size must be a positive int"):
        FeatureVizMonitor([0], maco_options={"batch_size": -1})

    options = {"patch_size": 4, "stride": 4, "batch_size": "auto", "dictionary": "semi_nmf",
               "dictionary_options": {"encode_batch_size": "auto", "max_iter": 20}}
    monitor = ConceptMonitor([0, 1], n_concepts=3, nb_design=4, craft_options=options)
    torch.manual_seed(0)
    gate = Gate(limit=5)
    model = nn.Sequential(gate, nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3))
    with caplog.at_level(logging.INFO, logger="explain.batching"):
        first, _, _ = monitor.concepts(model, images(), 0)
        lines = auto_lines(caplog)
        gate.calls.clear()
        second, _, _ = monitor.concepts(model, images(seed=1), 1)  # another class: the sizes are known
    assert first.auto_batch_size is second.auto_batch_size is monitor.craft_options["batch_size"]
    assert first.dictionary_.auto_batch_size is second.dictionary_.auto_batch_size
    assert max(gate.calls) <= 5 and lines and auto_lines(caplog) == lines
