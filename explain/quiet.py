"""Start-up notices of our libraries that say nothing about the user's run, filtered by message and module.

Both command lines (``train.py`` / ``python -m align.train`` and ``python -m explain.atlas``) call
:func:`quiet_library_notices` before they build a ``Trainer``.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_library_notices"]


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." adverts (litlogger, litmodels) from its rank-zero logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_library_notices() -> None:
    """Filter the start-up notices of our libraries that say nothing about the user's run, each by its message and
    the module that emits it (nothing else is hidden):

    * Lightning's litlogger / litmodels adverts (INFO records of ``lightning.pytorch.utilities.rank_zero``);
    * the ``FutureWarning`` that torch's ``_pytree`` raises when ``lightning.pytorch.utilities._pytree`` builds a
      ``LeafSpec`` (Lightning's code, fixed upstream, not the user's).
    """
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(existing, _DropLightningTips) for existing in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLightningTips())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
