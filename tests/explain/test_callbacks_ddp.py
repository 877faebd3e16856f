"""ExplanationMonitor under DDP: 2 CPU processes (gloo) log the same dataset-level metrics and drift as 1.

Each process explains its own shard of the validation set; torchmetrics syncs the states in ``compute()``. The
fit runs in subprocesses of ``test_callbacks_ddp_worker.py`` (Lightning's ``ddp`` launcher re-runs a script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("test_callbacks_ddp_worker.py")


def _run(tmp_path: Path, devices: int) -> dict:
    out = tmp_path / f"metrics_{devices}.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(devices), str(tmp_path / f"run_{devices}")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads(out.read_text())
    metrics["images_explained"] = [
        json.loads(Path(f"{out}.rank{rank}").read_text())["images_explained"] for rank in range(devices)
    ]
    return metrics


@pytest.mark.slow
def test_two_process_fit_logs_the_single_process_metrics(tmp_path):
    single, ddp = _run(tmp_path, 1), _run(tmp_path, 2)
    assert single.pop("world_size") == 1 and ddp.pop("world_size") == 2
    # 24 validation images: all of them on 1 process, 12 each on 2 (each rank explains its own shard)
    assert single.pop("images_explained") == [24] and ddp.pop("images_explained") == [12, 12]
    metrics = ("alignment", "alignment/spearman", "alignment/dice", "alignment/iou", "deletion")
    expected = {f"explain/{e}/{m}" for e in ("saliency", "sobol") for m in metrics}  # compute_all() synced too
    expected |= {f"explain/{e}/drift_vs_{r}" for e in ("saliency", "sobol") for r in ("previous", "first")}
    assert set(single) == set(ddp) == expected
    for key in expected:
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
    # only rank 0 wrote pictures: one PNG per explainer and epoch
    pngs = sorted((tmp_path / "run_2" / "explanations").rglob("*.png"))
    assert len(pngs) == 2 * 2
