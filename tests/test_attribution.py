"Captum attributions and the interpretation class of `ds2net.attribution`: values against gradients, completeness, occlusion, Grad-CAM layers, captum's drawing, the cascading-randomisation sanity check, timing, fastai's Interpretation."
import copy, warnings
from types import SimpleNamespace

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from captum.attr import visualization
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.interpret import Interpretation
from fastai.torch_core import set_seed
from scipy import stats

from ds2net.data import segmentation_dls
from ds2net.learner import ds2net_learner
from ds2net.model import DS2Net, TINY_ENCODER
from ds2net.scores import dice_at
from ds2net.stage_maps import stage_maps
from ds2net.attribution import (ATTRIBUTION_METHODS, LAYER_NAMES, ForegroundLogitSum, DS2NetInterpretation, attribute,
                                explanation_target, normalize_attribution, resolve_layer, scale_attribution, show_attributions,
                                show_attribution, cascade_stages, cascading_randomization, randomize_modules, rank_correlation)


def test_foreground_logit_sum_repeats_the_mask_for_captums_expanded_batches(model, batch):
    x, y = batch
    mask = y[:, None]
    f = ForegroundLogitSum(model, mask)
    with torch.no_grad():
        one = f(x)
        expected = (sum(model(x)) * mask).sum((1, 2, 3))
        torch.testing.assert_close(one, expected)
        torch.testing.assert_close(f(torch.cat([x, x, x])), expected.repeat(3))


@pytest.mark.parametrize('method', ATTRIBUTION_METHODS)
def test_attribute_returns_maps_at_the_input_size(model, batch, method):
    x, y = batch
    a = attribute(model, x, method, target=y, n_steps=8)
    assert tuple(a.shape) == (2, 1, 64, 64) and torch.isfinite(a).all() and a.abs().sum() > 0
    n = normalize_attribution(a)
    assert n.min() >= 0 and torch.allclose(n.flatten(1).max(1).values, torch.ones(2))


def test_saliency_is_the_gradient_of_the_target_sum(model, batch):
    x, y = batch
    xg = x.clone().requires_grad_()
    (sum(model(xg)) * y[:, None]).sum().backward()
    torch.testing.assert_close(attribute(model, x, 'saliency', target=y), xg.grad.abs().sum(1, keepdim=True))


def test_integrated_gradients_is_complete(model, batch):
    "The attributions of each image add up to its output minus the output at the (zero) baseline."
    x, y = batch
    f = ForegroundLogitSum(model, y[:, None])
    with torch.no_grad(): gap = f(x) - f(torch.zeros_like(x))
    ig = attribute(model, x, 'integrated_gradients', target=y, n_steps=64)
    torch.testing.assert_close(ig.sum((1, 2, 3)), gap, rtol=0.05, atol=0.5)


def test_occlusion_measures_the_drop_when_a_window_is_zeroed(model, batch):
    x, y = batch
    f = ForegroundLogitSum(model, y[:1, None])
    with torch.no_grad():
        full = f(x[:1])
        covered = x[:1].clone(); covered[..., :16, :16] = 0
        drop = (full - f(covered)).item()
    # windows of 16 move by 8: the top-left 8×8 pixels lie in the first window only, so they hold its drop
    a = attribute(model, x[:1], 'occlusion', target=y[:1], window=16)
    torch.testing.assert_close(a[0, 0, :8, :8], torch.full((8, 8), drop), rtol=1e-4, atol=1e-4)


def test_gradcam_layers_by_name_and_errors(model, batch):
    x, y = batch
    for name in LAYER_NAMES:
        a = attribute(model, x[:1], 'gradcam', target=y[:1], layer=name)
        assert tuple(a.shape) == (1, 1, 64, 64) and (a >= 0).all(), name
    assert resolve_layer(model, 'dem2') is model.detail_path[1]
    assert resolve_layer(model, 'sem3') is model.semantic_path[2]
    assert resolve_layer(model, 'encoder1') is model.encoder.layer1
    assert resolve_layer(model, model.heads[0]) is model.heads[0]
    with pytest.raises(ValueError, match="Unknown layer 'dem4'.*encoder1, encoder2, encoder3, encoder4, dem1"):
        attribute(model, x, 'gradcam', layer='dem4')
    with pytest.raises(ValueError, match="Unknown attribution method 'lime'.*integrated_gradients, saliency, occlusion, gradcam"):
        attribute(model, x, 'lime')
    with pytest.raises(ValueError, match="`layer` is for method='gradcam'"):
        attribute(model, x, 'saliency', layer='dem1')


def test_attribute_default_target_is_the_predicted_foreground(model, batch):
    x, _ = batch
    with torch.no_grad(): pred = (sum(model(x)) > 0)[:, 0].float()
    torch.testing.assert_close(attribute(model, x, 'saliency'), attribute(model, x, 'saliency', target=pred))
    with pytest.warns(UserWarning, match='no pixel to explain'):
        a = attribute(model, x, 'saliency', target=torch.zeros(2, 64, 64))
    assert (a == 0).all()


def test_encoder_stages_of_a_transformer_encoder():
    net = DS2Net('pvt_v2_b0').eval()
    assert resolve_layer(net, 'encoder3') is net.encoder.stages_2
    a = attribute(net, torch.randn(1, 3, 64, 64), 'gradcam', target=torch.ones(1, 64, 64), layer='encoder3')
    assert tuple(a.shape) == (1, 1, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_attribute_and_stage_maps_on_gpu(batch):
    net = DS2Net(TINY_ENCODER).cuda().eval()
    x, y = batch
    for m in ATTRIBUTION_METHODS:
        a = attribute(net, x.cuda(), m, target=y.cuda(), n_steps=8)
        assert a.device.type == 'cuda' and tuple(a.shape) == (2, 1, 64, 64)


def test_attribution_figure_has_a_titled_panel_per_method(model, batch):
    x, y = batch
    m = stage_maps(model, x, y)
    attrs = {k: attribute(model, x, k, target=y, n_steps=4) for k in ('saliency', 'gradcam')}
    fig = show_attributions(m, attrs)
    assert [a.get_title() for a in fig.axes[1:3]] == ['saliency', 'gradcam']
    plt.close(fig)


def test_interpretation_ranks_validation_images_by_dice(learn):
    interp = DS2NetInterpretation.from_learner(learn)
    n = len(learn.dls.valid_ds)
    assert len(interp.dice) == n == len(interp.x)
    worst = interp.worst(3)
    assert interp.dice[worst].tolist() == sorted(interp.dice.tolist())[:3]
    # the Dice of an image is that of its own prediction at probability 0.5
    i = worst[0]
    with torch.no_grad(): p = learn.model.predict_proba(interp.x[i:i + 1])[0, 0]
    assert interp.dice[i].item() == pytest.approx(dice_at((p > 0.5).float(), interp.y[i]), abs=1e-6)
    fig = interp.plot_worst(2, method='saliency')
    assert len([a for a in fig.axes if a.get_label() != '<colorbar>']) == 12
    assert fig.axes[0].get_ylabel().startswith(f'#{worst[0]}: Dice')
    plt.close(fig)


def test_fastai_batches_work_as_they_come(learn):
    "Batches from fastai's DataLoaders are TensorImage/TensorMask subclasses; captum must see plain tensors."
    x, y = learn.dls.valid.one_batch()
    assert type(x).__name__ == 'TensorImage'
    for method in ATTRIBUTION_METHODS:
        a = attribute(learn.model, x[:2], method, target=y[:2], n_steps=4)
        assert type(a) is torch.Tensor and tuple(a.shape) == (2, 1, 64, 64)
    m = stage_maps(learn.model, x[:2], y[:2])
    assert type(m.fused_prob) is torch.Tensor and type(m.masks) is torch.Tensor


def test_explanation_target_falls_back_to_the_truth_only_where_nothing_is_predicted():
    prob = torch.zeros(2, 1, 8, 8); prob[0, 0, :4] = 0.9          # image 0 predicts the top half, image 1 nothing
    gt = torch.zeros(2, 8, 8); gt[:, 4:, :4] = 1
    t = explanation_target(prob, gt)
    assert torch.equal(t[0, 0], (prob[0, 0] > 0.5).float()) and torch.equal(t[1, 0], gt[1])
    assert explanation_target(prob, None) is None


def test_scale_attribution_is_what_captum_draws(model, batch):
    x, y = batch
    a = attribute(model, x, 'integrated_gradients', target=y, n_steps=8)
    img = stage_maps(model, x).images.numpy()
    scaled = scale_attribution(a)
    for i in range(2):
        fig, ax = plt.subplots()
        visualization.visualize_image_attr(a[i].permute(1, 2, 0).numpy(), img[i], 'blended_heat_map', 'all', (fig, ax), use_pyplot=False)
        np.testing.assert_allclose(ax.images[-1].get_array(), scaled[i, 0].numpy(), atol=1e-6)
        plt.close(fig)
    assert scaled.min() < 0 < scaled.max() and scaled.abs().max() == 1   # the sign is kept, extremes clipped to ±1
    assert (np.sign(scaled.numpy()) == np.sign(a.numpy())).all()
    assert scale_attribution(torch.zeros(1, 1, 8, 8)).abs().max() == 0


def test_interpretation_is_fastais_with_per_image_losses(learn):
    interp = DS2NetInterpretation.from_learner(learn)
    assert isinstance(interp, Interpretation) and len(interp.losses) == len(interp.dice)
    losses, idx = interp.top_losses(3)
    assert losses.tolist() == sorted(interp.losses.tolist(), reverse=True)[:3] and interp.losses[idx].tolist() == losses.tolist()
    xb, yb = interp.dl.one_batch()   # the first batch, unshuffled: its losses are the loss with reduction='none' on it
    lf = learn.loss_func
    lf.reduction = 'none'
    try:
        with torch.no_grad(): per_image = lf(learn.model.eval()(xb), yb)
    finally: lf.reduction = 'mean'
    torch.testing.assert_close(interp.losses[:len(xb)], per_image.cpu(), rtol=1e-4, atol=1e-5)
    with torch.no_grad(): batch_mean = lf(learn.model(xb), yb).item()
    assert interp.losses[:len(xb)].mean().item() == pytest.approx(batch_mean, rel=1e-4)
    few = DS2NetInterpretation.from_learner(learn, max_images=3)
    assert len(few.x) == len(few.dice) == len(few.losses) == 3


def test_attribute_refuses_bad_arguments_before_any_work(model, batch):
    "Issue 16, item 16: numpy input, no steps, a window larger than the image, a DS2Net layer name on another network."
    x, _ = batch
    cases = [
        (dict(x=np.zeros((1, 3, 64, 64), np.float32)), "x is a numpy.ndarray: give a torch tensor (B, 3, H, W) of "
         "normalised images, e.g. `prepare_images(images, config)` (ds2net.inference) or a batch of the Learner's DataLoaders"),
        (dict(x=x[0]), "x must be a batch (B, C, H, W) of at least one image, got shape (3, 64, 64)"),
        (dict(x=(x * 255).byte()), "x holds torch.uint8 values: give normalised float images (uint8 pixels must be scaled "
         "and normalised first, e.g. with `prepare_images`)"),
        (dict(x=x, n_steps=0), "n_steps=0: integrated gradients needs a whole number of steps of at least 1 (32 is the "
         "default; more steps, a closer approximation)"),
        (dict(x=x, method='occlusion', window=65), "window=65: the occlusion window must be a whole number of pixels from 1 "
         "to the image's shorter side (64); None: 1/8 of it"),
        (dict(x=x, internal_batch_size=0), "internal_batch_size=0: give a whole number of images per pass of at least 1, "
         "or None for all at once"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e: attribute(model, **kwargs)
        assert str(e.value) == message
    with pytest.raises(ValueError) as e: attribute(torch.nn.Conv2d(3, 1, 1), x, 'gradcam', layer='dem3')
    assert str(e.value) == ("layer='dem3' names a part of DS2Net, and the model is a Conv2d: pass the layer itself, e.g. "
                            "layer=model.<block>")
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)  # any network, with its own layer: Grad-CAM works
    assert attribute(torch.nn.Sequential(conv), x, 'gradcam', layer=conv).shape == (2, 1, 64, 64)


def test_cascading_randomization_matches_scipy_and_leaves_the_model_alone(learn, batch):
    "Adebayo et al.'s cascade: stage 0 gives the trained maps (ρ = 1), the correlations are scipy's Spearman of |map|, "
    "each stage randomises the stages above it too, every weight of the copy is re-drawn and the model passed in is not."
    net, (x, y) = learn.model.eval(), batch
    before = {n: p.clone() for n, p in net.state_dict().items()}
    cas = cascading_randomization(net, x, ('saliency', 'gradcam'), target=y)
    assert cas.stages == ['trained', 'heads', 'dem3 + sem3', 'dem2 + sem2', 'dem1 + sem1', 'translation',
                          'encoder4', 'encoder3', 'encoder2', 'encoder1', 'stem']
    assert list(cas.table.columns) == ['saliency', 'gradcam'] and cas.table.shape == (11, 2)
    np.testing.assert_allclose(cas.table.loc['trained'].values, 1, atol=1e-9)
    assert all(torch.equal(p, before[n]) for n, p in net.state_dict().items()), 'the model passed in was modified'
    trained = dict(net.named_parameters())
    same = [n for n, p in cas.model.named_parameters() if torch.equal(p, trained[n])]
    assert same == [], f'weights left as trained after the full cascade: {same}'
    ref = attribute(net, x, 'saliency', target=y)
    for k in range(len(cas.stages)):
        for i in range(len(x)):
            expected = stats.spearmanr(cas.maps['saliency'][k, i].abs().flatten(), ref[i].abs().flatten())[0]
            assert float(cas.rho['saliency'][k, i]) == pytest.approx(expected, abs=1e-6), (cas.stages[k], i)
    # stage 2 by hand: a fresh copy with the heads and the finest DEM and SEM re-initialised (seeds 1 and 2)
    by_hand = copy.deepcopy(net)
    randomize_modules([by_hand.heads], seed=1)
    randomize_modules([by_hand.detail_path[2], by_hand.semantic_path[2]], seed=2)
    torch.testing.assert_close(cas.maps['gradcam'][2], attribute(by_hand, x, 'gradcam', target=y))
    assert torch.equal(by_hand.detail_path[1].fuse[0].weight, net.detail_path[1].fuse[0].weight)  # the stages below untouched
    assert cas.rho['saliency'][-1].abs().max() < 0.9          # a random network's saliency is not the trained one's


def test_rank_correlation_is_spearmans_with_ties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    a[0, 0, :4] = 0                                           # ties: a block of zeros
    for absolute in (True, False):
        f = (lambda t: t.abs()) if absolute else (lambda t: t)
        expected = [stats.spearmanr(f(a[i]).flatten(), f(b[i]).flatten())[0] for i in range(3)]
        np.testing.assert_allclose(rank_correlation(a, b, absolute).numpy(), expected, atol=1e-12)
    assert rank_correlation(torch.zeros(1, 5), torch.randn(1, 5)).tolist() == [0.0]
    with pytest.raises(ValueError) as e: cascade_stages(torch.nn.Conv2d(3, 1, 1))
    assert str(e.value) == ("cascade_stages lists DS2Net's blocks, and the model is a Conv2d: pass stages as a dict of "
                            "label -> module names, from the output down")


def test_time_attributions_reports_a_median_after_warm_up(model, batch, monkeypatch):
    "The median of the timed calls, per image, after untimed warm-up calls: counted with a fake `attribute` and a fake clock."
    import ds2net.attribution as A
    calls, clock = [], iter([0., 3., 10., 11., 20., 26.])      # three timed calls: 3 s, 1 s, 6 s for 2 images
    monkeypatch.setattr(A, 'attribute', lambda model, x, m, **kw: calls.append((m, kw)))
    monkeypatch.setattr(A, 'time', SimpleNamespace(perf_counter=lambda: next(clock)))
    t = A.time_attributions(model, batch[0], ('occlusion',), repeats=3, warmup=2, options={'occlusion': dict(window=8)})
    assert calls == [('occlusion', dict(window=8))] * 5       # 2 warm-up + 3 timed
    assert t.loc['occlusion'].tolist() == [1.5, 0.5, 3.0]      # median, fastest, slowest per image
    with pytest.raises(ValueError, match='repeats=0: time at least one call'): A.time_attributions(model, batch[0], repeats=0)


def test_show_attribution_is_captums_drawing(model, batch):
    x, y = batch
    a = attribute(model, x[:1], 'integrated_gradients', target=y[:1], n_steps=4)
    img = stage_maps(model, x[:1]).images[0].numpy()
    fig, (ax, ref, zero) = plt.subplots(1, 3)
    im = show_attribution(ax, a[0, 0], img, 'ig', gt=y[0].numpy())
    visualization.visualize_image_attr(a[0].permute(1, 2, 0).numpy(), img, 'blended_heat_map', 'all', (fig, ref),
                                       cmap='RdBu_r', alpha_overlay=0.6, use_pyplot=False)
    np.testing.assert_array_equal(im.get_array(), ref.images[-1].get_array())
    np.testing.assert_array_equal(ax.images[0].get_array(), ref.images[0].get_array())   # the same grey image under it
    assert im.get_cmap().name == 'RdBu_r' and im.get_clim() == (-1, 1) and im.get_alpha() == 0.6 and ax.get_title() == 'ig'
    z = show_attribution(zero, np.zeros((64, 64)), img)                                  # captum refuses a zero map
    assert np.asarray(z.get_array()).max() == 0 and z.get_clim() == (-1, 1)
    plt.close(fig)
