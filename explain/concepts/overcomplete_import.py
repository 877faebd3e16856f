"""The ``overcomplete`` library (Kempner Institute, MIT), imported with matplotlib's removed ``cm.get_cmap`` restored.

overcomplete 0.3.0 (its latest release) builds colormaps when it is imported, with ``matplotlib.cm.get_cmap``,
which matplotlib 3.9 removed (its replacement, ``matplotlib.colormaps.get_cmap``, takes the same name). Importing
``overcomplete`` through this module puts the old name back first, so the library imports with any matplotlib.
"""

from __future__ import annotations

import matplotlib
import matplotlib.cm

if not hasattr(matplotlib.cm, "get_cmap"):
    matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap

import overcomplete  # noqa: E402
from overcomplete import metrics, optimization, sae  # noqa: E402
from overcomplete.optimization import archetypal_analysis  # noqa: E402 (not re-exported by the package)

__all__ = ["archetypal_analysis", "metrics", "optimization", "overcomplete", "sae"]
