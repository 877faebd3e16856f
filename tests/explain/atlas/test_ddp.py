"""The atlas on 2 CPU processes (Lightning's DDP, gloo) writes the same class JSON and manifest as on 1.

Stage 1 shards the images over the ranks (each keeps at most ``max_images`` per class, and the union is cut to
the first ``max_images`` in data order); stage 2 shards the classes. The runs are subprocesses of the CLI,
``python -m explain.atlas``, which Lightning's ``ddp`` launcher re-runs for the second process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import planted  # noqa: E402
from test_pipeline import SMALL  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _atlas(data: Path, out: Path, devices: int) -> Path:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "explain.atlas", "--model", "planted.planted_model", "--data", str(data),
               "--out", str(out), *SMALL, "--max_images", "5", "--batch_size", "3", "--trainer.devices", str(devices),
               "--trainer.strategy", "ddp" if devices > 1 else "auto", "--render", "false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_processes_write_the_class_json_of_one(tmp_path):
    data = planted.write_planted(tmp_path / "images", per_class=7)  # 21 images: ranks get 11 and 10 (+1 padded)
    single, double = _atlas(data, tmp_path / "one", 1), _atlas(data, tmp_path / "two", 2)
    assert sorted(p.name for p in (double / "stage1").iterdir()) == ["done.json", "rank0", "rank1"]
    one = {p.parent.name: p.read_text() for p in (single / "classes").glob("*/class.json")}
    two = {p.parent.name: p.read_text() for p in (double / "classes").glob("*/class.json")}
    assert sorted(one) == ["0000", "0001", "0002"] and one == two
    assert json.loads((single / "atlas.json").read_text())["classes"] == \
        json.loads((double / "atlas.json").read_text())["classes"]
    assert all(c["n_images"] == 5 for c in json.loads((double / "atlas.json").read_text())["classes"])
