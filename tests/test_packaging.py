"""Packaging: the configs travel with the package (``--config <name>``), the wheel and the sdist hold them, and
``pip install .`` into a fresh venv runs the demo config from outside the clone (slow)."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from align.cli import configs_root, main, packaged_configs, resolve_config

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "align", "explain", "datamodules", "configs"]
TINY = ["--data.train_size=32", "--data.val_size=16", "--data.test_size=16", "--data.batch_size=16",
        "--data.image_size=16", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]


def test_the_packaged_configs_are_the_repository_configs():
    assert configs_root().resolve() == (ROOT / "configs").resolve()
    experiments = sorted(str(path.relative_to(ROOT / "configs").with_suffix(""))
                         for path in (ROOT / "configs").glob("*/*.yaml")
                         if path.parent.name not in ("data", "trainer", "callbacks"))
    assert packaged_configs() == experiments and "shortcut/harmonized_lipschitz" in experiments


@pytest.mark.parametrize("name", ["shortcut/harmonized_lipschitz", "shortcut/harmonized_lipschitz.yaml",
                                  "configs/shortcut/harmonized_lipschitz.yaml"])
def test_a_config_by_name_resolves_to_the_packaged_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the clone: configs/... is no file here
    assert Path(resolve_config(name)) == configs_root() / "shortcut" / "harmonized_lipschitz.yaml"


def test_files_and_inline_yaml_are_left_alone_and_unknown_names_are_refused(tmp_path, monkeypatch):
    mine = tmp_path / "mine.yaml"
    mine.write_text("trainer: {max_epochs: 1}\n")
    assert resolve_config(str(mine)) == str(mine)
    assert resolve_config("{trainer: {max_epochs: 1}}") == "{trainer: {max_epochs: 1}}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--config shortcut/nope: no such file.*shortcut/baseline_cnn"):
        resolve_config("shortcut/nope")


def test_the_cli_reads_a_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "shortcut/harmonized_lipschitz", "--trainer.max_epochs=2", "--print_config"])
    printed = capsys.readouterr().out
    assert "max_epochs: 2" in printed and "align.models.lip_vgg" in printed


def _copy_sources(destination: Path) -> Path:
    destination.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_build_makes_a_wheel_and_an_sdist_that_hold_the_configs(tmp_path):
    source = _copy_sources(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("human_aligned_vision-*.whl")
    (sdist,) = (tmp_path / "dist").glob("human_aligned_vision-*.tar.gz")
    demo = "align/configs/shortcut/harmonized_lipschitz.yaml"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert demo in names and "align/configs/data/shortcut.yaml" in names and "explain/__init__.py" in names
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Name: human-aligned-vision" in metadata
    with tarfile.open(sdist) as archive:
        members = {member.name.split("/", 1)[1]: member for member in archive.getmembers() if "/" in member.name}
    assert members[demo].isfile() and "CHANGELOG.md" in members  # a file, not the repository's link


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_runs_the_demo_config_outside_the_clone(tmp_path):
    source = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this environment's packages (torch, lightning, setuptools, ...) behind the venv's own: nothing is downloaded
    host = [path for path in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(path).is_dir()]
    Path(purelib, "host-packages.pth").write_text("\n".join(dict.fromkeys(host)) + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index",
                    "--no-build-isolation", str(source)], check=True, env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import align, explain, datamodules; print(align.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=elsewhere).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the clone
    run = subprocess.run([python, "-m", "align.train", "fit", "--config", "shortcut/harmonized_lipschitz", *TINY,
                          "--run.root", "runs"], env=env, cwd=elsewhere, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "The model" in run.stdout and "spurious cue" in run.stdout
    assert list((elsewhere / "runs" / "harmonized_lipschitz").glob("*/checkpoints/last.ckpt"))
    script = subprocess.run([venv / "bin" / "align-train", "fit", "--config", "shortcut/baseline_cnn", "--print_config"],
                            env=env, cwd=elsewhere, capture_output=True, text=True)
    assert script.returncode == 0 and "small_cnn" in script.stdout, script.stderr[-2000:]
