"""Standalone script for ``test_concept_drift_ddp.py``: a fit with ConceptMonitor on 1 process or 2 (DDP, gloo).

``python test_concept_drift_ddp_worker.py OUT.json DEVICES ROOT`` writes rank 0's ``concepts/*`` metrics to
OUT.json. Lightning's ``ddp`` strategy on CPU launches the second process by re-running this script. Importing it
(pytest collects it) runs nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
from test_callbacks_concepts import Blobs  # noqa: E402
from test_concept_drift import Frozen, Perturb  # noqa: E402

from explain.callbacks import ConceptMonitor  # noqa: E402


def main(out: str, devices: int, root: str) -> None:
    L.seed_everything(0, verbose=False)
    monitor = ConceptMonitor(classes=[1, 2], every_n_epochs=1, num_images=6, n_concepts=3, nb_design=4, top_k=2,
                             model_attr="model")
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=1, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto", callbacks=[monitor, Perturb(0.3)], logger=False,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Frozen(), DataLoader(Blobs(8, seed=0), batch_size=4), DataLoader(Blobs(24, seed=1), batch_size=4))
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("concepts/")}
        metrics["world_size"] = trainer.world_size
        with open(out, "w") as handle:
            json.dump(metrics, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
