"""What the monitors of :mod:`explain.callbacks` share: schedule, error policy, the model they explain, and
where their files go."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from explain.base import model_device
from explain.callbacks.batches import BatchAdapter
from explain.callbacks.isolation import isolated

T = TypeVar("T")
OnError = Literal["raise", "warn"]


def check_classes(classes: Sequence[int], owner: str) -> list[int]:
    """``classes`` as a list of class indices, or a clear error.

    Raises:
        ValueError: ``classes`` is neither a class index nor a non-empty list of them (ints >= 0).
    """
    if isinstance(classes, int):
        classes = [classes]
    if not isinstance(classes, Sequence) or not classes or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes
    ):
        raise ValueError(f"{owner}: classes must be a non-empty list of class indices (ints >= 0), got {classes!r}")
    return list(classes)


class MonitorCallback(Callback):
    """Base of the monitors: runs every ``every_n_epochs`` epochs, at the first validation of the epoch
    (never during the sanity check), on the network ``model_attr`` of the LightningModule.

    Args:
        every_n_epochs: evaluate in epochs 0, n, 2n, ... (when validation runs in them).
        on_error: ``"raise"`` stops training with the explainer's error; ``"warn"`` warns (naming the
            explainer and the error) and skips it this time.
        model_attr: dotted name of the LightningModule's attribute holding the network to explain (e.g.
            ``"model"``); None explains the LightningModule itself (its ``forward`` must return logits).
        batch_adapter: ``batch -> dict`` in the data contract (``image``, ``label``, optional ``heatmap``,
            ``has_heatmap``, ``spurious_mask``); None: batches are that dict or ``(image, label)`` pairs.
        seed: seed of the samples the monitor draws from the validation data.

    Raises:
        ValueError: ``every_n_epochs`` not a positive int, ``on_error`` neither ``"raise"`` nor ``"warn"``, or
            ``model_attr`` neither a non-empty name nor None.
        TypeError: ``batch_adapter`` not callable, or ``seed`` not an int.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        on_error: OnError = "raise",
        model_attr: str | None = None,
        batch_adapter: BatchAdapter | None = None,
        seed: int = 0,
    ) -> None:
        name = type(self).__name__
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"{name}: every_n_epochs must be a positive int (1 = every epoch), got {every_n_epochs!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"{name}: on_error must be 'raise' or 'warn', got {on_error!r}")
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"{name}: model_attr must be an attribute name such as 'model' or None, got {model_attr!r}"
            )
        if batch_adapter is not None and not callable(batch_adapter):
            raise TypeError(
                f"{name}: batch_adapter must be a function batch -> dict, got {type(batch_adapter).__name__}"
            )
        if not isinstance(seed, int):
            raise TypeError(f"{name}: seed must be an int, got {type(seed).__name__}")
        self.every_n_epochs = every_n_epochs
        self.on_error = on_error
        self.model_attr = model_attr
        self.batch_adapter = batch_adapter
        self.seed = seed
        self._last_epoch = -1
        self._out_dir = Path("explanations")

    # ---- Lightning hooks shared by the monitors
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective (a broadcast): every rank calls setup, so read it here, once
        self._out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "explanations"
        self.explained_model(pl_module)  # a wrong model_attr fails now, not after an epoch

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_epoch < 0:
            rank_zero_warn(
                f"{type(self).__name__} never ran: validation did not run in an epoch that is a multiple of "
                f"every_n_epochs={self.every_n_epochs} (check limit_val_batches / check_val_every_n_epoch)"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self._last_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = int(state_dict["last_epoch"])

    @contextlib.contextmanager
    def explaining(self, pl_module: LightningModule) -> Iterator[tuple[nn.Module, torch.device]]:
        """``(model, device)``: the network to explain and its device, inside :func:`isolated` (RNGs restored, no
        ``.grad`` written, outside ``inference_mode``), which every piece of a monitor's work runs in."""
        model = self.explained_model(pl_module)
        device = model_device(model, default=pl_module.device)
        with isolated(model, device):
            yield model, device

    # ---- helpers
    def explained_model(self, pl_module: LightningModule) -> nn.Module:
        """The network to explain: ``pl_module`` or its attribute ``model_attr``.

        Raises:
            AttributeError: a part of ``model_attr`` names no attribute.
            TypeError: ``model_attr`` names something that is not an ``nn.Module``.
        """
        if self.model_attr is None:
            return pl_module
        model: Any = pl_module
        for part in self.model_attr.split("."):
            if not hasattr(model, part):
                children = [child for child, _ in model.named_children()] if isinstance(model, nn.Module) else []
                raise AttributeError(
                    f"{type(self).__name__}: model_attr={self.model_attr!r} but {type(model).__name__} has no "
                    f"attribute {part!r} (its submodules: {children}); pass the attribute holding the network "
                    "or model_attr=None to explain the LightningModule itself"
                )
            model = getattr(model, part)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: model_attr={self.model_attr!r} is a {type(model).__name__}, not a torch "
                "nn.Module"
            )
        return model

    def is_due(self, trainer: Trainer) -> bool:
        """True at the first validation (not the sanity check) of an epoch that is a multiple of every_n_epochs."""
        epoch = trainer.current_epoch
        return not trainer.sanity_checking and epoch % self.every_n_epochs == 0 and epoch != self._last_epoch

    def start_rank_zero_evaluation(self, trainer: Trainer) -> bool:
        """For monitors that work on rank 0 alone: when due, mark this epoch as done on every rank and return
        True on rank 0 only."""
        if not self.is_due(trainer):
            return False
        self._last_epoch = trainer.current_epoch
        return trainer.is_global_zero

    def attempt(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[bool, T | None]:
        """``(True, fn(...))``, or with ``on_error="warn"`` ``(False, None)`` and a warning if ``fn`` raises."""
        try:
            return True, fn(*args, **kwargs)
        except Exception as error:
            if self.on_error == "raise":
                error.add_note(f"{type(self).__name__}: raised by {what} (on_error='warn' keeps training instead)")
                raise
            rank_zero_warn(
                f"{type(self).__name__}: {what} failed and is skipped this time: {type(error).__name__}: {error}"
            )
            return False, None

    @staticmethod
    def agree(trainer: Trainer, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag OR-ed over the processes (one all-reduce; every rank must call it), so every rank takes
        the same branch before a collective."""
        if trainer.world_size <= 1 or not flags:
            return flags
        total = trainer.strategy.reduce(torch.tensor(flags, dtype=torch.float32, device=device), reduce_op="sum")
        return [bool(value > 0) for value in total.tolist()]


class RankZeroMonitor(MonitorCallback):
    """Base of the monitors of chosen ``classes`` whose work (pictures and tables: no scalar, no collective) runs
    on global rank 0 alone, at the end of a due validation epoch, inside :meth:`MonitorCallback.explaining`.

    A subclass implements :meth:`evaluate` and lists in ``state_fields`` the attributes that tell two of its
    instances apart (its ``state_key``, under which Lightning saves its state).
    """

    state_fields: ClassVar[tuple[str, ...]] = ("classes",)

    def __init__(self, classes: Sequence[int], every_n_epochs: int = 5, **monitor_options: Any) -> None:
        super().__init__(every_n_epochs, **monitor_options)
        self.classes = check_classes(classes, type(self).__name__)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**{name: getattr(self, name) for name in self.state_fields})

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.start_rank_zero_evaluation(trainer):
            with self.explaining(pl_module) as (model, device):
                self.evaluate(trainer, model, device)

    def evaluate(self, trainer: Trainer, model: nn.Module, device: torch.device) -> None:
        """The monitor's work on ``model`` (on ``device``), on rank 0, inside :func:`isolated`.

        Raises:
            NotImplementedError: a subclass does not implement it.
        """
        raise NotImplementedError
