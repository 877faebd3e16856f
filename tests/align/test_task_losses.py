"""Task losses take class indices; the torchlip ones get one-hot targets inside."""

import pytest
import torch
import torch.nn.functional as F
from deel import torchlip

from align.losses import TaskLoss, task_loss


@pytest.fixture
def logits_labels():
    return torch.randn(10, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 1])


def test_ce_has_label_smoothing_01(logits_labels):
    logits, labels = logits_labels
    torch.testing.assert_close(TaskLoss("ce")(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    smoothed = torch.full((10, 4), 0.1 / 4).scatter(1, labels[:, None], 0.9 + 0.1 / 4)
    by_hand = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(TaskLoss("ce")(logits, labels), by_hand)


def test_tau_ce_is_ce_of_scaled_logits_over_tau(logits_labels):
    logits, labels = logits_labels
    expected = F.cross_entropy(5.0 * logits, labels) / 5.0
    torch.testing.assert_close(TaskLoss("tau_ce", tau=5.0)(logits, labels), expected)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("hkr", lambda: torchlip.HKRMulticlassLoss(alpha=0.9, min_margin=0.5)),
        ("softhkr", lambda: torchlip.SoftHKRMulticlassLoss(alpha=0.9, min_margin=0.5)),
    ],
)
def test_torchlip_losses_get_one_hot_targets(logits_labels, name, reference):
    logits, labels = logits_labels
    ours = TaskLoss(name, alpha=0.9, min_margin=0.5)(logits, labels)
    torch.testing.assert_close(ours, reference()(logits, F.one_hot(labels, 4).float()))
    assert task_loss(name, logits, labels, alpha=0.9, min_margin=0.5).item() == pytest.approx(ours.item())


def test_softhkr_running_mean_moves_in_training_only(logits_labels):
    logits, labels = logits_labels
    loss = TaskLoss("softhkr")
    before = loss.loss.current_mean.clone()
    loss.eval()(10 * logits, labels)
    torch.testing.assert_close(loss.loss.current_mean, before)
    loss.train()(10 * logits, labels)
    assert not torch.equal(loss.loss.current_mean, before)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown task loss 'mse'"):
        TaskLoss("mse")
    with pytest.raises(TypeError, match="bad options"):
        TaskLoss("ce", temperature=2.0)
    with pytest.raises(ValueError, match="logits must be"):
        TaskLoss("ce")(torch.randn(4), torch.zeros(4, dtype=torch.long))
