"Stage maps of `ds2net.stage_maps`: fields, values against the model, the loss's weights, the figures; no captum or ipywidgets."
import subprocess, sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ds2net.losses import uncertainty_weights
from ds2net.model import DS2Net, TINY_ENCODER
from ds2net.stage_maps import denormalize, dice_at, pixel_uncertainty, show_stage_maps, show_uncertainty, stage_maps


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_stage_maps_on_gpu(batch):
    net = DS2Net(TINY_ENCODER).cuda().eval()
    x, y = batch
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


def test_importing_stage_maps_imports_neither_captum_nor_ipywidgets():
    code = 'import sys, ds2net.stage_maps; print(sorted({m.split(".")[0] for m in sys.modules} & {"captum", "ipywidgets"}))'
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == '[]'
