"""Atomic writes of the atlas's files: a temporary file in the same folder, then ``os.replace``, so a killed run
never leaves a half-written JSON, picture or tensor behind (the atlas format's rule)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def plain(value: Any) -> Any:
    """JSON-ready copy of ``value``: tensors and numpy numbers to Python, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return value.as_posix()
    return value


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(plain(data), indent=1, ensure_ascii=False, allow_nan=False)
    return _atomic(Path(path), lambda stream: stream.write(text.encode()))


def write_png(path: str | Path, image: Tensor | np.ndarray) -> Path:
    """``image`` uint8 [H, W, 3] or [H, W, 4], or float [3, H, W] in [0, 1], as a PNG."""
    if isinstance(image, Tensor):
        if image.is_floating_point():
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        image = image.cpu().numpy()
    picture = Image.fromarray(np.ascontiguousarray(image))
    return _atomic(Path(path), lambda stream: picture.save(stream, format="PNG"))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    return _atomic(Path(path), lambda stream: np.save(stream, array))


def write_tensors(path: str | Path, data: dict[str, Any]) -> Path:
    return _atomic(Path(path), lambda stream: torch.save(data, stream))
