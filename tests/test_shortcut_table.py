"""scripts/shortcut_table.py: reading the runs, mean ± std, its arguments, and (slow) one end-to-end run."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("shortcut_table", ROOT / "scripts" / "shortcut_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root: Path, config: str, seed: int, values: dict, seconds: float) -> None:
    directory = root / config / f"seed{seed}"
    directory.mkdir(parents=True)
    keys = sorted(values)
    lines = [",".join(["epoch", "step", *keys])]
    lines.append(",".join(["0", "10", *["0.5" for _ in keys]]))  # an earlier row: the last value must win
    lines.append(",".join(["1", "20", *[str(values[k]) for k in keys]]))
    lines.append(",".join(["1", "20", *["" for _ in keys]]))  # empty cells are not values
    (directory / "metrics.csv").write_text("\n".join(lines) + "\n")
    (root / config / f"seed{seed}.time").write_text(f"{seconds}\n")


def test_table_is_mean_and_sample_std_of_the_runs(tmp_path):
    script = load_script()
    flipped = [0.10, 0.20, 0.15]
    sobol = [0.6, 0.7, 0.65]
    for seed in range(3):
        values = {
            "test/iid/acc": 0.9,
            "test/flipped/acc": flipped[seed],
            "test/iid/alignment": 0.7,
            "test/iid/explain/sobol/spurious_mass": sobol[seed],
            "test/iid/explain/spurious_area": 0.015625,
        }
        write_run(tmp_path, "baseline_lipschitz", seed, values, seconds=50 + seed)
    assert script.finished(tmp_path, "baseline_lipschitz", 0)
    text = script.main(["--root", str(tmp_path), "--configs", "baseline_lipschitz", "--table-only"])
    row = next(line for line in text.splitlines() if "`baseline_lipschitz`" in line).split(" | ")
    header = next(line for line in text.splitlines() if line.startswith("| config")).split(" | ")
    cell = dict(zip([h.strip("| ") for h in header], [c.strip("| ") for c in row]))
    assert cell["seeds"] == "3"
    assert cell["flipped acc"] == f"{statistics.fmean(flipped):.3f} ± {statistics.stdev(flipped):.3f}"
    assert cell["sobol spurious"] == f"{statistics.fmean(sobol):.3f} ± {statistics.stdev(sobol):.3f}"
    assert cell["iid acc"] == "0.900 ± 0.000"
    assert cell["eva spurious"] == "–" and cell["certified acc"] == "–"  # not logged: not invented
    assert cell["time (s)"] == "51 ± 1"
    assert "area share on the iid images (what a uniform map scores): 0.0156" in text
    assert (tmp_path / "table.md").read_text().strip() == text


def test_one_seed_gives_the_value_alone_and_reserved_options_are_refused(tmp_path):
    script = load_script()
    assert script.mean_std([0.25]) == "0.250" and script.mean_std([]) == "–"
    with pytest.raises(SystemExit):
        script.parse(["--seeds", "0", "--", "--run.root=/elsewhere"])
    with pytest.raises(SystemExit):
        script.parse(["--parallel", "0"])
    args, overrides = script.parse(["--seeds", "1", "--trainer.accelerator=gpu", "--", "--trainer.max_epochs=2"])
    assert overrides == ["--trainer.accelerator=gpu", "--trainer.max_epochs=2"] and args.seeds == [1]
    call = script.command("rrr_cnn", 1, tmp_path, overrides)
    assert call[:3] == [sys.executable, str(ROOT / "train.py"), "fit"]
    assert ["--seed_everything", "1"] == call[call.index("--seed_everything") : call.index("--seed_everything") + 2]
    assert call[-2:] == overrides


@pytest.mark.slow
def test_end_to_end_on_tiny_runs(tmp_path):
    """Two configs, one seed, tiny data: the CLI runs, the test metrics and the monitor's test-time spurious
    masses come back into the table."""
    script = load_script()
    tiny = [
        "--data.train_size=32", "--data.val_size=16", "--data.test_size=16", "--data.batch_size=16",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_model_summary=false",
        "--trainer.callbacks.num_samples=2", "--trainer.callbacks.max_images=4",
    ]  # fmt: skip
    text = script.main(["--root", str(tmp_path), "--configs", "baseline_cnn", "rrr_lipschitz", "--seeds", "0", *tiny])
    for config in ("baseline_cnn", "rrr_lipschitz"):
        row = script.collect(tmp_path, config, 0)
        assert 0 <= row["iid acc"] <= 1 and 0 <= row["flipped acc"] <= 1
        for name in ("saliency", "sobol"):
            assert 0 <= row[f"{name} spurious"] <= 1
        assert row["area"] == pytest.approx(16 / 1024)  # 4x4 watermark on 32x32
        assert f"`{config}`" in text
    assert "eva spurious" in script.collect(tmp_path, "rrr_lipschitz", 0)
    assert "certified acc" in script.collect(tmp_path, "rrr_lipschitz", 0)
    # a finished run is not run again
    again = script.main(["--root", str(tmp_path), "--configs", "baseline_cnn", "--seeds", "0", *tiny])
    assert "`baseline_cnn`" in again
