"""ExplanationDrift: scipy Spearman per image, references across evaluations, state_dict resume, merging and a
2-process gloo run with uneven (and empty) shards."""

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from explain.metrics import ExplanationDrift

N, H, W = 6, 7, 7


def evaluate(metric: ExplanationDrift, maps: torch.Tensor, ids: torch.Tensor, chunks=(4,)):
    """One evaluation: updates over shuffled batches, compute, per-image values, reset."""
    order = torch.randperm(len(ids))
    for part in order.split(list(chunks) + [len(ids) - sum(chunks)]):
        if len(part):
            metric.update(maps=maps[part], ids=ids[part])
    means, per_image = metric.compute(), metric.compute_per_image()
    metric.reset()
    return means, per_image


def scipy_rho(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([spearmanr(x.flatten(), y.flatten())[0] for x, y in zip(a.numpy(), b.numpy())])


@pytest.fixture
def history():
    """Maps of the monitor set at four evaluations, with ties, drifting away from the first."""
    first = torch.rand(N, H, W)
    second = first + 0.3 * torch.rand(N, H, W)
    third = (second + 0.6 * torch.rand(N, H, W)).mul(4).round()
    return [first, second, third, third + torch.rand(N, H, W)]


def test_first_evaluation_has_no_reference_and_unchanged_maps_give_one(history):
    ids = torch.arange(10, 10 + N)
    metric = ExplanationDrift()
    means, per_image = evaluate(metric, history[0], ids)
    assert means == {}
    assert torch.equal(per_image["ids"], ids)
    assert per_image["vs_previous"].isnan().all() and per_image["vs_first"].isnan().all()
    means, per_image = evaluate(metric, history[0], ids)
    assert means["vs_previous"].item() == pytest.approx(1.0) and means["vs_first"].item() == pytest.approx(1.0)
    assert metric.name == "drift" and ExplanationDrift.requires == ("maps", "ids")


def test_changed_maps_match_scipy_against_previous_and_first(history):
    ids = torch.tensor([7, 3, 11, 0, 5, 2])
    metric = ExplanationDrift()
    for maps in history[:3]:
        means, per_image = evaluate(metric, maps, ids, chunks=(2, 3))
    order = ids.argsort()
    assert torch.equal(per_image["ids"], ids[order])
    vs_previous = scipy_rho(history[2][order], history[1][order])
    vs_first = scipy_rho(history[2][order], history[0][order])
    np.testing.assert_allclose(per_image["vs_previous"].numpy(), vs_previous, atol=1e-6)
    np.testing.assert_allclose(per_image["vs_first"].numpy(), vs_first, atol=1e-6)
    assert means["vs_previous"].item() == pytest.approx(vs_previous.mean(), abs=1e-6)
    assert means["vs_first"].item() == pytest.approx(vs_first.mean(), abs=1e-6)


def test_new_ids_and_repeated_ids(history):
    metric = ExplanationDrift()
    evaluate(metric, history[0][:4], torch.arange(4))
    # ids 4 and 5 appear at the second evaluation; id 1 is repeated (as a DistributedSampler pads)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 1])
    maps = torch.cat([history[1], history[1][1:2]])
    means, per_image = evaluate(metric, maps, ids, chunks=(3,))
    assert torch.equal(per_image["ids"], torch.arange(6))
    assert per_image["vs_previous"][4:].isnan().all()
    expected = scipy_rho(history[1][:4], history[0][:4])
    np.testing.assert_allclose(per_image["vs_previous"][:4].numpy(), expected, atol=1e-6)
    assert means["vs_previous"].item() == pytest.approx(expected.mean(), abs=1e-6)
    # third evaluation: the first maps of ids 4 and 5 are those of the second evaluation
    means, per_image = evaluate(metric, history[2], torch.arange(6))
    np.testing.assert_allclose(
        per_image["vs_first"].numpy(),
        scipy_rho(history[2], torch.cat([history[0][:4], history[1][4:]])),
        atol=1e-6,
    )


def test_state_dict_round_trip_resumes_the_same_drift(history):
    ids = torch.arange(N)
    uninterrupted = ExplanationDrift()
    for maps in history[:2]:
        evaluate(uninterrupted, maps, ids)
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = ExplanationDrift()
    resumed.load_state_dict(torch.load(buffer))
    expected_means, expected = evaluate(uninterrupted, history[2], ids)
    means, per_image = evaluate(resumed, history[2], ids)
    assert means.keys() == expected_means.keys() == {"vs_previous", "vs_first"}
    for key in ("ids", "vs_previous", "vs_first"):
        torch.testing.assert_close(per_image[key], expected[key])
    # a fresh metric without the references would see a first evaluation
    assert evaluate(ExplanationDrift(), history[2], ids)[0] == {}
    with pytest.raises(ValueError, match="keys"):
        resumed.set_extra_state({"first_ids": None})


def test_merged_halves_equal_single_instance_and_inference_mode(history):
    ids = torch.arange(N)
    whole, first, second = ExplanationDrift(), ExplanationDrift(), ExplanationDrift()
    for maps in history:
        with torch.inference_mode():
            whole.update(maps=maps, ids=ids)
            first.update(maps=maps[:2], ids=ids[:2])
            second.update(maps=maps[2:], ids=ids[2:])
        first.merge_state(second)
        expected = whole.compute_per_image()
        result = first.compute_per_image()
        for key in ("ids", "vs_previous", "vs_first"):
            torch.testing.assert_close(result[key], expected[key], equal_nan=True)
        for metric in (whole, first, second):
            metric.reset()
    np.testing.assert_allclose(expected["vs_first"].numpy(), scipy_rho(history[-1], history[0]), atol=1e-6)


def test_reset_without_compute_still_advances_references(history):
    metric = ExplanationDrift()
    metric.update(maps=history[0], ids=torch.arange(N))
    metric.reset()  # no compute: the evaluation still becomes the reference
    metric.update(maps=history[0], ids=torch.arange(N))
    assert metric.compute()["vs_previous"].item() == pytest.approx(1.0)


def test_bad_use_is_reported(history):
    metric = ExplanationDrift()
    with pytest.raises(TypeError, match="update"):
        metric(maps=history[0], ids=torch.arange(N))
    with pytest.raises(ValueError, match="ids must be integer"):
        metric.update(maps=history[0], ids=torch.arange(N).float())
    metric.update(maps=history[0], ids=torch.arange(N))
    with pytest.raises(ValueError, match="earlier maps"):
        metric.update(maps=torch.rand(2, 5, 5), ids=torch.arange(2))
    metric.reset()
    metric.update(maps=torch.rand(2, 5, 5), ids=torch.arange(2))
    with pytest.raises(ValueError, match="same resolution"):
        metric.compute()


WORKER = """
import sys, torch, torch.distributed as dist
from explain.metrics import ExplanationDrift
rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
history = torch.load(out + "/history.pt")
shards = [{0: [0, 1, 2, 3], 1: [4, 5]}, {0: [0, 1, 2, 3, 4, 5], 1: []}, {0: [5, 0], 1: [1, 2, 3, 4, 1]},
          {0: [], 1: [5, 4, 3, 2, 1, 0]}]
metric, results = ExplanationDrift(), []
for evaluation, (maps, shard) in enumerate(zip(history, shards)):
    ids = torch.tensor(shard[rank], dtype=torch.long)
    if len(ids):
        metric.update(maps=maps[ids], ids=ids)
    if evaluation != 1:  # evaluation 1 is never computed: reset() must still gather it on both ranks
        results.append((metric.compute(), metric.compute_per_image()))
    metric.reset()
torch.save(results, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_process_gloo_run_equals_single_process(history, tmp_path):
    torch.save(history, tmp_path / "history.pt")
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    store = tmp_path / "store"
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(store), str(tmp_path)], stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err.decode()[-3000:]
    single = ExplanationDrift()
    expected = [evaluate(single, maps, torch.arange(N)) for maps in history]
    del expected[1]
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(results) == len(expected) == 3
        for (means, per_image), (expected_means, expected_per_image) in zip(results, expected):
            assert means.keys() == expected_means.keys()
            for key in means:
                assert means[key].item() == pytest.approx(expected_means[key].item(), abs=1e-6)
            for key in ("ids", "vs_previous", "vs_first"):
                torch.testing.assert_close(per_image[key], expected_per_image[key], equal_nan=True)
