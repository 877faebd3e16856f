"""ConceptMonitor under DDP: 2 CPU processes (gloo) log the same concept drift and quality as 1.

Rank 0 reads the class images from the validation dataset itself, so its CRAFT sees the same images as a single
process. The fit runs in subprocesses of ``test_concept_drift_ddp_worker.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("test_concept_drift_ddp_worker.py")


def _run(tmp_path: Path, devices: int) -> dict:
    out = tmp_path / f"metrics_{devices}.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(WORKER), str(out), str(devices), str(tmp_path / f"run_{devices}")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_process_fit_logs_the_single_process_concept_metrics(tmp_path):
    single, ddp = _run(tmp_path, 1), _run(tmp_path, 2)
    assert single.pop("world_size") == 1 and ddp.pop("world_size") == 2
    names = ("drift_previous", "drift_first", "born", "lost", "importance_shift", "r2_per_dimension", "r2_global",
             "dead_codes", "l0", "hoyer", "concentration")
    expected = {f"concepts/class_{c}/{name}" for c in (1, 2) for name in names}
    assert set(single) == set(ddp) == expected
    for key in expected:
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
    assert single["concepts/class_1/drift_previous"] < 0.999  # the layer moved: the comparison is not trivial
