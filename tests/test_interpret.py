"Stage maps, captum attributions, the interpretation helper and the ipywidgets explorer of `ds2net.interpret`."
import warnings

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.torch_core import set_seed

from ds2net.data import segmentation_dls
from ds2net.learner import ds2net_learner
from ds2net.losses import uncertainty_weights
from ds2net.model import DS2Net, TINY_ENCODER
from ds2net.interpret import (ATTRIBUTION_METHODS, LAYER_NAMES, ForegroundLogitSum, SegmentationInterpretation, attribute,
                              denormalize, dice_at, explore, normalize_attribution, pixel_uncertainty, resolve_layer,
                              show_attributions, show_stage_maps, show_uncertainty, stage_maps)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return DS2Net(TINY_ENCODER).eval()


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.zeros(2, 64, 64); y[:, 20:44, 16:40] = 1
    return x, y


@pytest.fixture(scope='module')
def learn():
    set_seed(0, reproducible=True)
    dls = segmentation_dls('synthetic:polyp', size=64, bs=8, n=48, seed=0, device='cpu')
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, lr=3e-3)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-3)
    return learn


def test_stage_maps_fields_shapes_and_values(model, batch):
    x, y = batch
    m = stage_maps(model, x, y)
    assert [tuple(t.shape) for t in m.detail_masks] == [(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 16, 16)]
    assert [tuple(t.shape) for t in m.semantic_masks] == [(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 16, 16)]
    assert all(tuple(t.shape) == (2, 1, 64, 64) for t in m.detail_masks_up + m.semantic_masks_up + m.side_probs)
    assert tuple(m.images.shape) == (2, 64, 64, 3) and m.images.min() >= 0 and m.images.max() <= 1
    with torch.no_grad(): out = model.forward_with_masks(x)
    for a, b in zip(m.detail_masks + m.semantic_masks, out.detail_masks + out.semantic_masks): assert torch.allclose(a, b)
    torch.testing.assert_close(m.fused_prob, torch.sigmoid(sum(out.side_outputs)))
    torch.testing.assert_close(m.fused_prob, model.predict_proba(x))
    # uncertainty is 1 − |p − 0.5| / 0.5 per pixel, for every output
    for p, u in zip(m.side_probs + (m.fused_prob,), m.side_uncertainty + (m.fused_uncertainty,)):
        torch.testing.assert_close(u, 1 - (p - 0.5).abs() / 0.5)
    assert torch.equal(m.masks[:, 0], y)
    names = list(m.maps())
    assert len(names) == 20 and names[0] == 'detail mask 1' and names[-1] == 'uncertainty (fused)'
    torch.testing.assert_close(m.maps()['semantic mask 2'], m.semantic_masks_up[1])


def test_stage_maps_keeps_training_mode_and_refuses_other_networks(model, batch):
    model.train()
    stage_maps(model, batch[0])
    assert model.training
    model.eval()
    with pytest.raises(TypeError, match='need a DS2Net'): stage_maps(torch.nn.Conv2d(3, 1, 1), batch[0])
    with pytest.raises(ValueError, match=r'masks must be \(B, H, W\)'): stage_maps(model, batch[0], torch.zeros(3, 64, 64))


def test_side_output_weights_are_the_loss_weights(model, batch):
    m = stage_maps(model, batch[0])
    u, w = m.side_output_weights(1)
    w_ref, u_ref = uncertainty_weights([s[1:2] for s in m.side_logits])
    np.testing.assert_allclose(w, w_ref.numpy()); np.testing.assert_allclose(u, u_ref.numpy())
    # u is the image's mean pixel uncertainty, as the plots say
    np.testing.assert_allclose(u, [s[1].mean().item() for s in m.side_uncertainty], rtol=1e-5)


def test_pixel_uncertainty_and_denormalize():
    torch.testing.assert_close(pixel_uncertainty(torch.tensor([0., .1, .5, .9, 1.])), torch.tensor([0., .2, 1., .2, 0.]))
    img = torch.rand(1, 3, 4, 4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(denormalize(x, mean, std), img.permute(0, 2, 3, 1))
    assert dice_at(np.array([[0.9, 0.2]]), np.array([[1, 1]])) == pytest.approx(2 / 3)
    assert dice_at(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


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
    assert stage_maps(net, x.cuda()).fused_prob.device.type == 'cpu'


def test_figures_have_labelled_panels_and_colour_bars(model, batch):
    x, y = batch
    m = stage_maps(model, x, y)
    fig = show_stage_maps(m, 1)
    titles = [ax.get_title() for ax in fig.axes]
    assert 'detail mask 3 (DEM3, 1/4)' in titles and 'semantic mask 1 (SEM1, 1/16)' in titles
    assert any(t.startswith('s3: u=') for t in titles)  # side output s3, its uncertainty and loss weight
    assert {ax.get_label() for ax in fig.axes} >= {'<colorbar>'}
    panels = [ax for ax in fig.axes if ax.get_label() != '<colorbar>']
    assert len(panels) == 16 and all(ax.images or ax.collections for ax in panels)  # no empty axes
    for ax in panels[1:]:
        for im in ax.images:
            if im.get_array().ndim == 2: assert im.get_clim() == (0, 1)  # fixed range
    plt.close(fig)
    fig = show_uncertainty(m, 0); assert len([a for a in fig.axes if a.get_label() != '<colorbar>']) == 7; plt.close(fig)
    attrs = {k: attribute(model, x, k, target=y, n_steps=4) for k in ('saliency', 'gradcam')}
    fig = show_attributions(m, attrs)
    assert [a.get_title() for a in fig.axes[1:3]] == ['saliency', 'gradcam']
    plt.close(fig)


def test_interpretation_ranks_validation_images_by_dice(learn):
    interp = SegmentationInterpretation.from_learner(learn)
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


def test_explorer_redraws_on_every_widget_change_and_caches(learn):
    ex = explore(learn, n=6)
    assert ex.index.max == 5 and ex.draws == 1 and ex.image.value[:4] == b'\x89PNG'
    first_png, first_map = ex.image.value, ex.shown.copy()
    ex.index.value = 2
    assert ex.draws == 2 and ex.image.value != first_png and not np.allclose(first_map, ex.shown)
    ex.view.value = 'detail mask 3'
    np.testing.assert_allclose(ex.shown, ex.maps_of(2).detail_masks_up[2][0, 0].numpy())
    ex.view.value = 'uncertainty d2'
    np.testing.assert_allclose(ex.shown, ex.maps_of(2).side_uncertainty[1][0, 0].numpy())
    assert len(ex._attr) == 0  # nothing attributed until asked
    ex.view.value = 'attribution: occlusion'
    assert list(ex._attr) == [(2, 'occlusion')] and ex.shown.max() == pytest.approx(1.0)
    cached = ex._attr[2, 'occlusion']
    ex.index.value = 0; ex.index.value = 2
    assert ex._attr[2, 'occlusion'] is cached and len(ex._attr) == 2 and len(ex._maps) == 2
    png, draws = ex.image.value, ex.draws
    ex.threshold.value = 0.95
    assert ex.draws == draws + 1 and ex.image.value != png
    assert 'image(s) and 2 attribution(s)' in ex.status.value
    bundle = ex._repr_mimebundle_()
    assert 'application/vnd.jupyter.widget-view+json' in bundle


def test_explore_inputs_and_errors(learn):
    x, y = learn.dls.valid.one_batch()
    ex = explore(learn.model, (x, y), n=3)
    assert len(ex.x) == 3 and ex.y.shape == (3, 64, 64)
    ex = explore(learn.model, x[:2])
    assert ex.y is None and ex.figure() is not None
    with pytest.raises(ValueError, match='give the images to explore'): explore(learn.model)
    with pytest.raises(ValueError, match="Unknown view 'edges'"): explore(learn, view='edges')
    with pytest.raises(TypeError, match='need a DS2Net'): explore(torch.nn.Conv2d(3, 1, 1), x)


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
    from ds2net.interpret import explanation_target
    prob = torch.zeros(2, 1, 8, 8); prob[0, 0, :4] = 0.9          # image 0 predicts the top half, image 1 nothing
    gt = torch.zeros(2, 8, 8); gt[:, 4:, :4] = 1
    t = explanation_target(prob, gt)
    assert torch.equal(t[0, 0], (prob[0, 0] > 0.5).float()) and torch.equal(t[1, 0], gt[1])
    assert explanation_target(prob, None) is None
