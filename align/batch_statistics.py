"""The split harmonized step for BatchNorm networks: frozen full-batch statistics.

In training mode BatchNorm normalises each image with the statistics of the whole batch, so an image's input
gradient depends on the other images, and the annotated images cannot simply take the double backprop on their
own (that would normalise them with the statistics of the annotated images only). With frozen statistics:

1. one plain forward of the WHOLE batch: BatchNorm computes the batch mean and (biased) variance, normalises with
   them and updates its running statistics, exactly as in a plain training step; its logits feed the task loss;
2. the double-backprop pass over the annotated images only, each BatchNorm normalising with the statistics
   recorded in step 1, held constant (``(x - mean) / sqrt(var + eps) * weight + bias``, as in eval mode).

The task loss, its gradient and the running statistics are those of the full-batch step. The saliency is
``d logit_a[y_a] / d x_a`` with the statistics held constant. The full-batch saliency ``d(sum_b logit_b[y_b]) /
d x_a`` also flows through the statistics: ``d mean / d x_a`` is only ``1 / (B * H * W)`` per pixel, but every
logit of the batch contributes through it, so the two differ by more than 1/B (docs/speed.md gives the measured
difference). The harmonization term's parameter gradient likewise ignores how the statistics depend on the
weights of the layers before. Under DDP, a ``SyncBatchNorm``'s frozen statistics are this process's
batch's (step 1 itself normalises with the synchronised ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from align.losses.harmonization import input_gradient

#: layers whose training-mode output couples the images of a batch (batch statistics)
BATCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)

#: BatchNorm layer -> (batch mean [C], biased batch variance [C]) of its input in the recorded pass
Statistics = dict[nn.Module, tuple[Tensor, Tensor]]


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers (:data:`BATCH_NORMS`) of ``model`` that normalise with batch statistics (training mode,
    or no running statistics)."""
    return [
        layer for layer in model.modules()
        if isinstance(layer, BATCH_NORMS) and (layer.training or not layer.track_running_stats)
    ]


def synchronised_batch_norms(model: nn.Module) -> list[nn.Module]:
    """The ``SyncBatchNorm`` layers of ``model`` that synchronise their batch statistics across processes when they
    run now: training mode, in a process group of more than one process (the test ``SyncBatchNorm.forward``
    makes). Their synchronised backward has no double backward in PyTorch (pytorch/pytorch#61222: "derivative for
    batch_norm_backward_elemt is not implemented"), so a loss on an input gradient cannot go through them."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    return [
        layer for layer in model.modules()
        if isinstance(layer, nn.SyncBatchNorm) and layer.training
        and torch.distributed.get_world_size(layer.process_group) > 1
    ]


@contextlib.contextmanager
def recorded_batch_statistics(model: nn.Module) -> Iterator[Statistics]:
    """Within the block, each batch-statistics BatchNorm layer of ``model`` records the mean and biased variance it
    normalises with into the yielded dict; the layers themselves run unchanged (they normalise and update their
    running statistics as usual).

    A layer that updates running statistics gives them back for free: with ``r' = (1 - f) r + f s`` (``f`` the
    momentum, or ``1 / num_batches_tracked`` when it is None), ``s = (r' - (1 - f) r) / f``, and its running
    variance holds the unbiased variance ``n / (n - 1)`` times the biased one (``n`` values per channel). Under DDP
    a ``SyncBatchNorm`` then gives the synchronised statistics (its ``n`` is all processes'; this takes the local
    one, a relative error below ``1 / n`` on the variance). Other layers (no running statistics, momentum 0) get
    ``torch.var_mean`` of their input, which costs a pass over it.
    """
    statistics: Statistics = {}
    with _batch_statistics_hooks(model, lambda layer, n, mean, var: statistics.__setitem__(layer, (mean, var))):
        yield statistics


def _updates_running_statistics(layer: nn.Module) -> bool:
    return layer.training and layer.running_mean is not None and layer.momentum != 0


def _update_factor(layer: nn.Module) -> float:
    """``f`` of the running-statistics update ``r' = (1 - f) r + f s``: the momentum, or the cumulative average's
    ``1 / num_batches_tracked`` (after the update) when it is None."""
    return layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)


@contextlib.contextmanager
def _batch_statistics_hooks(model: nn.Module, record) -> Iterator[None]:
    """Within the block, ``record(layer, n, mean, var)`` after every run of a batch-statistics BatchNorm layer of
    ``model``: ``n`` values per channel, their mean and biased variance (float32 or wider), read back from the
    running-statistics update where there is one (see :func:`recorded_batch_statistics`)."""
    previous: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def before(layer: nn.Module, args: tuple) -> None:
        if _updates_running_statistics(layer):
            previous[layer] = (layer.running_mean.clone(), layer.running_var.clone())

    def after(layer: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0]
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            if layer in previous:
                old_mean, old_var = previous.pop(layer)
                f = _update_factor(layer)
                mean = (layer.running_mean - (1 - f) * old_mean) / f
                var = (layer.running_var - (1 - f) * old_var) / f * ((n - 1) / n)
            else:
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.ndim)], correction=0)
            dtype = torch.promote_types(x.dtype, torch.float32)  # float32 under bf16/fp16 autocast, as BatchNorm's
            record(layer, n, mean.to(dtype), var.to(dtype))

    layers = batch_norm_layers(model)
    handles = [layer.register_forward_pre_hook(before) for layer in layers]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def pooled_running_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, the batch-statistics BatchNorm layers of ``model`` may run on several ghost batches (Hoffer
    et al. 2017, "Train longer, generalize better"), each normalised with its own statistics; on exit each layer's
    running statistics hold ONE update, as in a plain step, with the pooled statistics of all its runs: the batch
    statistics of everything the layer saw in the block (for the first BatchNorm layer, the plain step's own; later
    layers see inputs normalised per ghost batch). With ``n_i`` values per channel, mean ``m_i`` and biased variance ``v_i`` in run ``i``
    (``n = sum n_i``):

    ``m = sum_i n_i m_i / n``, ``v = sum_i n_i (v_i + (m_i - m)^2) / n``, then ``running_mean = (1 - f) r_0 + f m``,
    ``running_var = (1 - f) r_0' + f v n / (n - 1)`` and ``num_batches_tracked = t_0 + 1`` from the values
    ``r_0, r_0', t_0`` before the block. A layer that ran once is left as it is; if the block raises, every layer's
    running statistics are restored.
    """
    layers = [layer for layer in batch_norm_layers(model) if _updates_running_statistics(layer)]
    start = {layer: (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
             for layer in layers}
    runs: dict[nn.Module, list[tuple[int, Tensor, Tensor]]] = {}
    try:
        with _batch_statistics_hooks(model, lambda layer, n, mean, var: runs.setdefault(layer, []).append(
                (n, mean, var))):
            yield
    except BaseException:
        with torch.no_grad():
            for layer, (mean, var, tracked) in start.items():
                layer.running_mean.data.copy_(mean), layer.running_var.data.copy_(var)
                layer.num_batches_tracked.copy_(tracked)
        raise
    with torch.no_grad():
        for layer, (mean0, var0, tracked0) in start.items():
            if len(runs.get(layer, ())) < 2:
                continue
            counts = torch.tensor([n for n, _, _ in runs[layer]], dtype=runs[layer][0][1].dtype,
                                  device=mean0.device)[:, None]
            means = torch.stack([mean for _, mean, _ in runs[layer]])
            variances = torch.stack([var for _, _, var in runs[layer]])
            n = counts.sum()
            mean = (counts * means).sum(0) / n
            var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
            layer.num_batches_tracked.copy_(tracked0 + 1)
            f = _update_factor(layer)
            # through .data: the graph of the ghost passes saved the buffers (BatchNorm's backward checks their
            # version), and this rewrite of their values is not part of what it differentiates
            layer.running_mean.data.copy_((1 - f) * mean0 + f * mean)
            layer.running_var.data.copy_((1 - f) * var0 + f * var * (n / (n - 1)))


@contextlib.contextmanager
def frozen_batch_statistics(model: nn.Module, statistics: Statistics) -> Iterator[None]:
    """Within the block, each BatchNorm layer in ``statistics`` normalises with its recorded mean and variance,
    held constant, and leaves its running statistics alone (it runs in eval mode with the recorded statistics in
    place of the running ones); its train/eval flag and running statistics are restored on exit.

    Raises:
        ValueError: a batch-statistics BatchNorm layer of ``model`` has no recorded statistics (it did not run in
            the recorded pass).
    """
    missing = [layer for layer in batch_norm_layers(model) if layer not in statistics]
    if missing:
        raise ValueError(
            f"{len(missing)} BatchNorm layer(s) of the model have no recorded statistics, e.g. {missing[0]}"
        )
    saved = [(layer, layer.training, layer.running_mean, layer.running_var) for layer in statistics]
    try:
        for layer, (mean, var) in statistics.items():
            # in eval mode a BatchNorm layer normalises with its running_* buffers and updates nothing; assigning a
            # tensor to a buffer's name (even one registered as None) keeps it a buffer
            layer.running_mean, layer.running_var = mean, var
            layer.training = False
        yield
    finally:
        for layer, training, mean, var in saved:
            layer.running_mean, layer.running_var = mean, var
            layer.training = training


def frozen_statistics_input_gradient(
    model: nn.Module, images: Tensor, targets: Tensor, annotated: Tensor
) -> tuple[Tensor, Tensor]:
    """Logits [B,K] of a plain pass of the whole batch, and the input gradient ``d(sum_a logit_a[y_a]) / d x_a``
    [A,C,H,W] of the ``annotated`` images (an index or a bool mask), differentiable w.r.t. the parameters
    (``create_graph=True``), computed with the BatchNorm statistics of the plain pass held constant (see the module
    docstring). With every BatchNorm layer in eval mode the two passes are exact: the gradient is the full-batch
    one.
    """
    with recorded_batch_statistics(model) as statistics:
        logits = model(images)
    with frozen_batch_statistics(model, statistics):
        _, gradient = input_gradient(model, images[annotated], targets[annotated], create_graph=True)
    return logits, gradient
