"""align.cli under faults: W&B without network, runs started in the same second, --ckpt_path that is corrupt,
holds NaN or disagrees with --model.* overrides, a ClickMe folder without test.csv. No test touches the network:
W&B's base URL points at a closed localhost port."""

import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import align.cli
from align.cli import choose_wandb_mode, claim_run_dir, main, resolve_wandb_mode, wandb_base_url, wandb_reachable

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
BASELINE = str(ROOT / "configs" / "shortcut" / "baseline_cnn.yaml")


def closed_port_url() -> str:
    """An http URL on localhost where nothing listens (the port was just free)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def tiny(tiny_cli: list[str]) -> list[str]:
    return [*tiny_cli, "--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.callbacks=[]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a one-epoch fit of baseline_cnn with harmonization_weight 0.3."""
    root = tmp_path_factory.mktemp("fit")
    args = [
        "fit", "--config", BASELINE, "--run.root", str(root), "--run.version", "v", "--run.test_after_fit=false",
        "--data.train_size=32", "--data.val_size=16", "--data.test_size=16", "--data.batch_size=16",
        "--data.image_size=16", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.max_epochs=1", "--trainer.logger=false",
        "--trainer.callbacks=[]", "--model.init_args.harmonization_weight=0.3",
    ]
    main(args)
    return root / "baseline_cnn" / "v" / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------------------------- W&B
def test_empty_wandb_mode_counts_as_unset(tmp_path):
    missing = str(tmp_path / "no-netrc")
    assert resolve_wandb_mode({"WANDB_MODE": "", "NETRC": missing, "WANDB_BASE_URL": "http://127.0.0.1:1"}) == "offline"
    assert resolve_wandb_mode({"WANDB_MODE": "", "WANDB_API_KEY": "x"}) == "online"


def test_credentials_without_network_fall_back_to_offline_with_a_warning():
    url = closed_port_url()
    environ = {"WANDB_API_KEY": "fake", "WANDB_BASE_URL": url}
    assert resolve_wandb_mode(environ) == "online"  # credentials alone say online ...
    with pytest.warns(UserWarning, match=f"{url} is not reachable .* offline"):
        assert choose_wandb_mode(environ, timeout=2.0) == "offline"  # ... the probe says the host is not there


def test_a_reachable_host_keeps_online(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert wandb_reachable(url, timeout=2.0)
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1:{server.getsockname()[1]} login user password secret\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert choose_wandb_mode({"NETRC": str(netrc), "WANDB_BASE_URL": url}, timeout=2.0) == "online"


def test_the_probe_gives_up_after_its_timeout(monkeypatch):
    """A host that never answers (packets dropped, DNS hanging): the probe returns False while the connection
    attempt is still pending, so training never waits for it."""
    release, finished = threading.Event(), threading.Event()

    def hanging_connection(*args, **kwargs):
        release.wait(10)
        finished.set()
        raise OSError("gave up")

    monkeypatch.setattr(align.cli.socket, "create_connection", hanging_connection)
    assert not wandb_reachable("https://wandb.invalid", timeout=0.2)
    assert not finished.is_set()  # returned before the connection attempt ended
    release.set()


def test_base_url_is_read_from_wandb_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert wandb_base_url({"WANDB_BASE_URL": "http://127.0.0.1:7"}) == "http://127.0.0.1:7"
    (tmp_path / "settings").write_text("[default]\nbase_url = http://127.0.0.1:8\n")
    assert wandb_base_url({"WANDB_CONFIG_DIR": str(tmp_path)}) == "http://127.0.0.1:8"
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert wandb_base_url() == "http://127.0.0.1:8"  # os.environ by default


def test_fit_with_credentials_and_no_network_trains_offline(tmp_path, monkeypatch, tiny):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-for-a-test")
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    args = ["fit", "--config", BASELINE, *tiny, "--run.root", str(tmp_path), "--run.version", "v"]
    args = [arg for arg in args if arg != "--trainer.logger=false"]  # the default WandbLogger
    with pytest.warns(UserWarning, match="is not reachable"):
        cli = main([*args, "--run.test_after_fit=false"])
    assert cli.trainer.current_epoch == 1
    assert list((tmp_path / "baseline_cnn" / "v" / "wandb").glob("offline-run-*"))


def test_fit_with_an_empty_wandb_mode_runs(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    args = ["fit", "--config", BASELINE, *tiny, "--run.root", str(tmp_path), "--run.version", "v"]
    args = [arg for arg in args if arg != "--trainer.logger=false"]
    cli = main([*args, "--run.test_after_fit=false"])
    assert cli.trainer.current_epoch == 1
    assert list((tmp_path / "baseline_cnn" / "v" / "wandb").glob("offline-run-*"))


# ----------------------------------------------------------------------------------------------- run directories
def test_claim_run_dir_is_atomic_under_concurrency(tmp_path):
    names: list[str] = []
    barrier = threading.Barrier(8)

    def claim():
        barrier.wait()
        names.append(claim_run_dir(tmp_path / "exp", "20260101-000000"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(names)) == 8
    assert set(names) == {"20260101-000000"} | {f"20260101-000000-{i}" for i in range(1, 8)}
    assert all((tmp_path / "exp" / name).is_dir() for name in names)


def test_two_fits_started_in_the_same_second_get_two_run_directories(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(align.cli.time, "strftime", lambda *args: "20260101-000000")
    args = ["fit", "--config", BASELINE, *tiny, "--run.root", str(tmp_path), "--run.test_after_fit=false"]
    first, second = main(args), main([*args, "--trainer.max_epochs=2"])
    runs = tmp_path / "baseline_cnn"
    assert sorted(path.name for path in runs.iterdir()) == ["20260101-000000", "20260101-000000-1"]
    assert first.trainer.default_root_dir != second.trainer.default_root_dir
    for name, epochs in (("20260101-000000", 1), ("20260101-000000-1", 2)):
        assert f"max_epochs: {epochs}" in (runs / name / "config.yaml").read_text()  # nothing overwritten
        assert (runs / name / "checkpoints" / "last.ckpt").is_file()


# ----------------------------------------------------------------------------------------------- --ckpt_path
def test_model_overrides_replaced_by_the_checkpoint_are_named(checkpoint, tmp_path, tiny):
    args = ["test", "--config", BASELINE, *tiny, "--run.root", str(tmp_path), "--ckpt_path", str(checkpoint)]
    expected = r"model\.init_args\.harmonization_weight: asked 0\.7, the checkpoint's 0\.3 is used"
    with pytest.warns(UserWarning, match=expected) as caught:
        cli = main([*args, "--model.init_args.harmonization_weight=0.7"])
    assert cli.model.harmonization_weight == 0.3  # the documented rule: the checkpoint wins
    assert str(checkpoint) in str([w.message for w in caught if "asked 0.7" in str(w.message)][0])
    with warnings.catch_warnings(record=True) as quiet:  # nothing to report when nothing differs
        warnings.simplefilter("always")
        main([*args, "--model.init_args.harmonization_weight=0.3"])
    assert not [w for w in quiet if "the checkpoint's" in str(w.message)]


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "missing"])
def test_a_corrupt_checkpoint_is_named(checkpoint, tmp_path, tiny, damage):
    bad = tmp_path / f"{damage}.ckpt"
    data = checkpoint.read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    args = ["test", "--config", BASELINE, *tiny, "--run.root", str(tmp_path), "--ckpt_path", str(bad)]
    with pytest.raises((ValueError, FileNotFoundError), match=str(bad)):
        main(args)


def test_a_checkpoint_with_nan_weights_stops_the_fit(checkpoint, tmp_path, tiny):
    state = torch.load(checkpoint, weights_only=True)
    name = next(key for key in state["state_dict"] if key.endswith("head.weight"))
    state["state_dict"][name][0, 0] = float("nan")
    state["epoch"], state["global_step"] = 0, 0
    broken = tmp_path / "nan.ckpt"
    torch.save(state, broken)
    args = ["fit", "--config", BASELINE, *tiny, "--run.root", str(tmp_path), "--run.version", "nan",
            "--ckpt_path", str(broken), "--trainer.max_epochs=3", "--run.test_after_fit=false"]
    with pytest.raises(FloatingPointError, match=r"NaN or inf .*step \d+.*head\.weight"):
        main(args)
    assert not list((tmp_path / "baseline_cnn" / "nan").glob("checkpoints/*.ckpt"))  # no "best" checkpoint kept


# ----------------------------------------------------------------------------------------------- test after fit
def clickme_folder(root: Path, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for split, count in (("train", 8), ("val", 4)):
        lines = ["image,heatmap,label"]
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img/{split}{i}.png")
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / f"img/{split}{i}_m.png")
            lines.append(f"img/{split}{i}.png,img/{split}{i}_m.png,{i % 4}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_clickme_folder_without_test_csv_skips_the_test_after_fit(tmp_path, caplog):
    folder = clickme_folder(tmp_path / "clickme")
    args = [
        "fit", "--config", BASELINE, "--run.root", str(tmp_path / "runs"), "--run.test_after_fit=true",
        "--data=datamodules.ClickMeFolderDataModule", f"--data.root={folder}", "--data.image_size=16",
        "--data.batch_size=4", "--data.num_workers=0", "--data.num_classes=4", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1", "--trainer.logger=false",
        "--trainer.callbacks=[]",
    ]
    with caplog.at_level("INFO"):
        cli = main(args)
    assert cli.trainer.current_epoch == 1
    assert "has no test split" in caplog.text
    assert not [key for key in cli.trainer.callback_metrics if key.startswith("test")]
    (folder / "test.csv").write_text((folder / "val.csv").read_text())  # with a test split, it is tested
    cli = main(args)
    assert any(key.startswith("test/") for key in cli.trainer.callback_metrics)
