"""configs/clickme/harmonized_resnet50.yaml on 2 CPU processes (DDP, gloo), tiny overrides, shards of unequal length
(7/13/3/11/6 records): it finishes, every rank runs the same number of steps, every batch holds the exact mix, and
every ClickMe record is served exactly once per epoch across ranks and workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.clickme_synthetic import write_image_folder, write_shards

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (7, 13, 3, 11, 6)  # 40 records; label k for record k


@pytest.mark.slow
@pytest.mark.parametrize("worker_threads", [False, True])
def test_two_process_fit_of_the_clickme_config(tmp_path, worker_threads):
    write_shards(tmp_path / "clickme", LENGTHS, num_classes=40, size=48)
    write_shards(tmp_path / "clickme", (6,), num_classes=40, size=48, prefix="val")
    write_image_folder(tmp_path / "imagenet", [4] * 5, size=40)
    probe = tmp_path / "probe"
    backbone = '{"class_path": "align.models.resnet18", "init_args": {"num_classes": 40}}'
    callbacks = json.dumps([{"class_path": "clickme_ddp_probe.BatchProbe", "init_args": {"out": str(probe)}}])
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/clickme/harmonized_resnet50.yaml"),
        f"--model.init_args.backbone={backbone}",
        f"--data.init_args.train_shards={tmp_path / 'clickme' / 'train-*.tfrecords'}",
        f"--data.init_args.val_shards={tmp_path / 'clickme' / 'val-*.tfrecords'}",
        f"--data.init_args.unannotated_dir={tmp_path / 'imagenet'}",
        "--data.init_args.num_classes=40", "--data.init_args.image_size=32", "--data.init_args.batch_size=8",
        "--data.init_args.annotated_ratio=0.5", "--data.init_args.num_workers=2",
        f"--data.init_args.worker_threads={str(worker_threads).lower()}",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=2",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.callbacks={callbacks}", "--run.root", str(tmp_path / "runs"), "--run.test_after_fit=false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("ALIGN_RUN_VERSION", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(Path(f"{probe}.rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 40 records, 2 ranks, 4 ClickMe images per batch: 5 batches per rank and epoch, 10 steps in 2 epochs
    assert [r["global_step"] for r in ranks] == [10, 10]
    assert [r["num_training_batches"] for r in ranks] == [5, 5]
    orders = []
    for epoch in range(2):
        served = []
        for r in ranks:
            batches = r["epochs"][epoch]
            assert len(batches) == 5
            for batch in batches:
                assert batch["has_heatmap"] == [True] * 4 + [False] * 4  # the exact mix in every batch
                assert all(label < 5 for label in batch["label"][4:])  # the 5 unannotated classes
                served += batch["label"][:4]
        assert sorted(served) == list(range(40))  # every record once per epoch across ranks and workers
        orders.append(served)
    assert orders[0] != orders[1]  # a new shuffle each epoch
    # the shard indexes were built once, beside the shards
    assert len(list((tmp_path / "clickme").glob("*.tfindex"))) == 6
