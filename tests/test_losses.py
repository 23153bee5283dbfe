"Losses against a direct transcription of spec section 4."
import math
import pytest, torch
from ds2net.losses import (structure_loss, uncertainty_weights, DeepSupervisionLoss, fixed_weights, DS2NET_LEVELS,
                           as_float_mask)


def spec_structure_loss(P, G):
    "Spec section 4, transcribed one image at a time with explicit loops over the 31×31 window."
    B, _, H, W = P.shape
    total = 0.0
    for b in range(B):
        g = G[b, 0].double(); p_logit = P[b, 0].double()
        padded = torch.zeros(H + 30, W + 30, dtype=torch.float64); padded[15:15 + H, 15:15 + W] = g
        avg = torch.stack([padded[i:i + H, j:j + W] for i in range(31) for j in range(31)]).sum(0) / (31 * 31)
        w = 1 + 5 * (avg - g).abs()
        bce = torch.clamp(p_logit, min=0) - p_logit * g + torch.log1p(torch.exp(-p_logit.abs()))
        wbce = (w * bce).sum() / w.sum()
        p = 1 / (1 + torch.exp(-p_logit))
        inter = (p * g * w).sum(); union = ((p + g) * w).sum()
        wiou = 1 - (inter + 1) / (union - inter + 1)
        total += wbce + wiou
    return total / B


def spec_weights(side, T=1.0):
    u = [float((1 - (torch.sigmoid(p.detach().double()) - 0.5).abs() / 0.5).mean()) for p in side]
    e = [math.exp(x / T) for x in u]
    a = [x / sum(e) for x in e]
    return [x / max(a) for x in a], u


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_structure_loss_matches_spec(seed):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(3, 1, 40, 36, generator=g) * 3
    G = (torch.rand(3, 1, 40, 36, generator=g) > 0.6).float()
    assert abs(structure_loss(P, G).item() - spec_structure_loss(P, G).item()) <= 1e-6
    # fastai's (B, H, W) integer masks give the same value
    assert abs(structure_loss(P, G[:, 0].long()).item() - structure_loss(P, G).item()) <= 1e-7


def test_structure_loss_rejects_mismatched_mask():
    with pytest.raises(ValueError, match=r'mask of shape \(2, 1, 8, 8\) does not match logits of shape \(2, 1, 9, 9\)'):
        structure_loss(torch.zeros(2, 1, 9, 9), torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize('seed,T', [(0, 1.0), (1, 1.0), (2, 0.5), (3, 3.0)])
def test_uncertainty_weights_match_spec(seed, T):
    g = torch.Generator().manual_seed(seed)
    side = [torch.randn(2, 1, 16, 16, generator=g) * s for s in (0.1, 0.5, 1, 2, 4, 10)]
    w, u = uncertainty_weights(side, temperature=T)
    sw, su = spec_weights(side, T)
    assert torch.allclose(w.double(), torch.tensor(sw, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(u.double(), torch.tensor(su, dtype=torch.float64), atol=1e-6)
    assert w.max().item() == 1.0
    if T == 1.0: assert (w >= math.exp(-1) - 1e-7).all() and (w <= 1).all()


def test_weights_bounds_at_extremes():
    sure, unsure = torch.full((1, 1, 4, 4), 50.), torch.zeros(1, 1, 4, 4)
    w, u = uncertainty_weights([sure, unsure])
    assert u.tolist() == pytest.approx([0, 1], abs=1e-6)
    assert w.tolist() == pytest.approx([math.exp(-1), 1], abs=1e-6)  # the bound e^-1 is reached


def test_total_loss_and_no_gradient_through_weights():
    torch.manual_seed(0)
    G = (torch.rand(2, 1, 32, 32) > 0.5).float()
    side = [(torch.randn(2, 1, 32, 32) * s).requires_grad_() for s in (0.3, 1, 3, 0.5, 2, 6)]
    loss_fn = DeepSupervisionLoss('uncertainty')
    total = loss_fn(side, G)
    w, _ = spec_weights(side)
    expected = sum(wn * spec_structure_loss(p.detach(), G).item() for wn, p in zip(w, side))
    assert abs(total.item() - expected) <= 1e-5
    assert not loss_fn.last_weights.requires_grad
    total.backward()
    # with the weights as constants, d total / d P_n = w_n · d L_n / d P_n
    for wn, p in zip(loss_fn.last_weights, side):
        q = p.detach().clone().requires_grad_()
        structure_loss(q, G).backward()
        torch.testing.assert_close(p.grad, wn * q.grad, rtol=1e-5, atol=1e-8)


def test_fixed_weightings():
    torch.testing.assert_close(fixed_weights('exp', DS2NET_LEVELS), torch.tensor([.25, .5, 1, .25, .5, 1]))
    torch.testing.assert_close(fixed_weights('nnunet', DS2NET_LEVELS), torch.tensor([.25, .5, 1, .25, .5, 1]) / 3.5)
    torch.testing.assert_close(fixed_weights('equal', DS2NET_LEVELS), torch.ones(6))
    G = (torch.rand(1, 1, 16, 16) > 0.5).float()
    side = [torch.randn(1, 1, 16, 16) for _ in range(6)]
    for weighting, w in [('exp', [.25, .5, 1, .25, .5, 1]), ((1, 0, 2, 0, 0, 1), [1, 0, 2, 0, 0, 1])]:
        total = DeepSupervisionLoss(weighting)(side, G)
        assert abs(total.item() - sum(wn * structure_loss(p, G).item() for wn, p in zip(w, side))) < 1e-5
    # another network: four outputs ordered from the finest, or explicit levels
    four = side[:4]
    l = DeepSupervisionLoss('exp'); l(four, G)
    assert l.last_weights.tolist() == [1, .5, .25, .125]
    l = DeepSupervisionLoss('exp', levels=(3, 2, 1, 0)); l(four, G)
    assert l.last_weights.tolist() == [.125, .25, .5, 1]


def test_loss_errors():
    with pytest.raises(ValueError, match='weighting must be one of'): DeepSupervisionLoss('linear')
    with pytest.raises(ValueError, match='temperature must be positive'): DeepSupervisionLoss(temperature=0)
    with pytest.raises(ValueError, match='3 weights given for 6 side outputs'):
        DeepSupervisionLoss((1, 1, 1))([torch.zeros(1, 1, 8, 8)] * 6, torch.zeros(1, 1, 8, 8))


def test_decodes_gives_target_form():
    l = DeepSupervisionLoss()
    probs = torch.tensor([[[[0.2, 0.7], [0.51, 0.5]]]])
    assert l.decodes(probs).tolist() == [[[0, 1], [1, 0]]]
    torch.testing.assert_close(l.activation(torch.zeros(1)), torch.tensor([0.5]))
    assert as_float_mask(torch.ones(2, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4, 4)).dtype == torch.float32


# --- every message in full, and the less travelled paths (mutmut runs this file against each mutant of losses.py) ---

def test_loss_messages_in_full():
    with pytest.raises(ValueError, match=r"^mask of shape \(2, 1, 8, 8\) does not match logits of shape \(2, 1, 9, 9\): "
                                         r"give masks as \(B, H, W\) or \(B, 1, H, W\) at the logits' size$"):
        as_float_mask(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 9, 9))
    choices = r"\('uncertainty', 'equal', 'exp', 'nnunet'\)"
    with pytest.raises(ValueError, match=rf"^weighting must be one of {choices} or a sequence of numbers, got 'linear'$"):
        DeepSupervisionLoss('linear')
    with pytest.raises(ValueError, match=rf"^weighting must be one of {choices} or a sequence of numbers, got 'linear'$"):
        fixed_weights('linear', DS2NET_LEVELS)
    with pytest.raises(ValueError, match=r"^weights must be non-negative, got \(1\.0, -1\.0\)$"): DeepSupervisionLoss((1, -1))
    with pytest.raises(ValueError, match=r"^temperature must be positive, got 0$"): DeepSupervisionLoss(temperature=0)
    with pytest.raises(ValueError, match=r"^temperature must be positive, got -1$"): uncertainty_weights([torch.zeros(1)], temperature=-1)
    side = [torch.zeros(1, 1, 8, 8)] * 6
    with pytest.raises(ValueError, match=r"^3 weights given for 6 side outputs$"): DeepSupervisionLoss((1, 1, 1))(side, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"^levels has 2 entries for 6 side outputs$"):
        DeepSupervisionLoss('exp', levels=(0, 1))(side, torch.zeros(1, 1, 8, 8))
    assert DeepSupervisionLoss().extra_repr() == "weighting='uncertainty', temperature=1.0"
    assert DeepSupervisionLoss((1, 2), temperature=2).extra_repr() == "weighting=(1.0, 2.0), temperature=2"
    # zero weights and a temperature of exactly 0+ are allowed
    assert DeepSupervisionLoss((0, 1)).weighting == (0.0, 1.0) and DeepSupervisionLoss(temperature=1e-3).temperature == 1e-3


def test_as_float_mask_forms():
    logits = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    m = as_float_mask([[[1, 0, 0, 0]] * 4] * 2, logits)  # nested lists, (B, H, W)
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.float64 and m[0, 0, 0].tolist() == [1, 0, 0, 0]
    assert as_float_mask(torch.ones(2, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long)).dtype == torch.float32
    from fastai.torch_core import TensorMask
    assert type(as_float_mask(TensorMask(torch.ones(2, 4, 4)), torch.zeros(2, 1, 4, 4))) is torch.Tensor


def test_structure_loss_with_given_weights_and_the_loss_records():
    from ds2net.losses import boundary_weights
    torch.manual_seed(5)
    G = (torch.rand(2, 1, 20, 20) > 0.5).float()
    P = torch.randn(2, 1, 20, 20)
    w = boundary_weights(G)
    assert w.min() >= 1 and w.max() <= 6
    assert structure_loss(P, G, weights=w).item() == pytest.approx(structure_loss(P, G).item(), abs=1e-7)
    assert structure_loss(P, G, weights=torch.ones_like(G)).item() != pytest.approx(structure_loss(P, G).item(), abs=1e-4)
    side = [torch.randn(2, 1, 20, 20) * s for s in (1, 2, 3, 4, 5, 6)]
    loss_fn = DeepSupervisionLoss('equal')
    total = loss_fn(side, G)
    per_output = torch.stack([structure_loss(p, G) for p in side])
    torch.testing.assert_close(loss_fn.last_losses, per_output)
    torch.testing.assert_close(total, per_output.sum())
    _, u = uncertainty_weights(side)
    torch.testing.assert_close(loss_fn.last_uncertainties, u)  # recorded for fixed weightings too
    # one tensor is one output with weight 1
    single = DeepSupervisionLoss()
    torch.testing.assert_close(single(side[0], G), structure_loss(side[0], G))
    assert single.last_weights.tolist() == [1.0]


def test_another_base_loss_and_the_cached_fixed_weights():
    import torch.nn.functional as F
    calls = []
    def bce(p, g): calls.append(p.shape); return F.binary_cross_entropy_with_logits(p, g)
    G = (torch.rand(1, 1, 8, 8) > 0.5).float()
    side = [torch.randn(1, 1, 8, 8) for _ in range(6)]
    loss_fn = DeepSupervisionLoss('exp', base=bce)
    total = loss_fn(side, G)
    assert len(calls) == 6
    expected = sum(w * F.binary_cross_entropy_with_logits(p, G) for w, p in zip([.25, .5, 1, .25, .5, 1], side))
    torch.testing.assert_close(total, expected)
    first = loss_fn._fixed
    loss_fn(side, G)
    assert loss_fn._fixed is first  # computed once, kept for the next step
    loss_fn(side[:3], G)  # another number of outputs: weights for three levels 0, 1, 2
    assert loss_fn.last_weights.tolist() == [1, .5, .25]
    loss_fn(side, G)
    assert loss_fn.last_weights.tolist() == [.25, .5, 1, .25, .5, 1]
    half = [p.half() for p in side[:2]]
    w, u = uncertainty_weights(half)
    assert u.dtype == torch.float32  # the uncertainty is computed in float32 even for half-precision logits


def test_zero_temperature_and_the_loss_before_its_first_call(monkeypatch):
    with pytest.raises(ValueError, match=r"^temperature must be positive, got 0$"): uncertainty_weights([torch.zeros(1)], temperature=0)
    fresh = DeepSupervisionLoss()
    assert fresh.last_weights is None and fresh.last_uncertainties is None and fresh.last_losses is None
    # the boundary weights depend on the mask only: computed once per step for all six outputs, not six times
    import ds2net.losses
    calls = []
    real = ds2net.losses.boundary_weights
    monkeypatch.setattr(ds2net.losses, 'boundary_weights', lambda m: calls.append(1) or real(m))
    G = (torch.rand(1, 1, 8, 8) > 0.5).float()
    fresh([torch.randn(1, 1, 8, 8) for _ in range(6)], G)
    assert len(calls) == 1


def test_reduction_gives_per_image_losses_as_fastai_asks():
    "'none': one total per image, each the weighted sum of that image's six structure losses; 'mean' and 'sum' reduce it."
    torch.manual_seed(7)
    G = (torch.rand(3, 1, 16, 16) > 0.6).float()
    side = [torch.randn(3, 1, 16, 16) * s for s in (1, 2, 3, 4, 5, 6)]
    loss = DeepSupervisionLoss(reduction='none')
    per_image = loss(side, G)
    w = loss.last_weights
    for b in range(3):  # image b alone, with the weights of the whole batch
        expected = sum(w[n] * spec_structure_loss(side[n][b:b + 1], G[b:b + 1]) for n in range(6))
        assert per_image[b].item() == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(per_image.mean(), DeepSupervisionLoss()(side, G))
    torch.testing.assert_close(DeepSupervisionLoss(reduction='sum')(side, G), per_image.sum())
    torch.testing.assert_close(loss.last_losses, torch.stack([structure_loss(p, G) for p in side]))  # per output, batch mean
    torch.testing.assert_close(structure_loss(side[0], G, reduction='none').mean(), structure_loss(side[0], G))
    with pytest.raises(ValueError, match=r"^reduction must be one of \('mean', 'sum', 'none'\), got 'max'$"):
        DeepSupervisionLoss(reduction='max')
    def bce(p, g, reduction='mean'):
        return torch.nn.functional.binary_cross_entropy_with_logits(p, g, reduction='none').mean((1, 2, 3)) if reduction == 'none' else \
            torch.nn.functional.binary_cross_entropy_with_logits(p, g)
    other = DeepSupervisionLoss('equal', base=bce, reduction='none')(side, G)  # any base that takes reduction
    assert other.shape == (3,)


def test_pixel_uncertainty_is_the_formula_the_weights_use():
    from ds2net.losses import pixel_uncertainty, side_output_uncertainty
    p = torch.tensor([0., 0.1, 0.5, 0.75, 1.])
    torch.testing.assert_close(pixel_uncertainty(p), torch.tensor([0., 0.2, 1., 0.5, 0.]))
    logits = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(side_output_uncertainty(logits), pixel_uncertainty(torch.sigmoid(logits)).mean())


@pytest.mark.parametrize('t', [float('nan'), float('inf'), '1'])
def test_a_temperature_that_is_not_a_finite_number_is_refused(t):
    "Issue 16, item 16: temperature=nan made every weight NaN, and training blamed the learning rate."
    from ds2net.errors import ParameterError
    message = (f"temperature={t!r}: the temperature of the uncertainty softmax must be a positive, finite number (the "
               f"paper's is 1)")
    with pytest.raises(ParameterError) as e: DeepSupervisionLoss(temperature=t)
    assert str(e.value) == message and e.value.param == 'temperature'
    with pytest.raises(ParameterError) as e: uncertainty_weights([torch.zeros(1)], temperature=t)
    assert str(e.value) == message
    from ds2net.learner import ds2net_learner
    from ds2net.data import segmentation_dls
    dls = segmentation_dls('synthetic:polyp', size=64, bs=2, n=8, seed=0, device='cpu')
    with pytest.raises(ParameterError) as e: ds2net_learner(dls, encoder='resnet10t', temperature=t)
    assert str(e.value) == message
