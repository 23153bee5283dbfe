"The ipywidgets explorer of `ds2net.explorer`: every widget change redraws, maps and attributions are cached, inputs and errors."
import matplotlib
matplotlib.use('Agg')
import numpy as np
import pytest
import torch
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.torch_core import set_seed

from ds2net.data import segmentation_dls
from ds2net.learner import ds2net_learner
from ds2net.model import TINY_ENCODER
from ds2net.explorer import explore


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
    assert '2 image(s), 2 attribution(s) and the variances of 0 image(s)' in ex.status.value
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


def test_explore_refuses_what_would_fail_later(learn):
    "Issue 16, item 16: an empty set, fewer masks than images, masks of another size, numpy input, n=0: refused at once."
    model = learn.model
    x = torch.randn(3, 3, 64, 64)
    cases = [
        (((x, torch.zeros(2, 64, 64)),), {}, "explore: data holds 3 image(s) and 2 mask(s): give one mask per image"),
        ((x[:0],), {}, "data must be a batch (B, C, H, W) of at least one image, got shape (0, 3, 64, 64)"),
        (([],), {}, "explore: data holds no images; give at least one"),
        ((x,), dict(n=0), "n=0: explore at least one image (a whole number)"),
        (((x, torch.zeros(3, 32, 32)),), {}, "y must hold one (H, W) mask per image: 3 image(s) of 64x64, got masks of "
                                              "shape (3, 32, 32)"),
        ((np.zeros((1, 3, 64, 64), np.float32),), {}, "data is a numpy.ndarray: give a torch tensor (B, 3, H, W) of "
         "normalised images, e.g. `prepare_images(images, config)` (ds2net.inference) or a batch of the Learner's DataLoaders"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError) as e: explore(model, *args, **kwargs)
        assert str(e.value) == message
    ex = explore(model, (x, torch.zeros(3, 1, 64, 64)))  # (N, 1, H, W) masks are taken as they come
    assert ex.y.shape == (3, 64, 64)


def test_the_other_uncertainty_signals_are_views_computed_on_demand(learn):
    "Issue 19: TTA variance, MC-dropout variance and side-output disagreement in the menu, computed once per image."
    from ds2net.explorer import view_kind
    from ds2net.stage_maps import SIGNAL_VIEWS, uncertainty_signals
    ex = explore(learn, n=3)
    assert set(SIGNAL_VIEWS) <= set(ex.view.options) and len(ex._signals) == 0
    ex.index.value = 1
    for name in SIGNAL_VIEWS:
        ex.view.value = name
        assert view_kind(name) == 'variance' and list(ex._signals) == [1]
        expected = uncertainty_signals(learn.model, ex.x[1:2])[name][0, 0].numpy()
        np.testing.assert_allclose(ex.shown, expected, atol=1e-6)
        assert 0 <= ex.shown.min() and ex.shown.max() <= 0.25
    assert ex._signals[1]['side-output disagreement'].abs().sum() > 0  # six outputs that do not all agree
    assert 'the variances of 1 image(s)' in ex.status.value
