"""A quiet start and an answer at the end: the demo config's fit through the CLI, at tiny size, as `make demo` runs
it (a subprocess, W&B offline), prints no warning line and ends with the summary table and its sentence."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from align.cli import main
from explain.quiet import quiet_library_notices

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shortcut" / "harmonized_lipschitz.yaml"
TINY = ["--data.train_size=32", "--data.image_size=16", "--data.val_size=16", "--data.test_size=16", "--data.batch_size=16",
        "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu"]

#: what a warning looks like on the console: Python's "file.py:12: Category: ...", Lightning's "file.py:12: ...",
#: W&B's "wandb: WARNING ...", and the words themselves
WARNING_LINE = re.compile(r"\.py:\d+: |warn|deprecat|💡 Tip", re.IGNORECASE)


@pytest.fixture(scope="module")
def demo_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "train.py", "fit", "--config", str(DEMO), *TINY, "--run.root", str(root)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return root, done.stdout


def test_the_demo_prints_no_warning_line(demo_fit):
    _, output = demo_fit
    assert not [line for line in output.splitlines() if WARNING_LINE.search(line)], output


def test_the_demo_ends_with_the_summary_not_lightnings_tables(demo_fit):
    _, output = demo_fit
    lines = [line for line in output.splitlines() if line.strip()]
    assert "DataLoader 0" not in output and "Test metric" not in output
    (header,) = [line for line in lines if line.split()[:2] == ["split", "acc"]]
    assert header.split() == ["split", "acc", "align*", "certified", "saliency†", "sobol†", "eva†", "area†"]
    assert [line.split()[0] for line in lines[lines.index(header) + 2:][:2]] == ["iid", "flipped"]
    sentence = " ".join(lines[lines.index(header):]).split("The model", 1)[-1]
    assert re.match(r" (relies|does not rely) on the spurious cue: flipped accuracy \d\.\d\d against iid \d\.\d\d;",
                    sentence) and sentence.endswith("its area).")


def test_lightning_tables_come_back_with_the_flag(demo_fit, capsys):
    root, _ = demo_fit
    (last,) = root.glob("*/*/checkpoints/last.ckpt")
    common = ["test", "--config", str(DEMO), *TINY, "--run.root", str(root), "--ckpt_path", str(last),
              "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    main(common)
    quiet = capsys.readouterr().out
    assert "DataLoader 0" not in quiet and "split" in quiet and "The model" in quiet
    main([*common, "--run.lightning_tables=true"])
    loud = capsys.readouterr().out
    assert "DataLoader 0" in loud and "test/iid/acc" in loud and "The model" in loud


def test_library_notices_are_filtered_by_message_and_module_only():
    quiet_library_notices()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tip = log.makeRecord(log.name, logging.INFO, __file__, 1, "💡 Tip: For seamless cloud logging ...", (), None)
    other = log.makeRecord(log.name, logging.INFO, __file__, 1, "GPU available: False, used: False", (), None)
    assert not log.filter(tip) and log.filter(other)
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_notices()  # its filter goes in front of "always"
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="my_project.trees")
        warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 21,
                               module="lightning.pytorch.utilities._pytree")
    assert [(str(w.message), w.filename) for w in caught] == [(message, "mine.py"), ("another deprecation", "_pytree.py")]
