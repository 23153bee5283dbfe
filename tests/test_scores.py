"""Per-image Dice and IoU: the one formula, fastai's metrics built on it, and the Dice of a map at a threshold."""
import numpy as np
import pytest, torch

from ds2net.scores import MeanDice, MeanIoU, dice_at, overlap_scores, per_image_scores


def test_per_image_scores():
    logits = torch.tensor([[[[3., 3.], [-3., -3.]]], [[[-1., -1.], [-1., -1.]]], [[[1., -1.], [-1., -1.]]]])
    mask = torch.tensor([[[1, 1], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]])
    dice, iou = per_image_scores(logits, mask)
    torch.testing.assert_close(dice, torch.tensor([0.8, 1., 0.]))
    torch.testing.assert_close(iou, torch.tensor([2 / 3, 1., 0.]))


def test_mean_dice_is_per_image_and_dice_at_uses_the_threshold():
    from types import SimpleNamespace
    truth = torch.zeros(2, 16, 16); truth[0, 2:14, 2:14] = 1; truth[1, 7:9, 7:9] = 1
    logits = torch.where(truth.bool(), 4., -4.)[:, None]; logits[1] = -4.   # the small lesion missed
    for metric, expected in ((MeanDice(), 0.5), (MeanIoU(), 0.5)):
        metric.reset()
        metric.accumulate(SimpleNamespace(pred=(logits, torch.zeros_like(logits)), yb=(truth,)))  # side outputs are fused
        assert metric.value == pytest.approx(expected)
    assert (MeanDice().name, MeanIoU().name) == ('dice', 'iou')
    prob = np.array([[0.2, 0.5], [0.7, 0.9]]); gt = np.array([[0, 1], [1, 0]])
    assert dice_at(prob, gt) == pytest.approx(2 * 2 / (3 + 2))    # p >= 0.5: three pixels, two of them true
    assert dice_at(prob, gt, 0.8) == pytest.approx(0.0) and dice_at(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    d, i = overlap_scores(torch.tensor([[True, False]]), torch.tensor([[True, True]]))
    assert (d.item(), i.item()) == pytest.approx((2 / 3, 1 / 2))
