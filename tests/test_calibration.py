"""ds2net.calibration against independent computations: torchmetrics' BinaryCalibrationError, a sort-and-split
equal-mass ECE, hand-computed bins, numpy's Brier and NLL, an exact temperature fit over every pixel, and the
library's own prediction path."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torchmetrics.classification import BinaryCalibrationError

from ds2net.calibration import (CalibrationStats, FINE_BINS, LOGIT_RANGE, calibration_stats, calibration_table,
                                equal_width_bin, fit_model_temperature, fit_temperature, reliability_diagram,
                                show_reliability, side_logits_at, temperature_nll, validation_pairs)
from ds2net.errors import ParameterError
from ds2net.data import make_synthetic, segmentation_dls, sample_image, sample_mask
from ds2net.inference import predict_probabilities
from ds2net.model import DS2Net, TINY_ENCODER

CONFIG = dict(size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

def _images(n_images=4, seed=0, scale=4., truth_temperature=2.):
    "Logit maps of different sizes and labels drawn from sigmoid(z / truth_temperature)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_images):
        z = torch.randn(40 + 7 * i, 50 - 3 * i, generator=g) * scale
        out.append((z, torch.rand(z.shape, generator=g) < torch.sigmoid(z / truth_temperature)))
    return out

@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return DS2Net(TINY_ENCODER, channels=8).eval()

@pytest.mark.parametrize('n_bins', [15, 10, 3])
def test_equal_width_ece_is_torchmetrics_fed_one_image_at_a_time(n_bins):
    stats, reference = CalibrationStats(n_bins), BinaryCalibrationError(n_bins=n_bins)
    for z, y in _images():
        stats.update(z, y)
        reference.update(torch.sigmoid(z), y.long())
    assert stats.compute()['ECE_ew'] == pytest.approx(float(reference.compute()), abs=1e-6)

def test_probability_one_has_torchmetrics_extra_bin():
    p = torch.tensor([0., 0.0666, 0.0667, 0.5, 0.9999, 1.])
    assert equal_width_bin(p).tolist() == [0, 0, 1, 7, 14, 15]
    z = torch.tensor([40., 40., -40.])  # float32 sigmoid(40) is exactly 1
    y = torch.tensor([1, 0, 0])
    s = CalibrationStats(); s.update(z, y)
    assert s.compute()['ECE_ew'] == pytest.approx(float(BinaryCalibrationError(n_bins=15)(torch.sigmoid(z), y)), abs=1e-7)

def test_hand_computed_bins():
    p = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.7, 0.7, 0.9, 0.9])
    y = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0])
    nll = -(2 * math.log(0.9) + math.log(0.3) + math.log(0.7) + 2 * math.log(0.7) + math.log(0.9) + math.log(0.1)) / 8
    for n_bins, ece in ((15, 0.25), (4, 0.25), (2, 0.05)):
        s = CalibrationStats(n_bins); s.update(torch.logit(p), y)
        got = s.compute()
        assert got['ECE_ew'] == pytest.approx(ece, abs=1e-6)
        assert got['ECE_em'] == pytest.approx(ece, abs=1e-6)
        assert got['Brier'] == pytest.approx(0.2, abs=1e-6)
        assert got['NLL'] == pytest.approx(nll, abs=1e-6)
    s = CalibrationStats(2); s.update(torch.logit(p), y)
    r = s.reliability()
    assert r.pixels.tolist() == [4, 4]
    assert r.confidence.tolist() == pytest.approx([0.2, 0.8], abs=1e-6)
    assert r.frequency.tolist() == pytest.approx([0.25, 0.75])

def test_equal_mass_ece_is_sort_and_split():
    "Distinct logits, one per fine bin: equal-mass bins are exactly the sorted pixels cut into n_bins equal runs."
    rng = np.random.default_rng(1)
    n_bins, n = 15, 15 * 400
    width = 2 * LOGIT_RANGE / FINE_BINS
    centres = -LOGIT_RANGE + width * (rng.choice(FINE_BINS, n, replace=False) + 0.5)
    z = torch.tensor(centres, dtype=torch.float32)
    y = torch.rand(n, generator=torch.Generator().manual_seed(2)) < torch.sigmoid(z / 3)
    s = CalibrationStats(n_bins)
    for part in torch.tensor_split(torch.randperm(n, generator=torch.Generator().manual_seed(3)), 5):  # any order
        s.update(z[part], y[part])
    p = torch.sigmoid(z).double().numpy(); t = y.numpy().astype(float)
    order = np.argsort(p)
    expected = sum(abs((t[g] - p[g]).sum()) for g in np.array_split(order, n_bins)) / n
    assert s.compute()['ECE_em'] == pytest.approx(expected, abs=1e-9)
    assert s.reliability(mass=True).pixels.tolist() == [n // n_bins] * n_bins

def test_brier_and_nll_are_the_direct_means_also_with_a_temperature():
    pairs = _images(3, seed=4)
    z = np.concatenate([a.numpy().ravel() for a, _ in pairs]).astype(np.float64)
    y = np.concatenate([b.numpy().ravel() for _, b in pairs]).astype(np.float64)
    for T in (1.0, 0.4, 2.5):
        s = CalibrationStats(temperature=T)
        for a, b in pairs: s.update(a, b)
        p = 1 / (1 + np.exp(-z.astype(np.float32) / np.float32(T)).astype(np.float64))
        nll = np.mean(np.logaddexp(0, -z / T) * y + np.logaddexp(0, z / T) * (1 - y))
        got = s.compute()
        assert got['Brier'] == pytest.approx(np.mean((p - y)**2), rel=1e-6)
        assert got['NLL'] == pytest.approx(nll, rel=1e-5)
        assert s.pixels == len(z)

def test_image_by_image_equals_all_at_once_and_memory_is_flat():
    pairs = _images(6, seed=5)
    one_by_one, at_once = CalibrationStats(), CalibrationStats()
    for z, y in pairs: one_by_one.update(z, y)
    at_once.update(torch.cat([z.flatten() for z, _ in pairs]), torch.cat([y.flatten() for _, y in pairs]))
    assert one_by_one.compute() == pytest.approx(at_once.compute(), rel=1e-12)
    size = lambda m: sum(v.numel() for v in m.metric_state.values())
    fresh = CalibrationStats()
    assert size(one_by_one) == size(fresh)  # the state does not grow with the pixels added
    one_by_one.reset()
    assert one_by_one.pixels == 0

@pytest.mark.parametrize('true_t', [0.5, 2.5])
def test_fitted_temperature_recovers_a_known_one(true_t):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1000, 1000, generator=g) * 4
    y = torch.rand(z.shape, generator=g) < torch.sigmoid(z / true_t)
    s = CalibrationStats(); s.update(z, y)
    t = fit_temperature(s)
    assert t == pytest.approx(true_t, rel=0.02)
    zd, yd = z.double().flatten(), y.double().flatten()
    exact = minimize_scalar(lambda lt: float(F.binary_cross_entropy_with_logits(zd / math.exp(lt), yd)),
                            bounds=(math.log(0.05), math.log(20)), method='bounded', options=dict(xatol=1e-8))
    assert t == pytest.approx(math.exp(exact.x), rel=1e-4)
    assert temperature_nll(s, t) == pytest.approx(float(F.binary_cross_entropy_with_logits(zd / t, yd)), rel=1e-5)

def test_a_temperature_leaves_dice_at_half_unchanged(net):
    images, masks = make_synthetic('polyp', 4, size=72, seed=7)
    logits = [l.sum(0) for l in side_logits_at(net, images, CONFIG)]
    dice = lambda prob, gt: 2 * (prob & gt).sum() / max(prob.sum() + gt.sum(), 1)
    for T in (0.3, 1.7, 5.0):
        for z, m in zip(logits, masks):
            before, after = torch.sigmoid(z).numpy() >= 0.5, torch.sigmoid(z / T).numpy() >= 0.5
            assert dice(after, m > 0) == pytest.approx(dice(before, m > 0), abs=1e-6)

def test_calibration_stats_of_a_network(net):
    images, masks = make_synthetic('polyp', 3, size=80, seed=8)
    images, masks = [images[0], images[1][:72], images[2][:, :56]], [masks[0], masks[1][:72], masks[2][:, :56]]
    net.train()
    stats = calibration_stats(net, zip(images, masks), CONFIG, temperature=1.5, bs=2)
    assert net.training  # the network's mode is left as it was
    net.eval()
    table = calibration_table(stats)
    assert list(table.index) == ['fused', 'd1', 'd2', 'd3', 's1', 's2', 's3', 'fused, T = 1.5']
    assert list(table.columns) == ['ECE_ew', 'ECE_em', 'Brier', 'NLL', 'pixels']
    assert table.pixels.tolist() == [80 * 80 + 72 * 80 + 80 * 56] * 8
    probs = predict_probabilities(net, images, CONFIG)  # the library's prediction path, independently
    p = np.concatenate([q.ravel() for q in probs]).astype(np.float64)
    y = np.concatenate([m.ravel() > 0 for m in masks]).astype(np.float64)
    assert table.loc['fused', 'Brier'] == pytest.approx(np.mean((p - y)**2), rel=1e-5)
    ref = BinaryCalibrationError(n_bins=15)(torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(y).long())
    assert table.loc['fused', 'ECE_ew'] == pytest.approx(float(ref), abs=1e-5)
    assert table.loc['fused, T = 1.5', 'NLL'] != table.loc['fused', 'NLL']

def test_side_logits_keep_each_image_size(net):
    images, _ = make_synthetic('polyp', 2, size=80, seed=9)
    out = list(side_logits_at(net, [images[0], images[1][:50, :70]], CONFIG, bs=1))
    assert [tuple(o.shape) for o in out] == [(6, 80, 80), (6, 50, 70)]
    assert all(o.dtype == torch.float32 and o.device.type == 'cpu' for o in out)

def test_temperature_fitted_on_the_validation_split(net):
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=20, seed=0, device='cpu')
    pairs = list(validation_pairs(dls))
    assert len(pairs) == len(dls.valid_ds)
    for (im, m), s in zip(pairs, dls.valid_ds.items):
        assert np.array_equal(im, sample_image(s)) and np.array_equal(m, sample_mask(s))
    with pytest.warns(UserWarning, match=r'the fitted temperature 20 lies at an end of the interval searched, \(0.05, 20.0\)'):
        t = fit_model_temperature(net, pairs, CONFIG)  # an untrained network is best off saying 0.5 everywhere: T → ∞
    stats = calibration_stats(net, pairs, CONFIG, sides=False)['fused']
    assert t == pytest.approx(fit_temperature(stats, bounds=(0.05, 20.)))
    assert temperature_nll(stats, t) < temperature_nll(stats, 1.)

def test_bad_input_is_refused_with_what_to_do():
    s = CalibrationStats()
    with pytest.raises(ValueError, match=r'logits of shape \(4, 4\) and target of shape \(4, 5\) differ: give both at the ground truth'):
        s.update(torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match='logits hold NaN or infinite values'):
        s.update(torch.tensor([0., float('inf')]), torch.zeros(2))
    assert s.pixels == 0  # nothing was added
    with pytest.raises(ValueError, match=r'no pixels yet: `update` with at least one image first'):
        s.compute()
    with pytest.raises(ParameterError, match=r'^temperature=0: use a positive number \(1 leaves the logits as they are\)$') as e:
        CalibrationStats(temperature=0)
    assert e.value.param == 'temperature'
    with pytest.raises(ParameterError, match=r'^n_bins=0: use a whole number of bins, at least 1 \(15 is usual\)$'):
        CalibrationStats(n_bins=0)
    s.update(torch.full((3,), -5.), torch.zeros(3))
    with pytest.raises(ValueError, match='needs foreground and background pixels; the validation images hold 0 foreground and 3 background'):
        fit_temperature(s)

def test_reliability_figure(tmp_path):
    a, b = CalibrationStats(), CalibrationStats(temperature=2.)
    for z, y in _images(): a.update(z, y); b.update(z, y)
    fig = show_reliability({'raw': a, 'T = 2': b})
    axs = fig.axes
    assert [ax.get_title() for ax in axs] == ['equal-width bins', 'equal-mass bins']
    labels = [t.get_text() for t in axs[0].get_legend().get_texts()]
    assert labels == ['calibrated', f"raw: ECE_ew {a.compute()['ECE_ew']:.3f}", f"T = 2: ECE_ew {b.compute()['ECE_ew']:.3f}"]
    x, yv = axs[1].lines[1].get_data()  # the first curve of the equal-mass panel is the reliability table
    r = a.reliability(mass=True)
    assert np.allclose(x, r.confidence) and np.allclose(yv, r.frequency)
    fig.savefig(tmp_path/'reliability.png')
    assert (tmp_path/'reliability.png').stat().st_size > 10_000
    ax = reliability_diagram({'raw': a}, mass=True)
    assert ax.get_xlim() == (0, 1)
