"""ds2net.uncertainty: transforms inverted exactly, MC dropout that samples only the SEMs' Dropout2d and leaves the
network as it was, the side outputs' variance against numpy, and the error-detection numbers against scikit-learn,
a plain sort and scipy over every pixel."""
import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from ds2net.data import make_synthetic
from ds2net.errors import ParameterError
from ds2net.inference import prepare_images
from ds2net.model import DS2Net, TINY_ENCODER, fuse_side_outputs
from ds2net.uncertainty import (FLIPS, N_SCORE_BINS, SCALES, SIGNALS, ErrorHistogram, Flip, Rescale, _at_size, bin_floor,
                                dropout_sampling, error_detection, image_scores, mc_dropout_probabilities,
                                mean_and_variance, side_output_disagreement, tta_probabilities,
                                score_bin, uncertainty_maps)

CONFIG = dict(size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

@pytest.fixture
def net():
    torch.manual_seed(0)
    return DS2Net(TINY_ENCODER, channels=8).eval()

@pytest.mark.parametrize('shape', [(2, 3, 64, 96), (1, 1, 33, 17)])
def test_each_flip_is_inverted_exactly(shape):
    x = torch.randn(*shape)
    for t in FLIPS:
        assert torch.equal(t.invert(t(x)), x)
    assert torch.equal(Flip((-1,))(x), x.flip(-1)) and not torch.equal(Flip((-1,))(x), x)
    assert torch.equal(Flip((-2, -1))(x), torch.rot90(x, 2, (-2, -1)))  # both flips: a half turn

def test_rescale_sizes_and_inverse():
    x = torch.randn(1, 3, 64, 96)
    assert [tuple(t(x).shape[-2:]) for t in SCALES] == [(64, 64), (64, 128)]  # sides rounded to multiples of 32 (80 → 64)
    assert tuple(Rescale(2.0)(x).shape[-2:]) == (128, 192)
    for t in SCALES + (Rescale(2.0),):
        assert t.invert(t(x), (64, 96)).shape == x.shape
    c = torch.full((1, 1, 64, 96), 0.3)  # a constant map comes back exactly
    for t in SCALES: assert torch.allclose(t.invert(t(c), (64, 96)), c, atol=1e-7)

def test_tta_of_a_pointwise_network_has_zero_variance():
    "A 1×1 convolution answers the same however the image is mirrored: only exact inverses make all four agree."
    torch.manual_seed(1)
    pointwise = nn.Conv2d(3, 1, 1)
    x = torch.randn(2, 3, 64, 96)
    samples = tta_probabilities(pointwise, x)
    assert samples.shape == (4, 2, 1, 64, 96)
    mean, var = mean_and_variance(samples)
    assert var.abs().max().item() == 0
    assert torch.allclose(mean, torch.sigmoid(pointwise(x)), atol=1e-6)
    not_inverted = torch.stack([torch.sigmoid(pointwise(t(x))) for t in FLIPS])
    assert mean_and_variance(not_inverted)[1].max() > 1e-3

def test_tta_of_ds2net_uses_all_transforms(net):
    x = prepare_images(list(make_synthetic('polyp', 2, size=64, seed=2)[0]), 64, CONFIG['mean'], CONFIG['std'])
    plain = torch.sigmoid(fuse_side_outputs(net(x)))
    samples = tta_probabilities(net, x, FLIPS + SCALES)
    assert samples.shape == (6, 2, 1, 64, 64)
    assert torch.allclose(samples[0], plain, atol=1e-6)  # the identity first
    lr = torch.sigmoid(fuse_side_outputs(net(x.flip(-1)))).flip(-1)
    assert torch.allclose(samples[1], lr, atol=1e-6)

def test_mean_and_variance_are_numpy_s():
    s = torch.randn(5, 2, 1, 4, 4)
    mean, var = mean_and_variance(s)
    assert np.allclose(mean.numpy(), s.numpy().mean(0), atol=1e-6)
    assert np.allclose(var.numpy(), s.numpy().var(0), atol=1e-6)

def test_mc_dropout_samples_only_the_sems_dropout(net):
    with dropout_sampling(net) as layers:
        sampling = sorted(n for n, m in net.named_modules() if m.training)
        assert len(layers) == 3
    assert sampling == [f'semantic_path.{k}.spatial_dropout' for k in range(3)]
    assert not any(m.training for m in net.modules())

def test_mc_dropout_leaves_running_statistics_modes_and_random_state_alone(net):
    x = torch.randn(2, 3, 64, 64)
    net.train(); net.detail_path.eval(); net.heads[2].eval()  # a mixed state
    modes = {n: m.training for n, m in net.named_modules()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    assert any(isinstance(m, nn.BatchNorm2d) and m.training for m in net.modules())  # BN would update in train mode
    rng = torch.get_rng_state()
    samples = mc_dropout_probabilities(net, x, n=6, seed=3)
    assert samples.shape == (6, 2, 1, 64, 64)
    assert not all(torch.equal(s, samples[0]) for s in samples[1:])
    assert {n: m.training for n, m in net.named_modules()} == modes
    for n, b in net.named_buffers(): assert torch.equal(b, buffers[n]), n
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(mc_dropout_probabilities(net, x, n=6, seed=3), samples)  # the seed decides the draws
    alone = mc_dropout_probabilities(net, x[1:], n=6, seed=3)  # an image's samples do not depend on its batch
    assert torch.allclose(alone[:, 0], samples[:, 1], atol=1e-6)

def test_modes_come_back_after_an_error_inside(net):
    net.train()
    with pytest.raises(RuntimeError):
        with dropout_sampling(net): raise RuntimeError('boom')
    assert all(m.training for m in net.modules())

def test_mc_dropout_has_at_most_eight_outcomes_per_image(net):
    "Each SEM's Dropout2d drops or doubles a one-channel map: 2³ networks per image."
    passes = mc_dropout_probabilities(net, torch.randn(1, 3, 64, 64), n=64, seed=4)
    distinct = torch.unique(passes.flatten(1), dim=0)  # the same dropout draw gives the same bits
    assert 2 <= len(distinct) <= 8

def test_mc_dropout_refusals(net):
    with pytest.raises(ValueError, match='^Conv2d has no Dropout2d layer, so MC dropout has nothing to sample'):
        mc_dropout_probabilities(nn.Conv2d(3, 1, 1), torch.randn(1, 3, 8, 8))
    with pytest.raises(ParameterError, match=r'^n=1: use a whole number of passes, at least 2$'):
        mc_dropout_probabilities(net, torch.randn(1, 3, 64, 64), n=1)

def test_side_output_disagreement_is_numpy_variance():
    side = tuple(torch.randn(2, 1, 8, 8) * 3 for _ in range(6))
    expected = np.stack([1 / (1 + np.exp(-s.numpy().astype(np.float64))) for s in side]).var(0)
    assert np.allclose(side_output_disagreement(side).numpy(), expected, atol=1e-6)
    split = [torch.full((1, 1, 2, 2), v) for v in (-50., 50.) * 3]
    assert torch.allclose(side_output_disagreement(split), torch.full((1, 1, 2, 2), 0.25))
    assert side_output_disagreement([torch.full((1, 1, 2, 2), 1.3)] * 6).abs().max() < 1e-12

def test_fused_uncertainty_is_the_loss_formula():
    "image_scores' fused uncertainty is 1 - |p - 0.5| / 0.5 of sigmoid(logits), written out here by hand."
    logits = torch.tensor([[-30., -2.1972246], [0., 1.0986123]])  # p = 0, 0.1, 0.5, 0.75
    got = image_scores({'logits': logits})['fused uncertainty']
    assert torch.allclose(got, torch.tensor([[0., 0.2], [1., 0.5]]), atol=1e-6)

def test_uncertainty_maps_keep_the_mode(net):
    net.train()
    x = torch.randn(2, 3, 64, 64)
    maps = uncertainty_maps(net, x, mc_samples=3)
    assert list(maps) == ['logits', 'TTA variance', 'MC-dropout variance', 'side-output disagreement']
    assert all(v.shape == (2, 1, 64, 64) for v in maps.values())
    assert net.training
    assert torch.allclose(maps['logits'], fuse_side_outputs(net.eval()(x)), atol=1e-6)
    assert all(float(maps[k].min()) >= 0 and float(maps[k].max()) <= 0.25 for k in SIGNALS[1:])

def test_auroc_and_error_share_against_sklearn_and_a_sort():
    rng = np.random.default_rng(0)
    floors = bin_floor(torch.arange(0, N_SCORE_BINS, 16)).numpy()
    k = rng.integers(0, len(floors), 30_000)  # scores on the bins' floors, with many ties
    score, wrong = floors[k], rng.random(30_000) < 0.05 + 0.4 * k / len(floors)
    h = ErrorHistogram()
    for part in np.array_split(np.arange(30_000), 4): h.update(torch.as_tensor(score[part]), torch.as_tensor(wrong[part]))
    assert h.auroc() == pytest.approx(roc_auc_score(wrong, score), abs=1e-12)
    k = rng.permutation(len(floors))[:4000]   # distinct scores
    score, wrong = floors[k], rng.random(4000) < 0.2
    h = ErrorHistogram(); h.update(torch.as_tensor(score), torch.as_tensor(wrong))
    for top in (0.05, 0.1, 0.5):
        first = np.argsort(-score)[:int(round(top * 4000))]
        assert h.error_share(top) == pytest.approx(wrong[first].sum() / wrong.sum(), abs=1e-12)
    assert h.error_share(1.0) == pytest.approx(1.0)

def test_score_bins_sort_like_the_scores_at_every_magnitude():
    s = torch.sort(torch.cat([torch.rand(1000), 10 ** (-30 * torch.rand(1000)), torch.tensor([0., 1.])]))[0]
    k = score_bin(s)
    assert (k[1:] >= k[:-1]).all() and k[0] == 0 and k[-1] == N_SCORE_BINS - 1
    floor = bin_floor(k)
    assert torch.equal(score_bin(floor), k)
    assert ((floor <= s) & (s - floor <= s / 2048)).all()  # bins 2⁻¹¹ of their value wide

def test_auroc_of_continuous_scores_is_close_to_sklearn():
    rng = np.random.default_rng(7)
    score = np.concatenate([rng.random(20_000), 10 ** (-12 * rng.random(20_000))]).astype(np.float32)
    wrong = rng.random(40_000) < score ** 0.5 * 0.3
    h = ErrorHistogram(); h.update(torch.as_tensor(score), torch.as_tensor(wrong))
    assert h.auroc() == pytest.approx(roc_auc_score(wrong, score), abs=1e-4)

def test_hand_computed_error_detection():
    def hist(score, wrong):
        h = ErrorHistogram(); h.update(torch.tensor(score), torch.tensor(wrong)); return h
    assert hist([.1, .2, .3, .4], [False, False, True, True]).auroc() == 1
    assert hist([.1, .2, .3, .4], [False, False, True, True]).error_share(0.25) == 0.5
    assert hist([.1, .2, .3, .4], [True, True, False, False]).auroc() == 0
    assert hist([.1, .2, .3, .4], [False, True, False, True]).auroc() == 0.75
    assert hist([.3] * 4, [True, False, False, False]).auroc() == 0.5
    assert hist([.3] * 4, [True, False, False, False]).error_share(0.5) == 0.5  # a split bin counts pro rata
    assert math.isnan(hist([.1, .2], [False, False]).auroc())
    assert math.isnan(hist([.1, .2], [False, False]).error_share())
    assert math.isnan(hist([.1, .2], [True, True]).auroc())

def test_error_histogram_refusals():
    h = ErrorHistogram()
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\], got values in \[-0.1, 0.5\]'):
        h.update(torch.tensor([-0.1, 0.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r'score of shape \(2,\) and wrong of shape \(3,\) differ'):
        h.update(torch.tensor([0.1, 0.5]), torch.tensor([True, False, True]))
    assert h.counts.sum() == 0

def test_error_detection_against_every_pixel(net):
    images, masks = make_synthetic('polyp', 5, size=80, seed=5)
    images, masks = list(images[:4]) + [images[4][:72]], list(masks[:4]) + [masks[4][:72]]
    table, per_image = error_detection(net, zip(images, masks), CONFIG, mc_samples=4, bs=2)
    assert list(table.index) == [*SIGNALS, 'chance']
    assert list(table.columns) == ['AUROC', 'errors in top 5%', 'Spearman ρ', 'p-value']
    assert table.loc['chance'].tolist()[:3] == [0.5, 0.05, 0.0]
    scores, wrongs, dices = {s: [] for s in SIGNALS}, [], []
    for image, mask in zip(images, masks):  # one image at a time, every pixel kept
        x = prepare_images([image], CONFIG['size'], CONFIG['mean'], CONFIG['std'])
        one = _at_size(uncertainty_maps(net, x, mc_samples=4), 0, image.shape[:2])
        pred, gt = one['logits'].numpy() > 0, mask > 0
        wrongs.append((pred != gt).ravel())
        for k, v in image_scores(one).items(): scores[k].append(v.numpy().ravel())
        dices.append(2 * (pred & gt).sum() / (pred.sum() + gt.sum()) if pred.sum() + gt.sum() else 1.)
    wrong = np.concatenate(wrongs)
    assert per_image['wrong pixels'].tolist() == [int(w.sum()) for w in wrongs]
    assert np.allclose(per_image.dice, dices, atol=1e-6)
    for k in SIGNALS:
        s = np.concatenate(scores[k])
        assert table.loc[k, 'AUROC'] == pytest.approx(roc_auc_score(wrong, s), abs=1e-3)
        assert np.allclose(per_image[k], [v.mean() for v in scores[k]], rtol=1e-5)
        assert table.loc[k, 'Spearman ρ'] == pytest.approx(spearmanr([v.mean() for v in scores[k]], dices).statistic, abs=1e-9)
    u = np.concatenate(scores['fused uncertainty'])  # fused uncertainty has few ties: the share is that of a sort
    first = np.argsort(-u, kind='stable')[:int(round(0.05 * len(u)))]
    assert table.loc['fused uncertainty', 'errors in top 5%'] == pytest.approx(wrong[first].sum() / wrong.sum(), abs=5e-3)

def test_error_detection_refusals(net):
    pairs = list(zip(*make_synthetic('polyp', 1, size=64, seed=6)))
    with pytest.raises(ParameterError, match=r'^top=5: use a share of the pixels between 0 and 1, e.g. 0.05$'):
        error_detection(net, pairs, CONFIG, top=5)
    with pytest.raises(ParameterError, match=r'^mc_samples=1: use a whole number of passes, at least 2$'):
        error_detection(net, pairs, CONFIG, mc_samples=1)
