"""``batch_size="auto"``: a model that runs out of memory above some batch gives the maps of a fixed small batch."""

import logging

import pytest
import torch
from torch import nn

from explain.attributions.captum import CaptumExplainer
from explain.attributions.saliency import GradientInput, Saliency, SmoothGrad
from explain.attributions.sobol import Sobol
from explain.batching import CPU_START, AutoBatchSize, is_out_of_memory


class Fragile(nn.Module):
    """A small CNN that raises an out-of-memory error (CUDA's, or the CPU allocator's) on batches above ``limit``;
    ``calls`` records every batch size it was given."""

    def __init__(self, limit: int, cpu_error: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(16, 3))
        self.limit, self.cpu_error, self.calls = limit, cpu_error, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            if self.cpu_error:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 1099511627776 bytes. Error code 12")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.net(x)


def images_and_targets(count=6):
    generator = torch.Generator().manual_seed(1)
    return torch.rand(count, 3, 8, 8, generator=generator), torch.randint(0, 3, (count,), generator=generator)


EXPLAINERS = {
    "saliency": lambda model, batch_size: Saliency(model, batch_size=batch_size),
    "gradient_input": lambda model, batch_size: GradientInput(model, batch_size=batch_size),
    "smoothgrad": lambda model, batch_size: SmoothGrad(model, nb_samples=5, batch_size=batch_size),
    "sobol": lambda model, batch_size: Sobol(model, grid_size=2, nb_design=4, batch_size=batch_size),
    "captum_ig": lambda model, batch_size: CaptumExplainer(model, "IntegratedGradients", batch_size=batch_size,
                                                           n_steps=3),  # 3 rows per image
}


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
@pytest.mark.parametrize("cpu_error", [False, True])
def test_auto_batch_size_gives_the_maps_of_a_fixed_small_batch(name, cpu_error, caplog):
    images, targets = images_and_targets()
    expected = EXPLAINERS[name](Fragile(limit=10**9), 2)(images, targets)
    model = Fragile(limit=3, cpu_error=cpu_error)
    explainer = EXPLAINERS[name](model, "auto")
    with caplog.at_level(logging.INFO, logger="explain.batching"):
        maps = explainer(images, targets)
        torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
        assert max(model.calls) > 3  # it started above the limit, and came down
        fitted = explainer.auto_batch_size.fitted
        assert len(fitted) == 1 and 1 <= next(iter(fitted.values())) <= CPU_START
        # the second call starts from the size that fit: no failed attempt, and no second log line
        model.calls.clear()
        torch.testing.assert_close(explainer(images, targets), expected, rtol=1e-5, atol=1e-6)
        assert max(model.calls) <= 3
    assert len([r for r in caplog.records if "batch_size='auto'" in r.getMessage()]) == 1


def test_sizes_halve_from_the_start_and_are_remembered_per_input_shape():
    sizes = []

    def run(size):
        sizes.append(size)
        if size > 10:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return size

    auto = AutoBatchSize()
    assert auto(("a",), torch.device("cpu"), run) == 8
    assert sizes == [64, 32, 16, 8]
    sizes.clear()
    assert auto(("a",), torch.device("cpu"), run) == 8 and sizes == [8]
    assert auto(("b",), torch.device("cuda"), run) == 8 and sizes[1] == 1024  # another key, an accelerator's start
    assert auto.fitted == {("a",): 8, ("b",): 8}


def test_other_errors_and_a_batch_of_one_that_does_not_fit_are_raised():
    def broken(size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        AutoBatchSize()("key", torch.device("cpu"), broken)

    def never(size):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        AutoBatchSize()("key", torch.device("cpu"), never)
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))


def test_batch_size_must_be_a_positive_int_or_auto():
    model = Fragile(limit=10)
    for bad in ("Auto", 0, True, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive int, got .* \\(or 'auto'"):
            Saliency(model, batch_size=bad)
    assert "batch_size='auto'" in repr(Saliency(model, batch_size="auto"))


@pytest.mark.parametrize("explainer", [Saliency, SmoothGrad, Sobol, CaptumExplainer])
def test_configs_accept_auto(explainer):
    """YAML configs go through jsonargparse, which checks the type hints: ``batch_size: auto`` must pass them."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(explainer, "explainer", skip={"model", "method"})
    assert parser.parse_args(["--explainer.batch_size=auto"]).explainer.batch_size == "auto"
    assert parser.parse_args(["--explainer.batch_size=8"]).explainer.batch_size == 8
