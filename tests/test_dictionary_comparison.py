"""scripts/dictionary_comparison.py --checkpoint on a shortcut checkpoint: a row per stage and method, with the
properties the neuron basis must have (exact reconstruction, perfectly stable across seeds)."""

import subprocess
import sys
from pathlib import Path

from align.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_comparison_on_a_shortcut_checkpoint(tmp_path, tiny_cli):
    config = ROOT / "configs" / "shortcut" / "baseline_lipschitz.yaml"
    main(["fit", "--config", str(config), *tiny_cli, "--trainer.max_epochs=1", "--run.root", str(tmp_path),
          "--run.test_after_fit=false"])
    (checkpoint,) = tmp_path.glob("*/*/checkpoints/last.ckpt")
    table = tmp_path / "table.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "dictionary_comparison.py"), "--checkpoint",
                    str(checkpoint), "--images", "16", "--centres", "4", "--concepts", "8", "--sae-epochs", "1",
                    "--out", str(table)], check=True, cwd=tmp_path, capture_output=True)
    rows = [line.strip("|").split("|") for line in table.read_text().splitlines()[2:]]
    assert [(cells[1].strip(), cells[2].strip()) for cells in rows] == [
        (stage, method) for stage in ("stage1", "stage2", "stage3")
        for method in ("neurons", "NMF", "TopK SAE", "Archetypal SAE")]
    for cells in rows:
        r2, stability, share = float(cells[4]), float(cells[7]), float(cells[8])
        assert 0.0 <= share <= 1.0 and 0.0 <= stability <= 1.0
        if cells[2].strip() == "neurons":
            assert r2 == 1.0 and stability == 1.0
