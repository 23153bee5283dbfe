"The figure style of `ds2net.viz`: one colour per element, fixed colour ranges, outlines, overlays, colour-vision checks."
import subprocess, sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest

from ds2net.viz import (GT_COLOR, PRED_COLOR, HIT_COLOR, GT_STYLE, PRED_STYLE, FILL_ALPHA, MASK_CMAP, UNCERTAINTY_CMAP,
                        ATTRIBUTION_CMAP, MAP_KINDS, CVD_KINDS, color_scheme, color_scheme_markdown, outline, show_truth,
                        show_prediction, overlay_mask, mask_legend, outline_legend, show_map, colorbar, error_map,
                        overlay_rgb, simulate_cvd, color_difference)


def disc(size=32, r=8, cx=16, cy=16):
    y, x = np.mgrid[0:size, 0:size]
    return (x - cx) ** 2 + (y - cy) ** 2 < r ** 2


def rgb255(hex_color): return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])


def test_one_colour_or_colour_map_per_element():
    rows = {r['element']: r for r in color_scheme()}
    assert rows['ground truth']['color'] == GT_COLOR and rows['prediction']['color'] == PRED_COLOR
    assert rows['mask values, probabilities']['color'] == MASK_CMAP == 'viridis'
    assert rows['uncertainty']['color'] == UNCERTAINTY_CMAP == 'magma'
    assert rows['signed attribution']['color'] == ATTRIBUTION_CMAP == 'RdBu_r'
    assert len({GT_COLOR, PRED_COLOR, HIT_COLOR}) == 3 and len({MASK_CMAP, UNCERTAINTY_CMAP, ATTRIBUTION_CMAP}) == 3
    assert (GT_STYLE, PRED_STYLE) == ('-', '--')
    assert {k: v[:3] for k, v in MAP_KINDS.items()} == {'mask': ('viridis', 0, 1), 'uncertainty': ('magma', 0, 1),
                                                         'variance': ('magma', 0, 0.25), 'attribution': ('RdBu_r', -1, 1)}
    assert rows['variance (TTA, MC dropout, side outputs)']['color'] == UNCERTAINTY_CMAP  # one colour map per meaning
    table = color_scheme_markdown().split('\n')
    assert table[0] == '| element | drawn as | colour | value | range |' and len(table) == len(rows) + 2
    assert table[2].startswith('| ground truth |') and f'`{GT_COLOR}`' in table[2] and 'yellow' in table[2]


def test_outlines_follow_the_mask_in_the_schemes_colours_and_styles():
    fig, ax = plt.subplots()
    m = disc()
    show_truth(ax, m); show_prediction(ax, np.roll(m, 3, 1))
    truth, pred = ax.collections
    assert matplotlib.colors.to_hex(truth.get_edgecolor()[0]) == GT_COLOR
    assert matplotlib.colors.to_hex(pred.get_edgecolor()[0]) == PRED_COLOR
    assert truth.get_linestyle()[0][1] is None and pred.get_linestyle()[0][1] is not None   # solid, dashed
    assert truth.get_path_effects()   # the dark halo under the line
    # the contour runs along the disc's rim: every vertex lies about r = 8 from the centre
    verts = np.concatenate([p.vertices for p in truth.get_paths()])
    assert np.abs(np.hypot(verts[:, 0] - 16, verts[:, 1] - 16) - 8).max() < 1.0
    assert outline(ax, np.zeros((8, 8))) is None and outline(ax, np.ones((8, 8))) is None
    assert len(ax.collections) == 2
    plt.close(fig)


def test_fill_is_one_translucent_layer_clear_outside_the_mask():
    fig, ax = plt.subplots()
    m = disc()
    show_truth(ax, m, fill=True)
    layer = ax.images[0].get_array()
    assert layer.shape == (32, 32, 4)
    np.testing.assert_allclose(layer[..., 3], m * FILL_ALPHA, rtol=1e-6)
    np.testing.assert_allclose(layer[m][:, :3], np.broadcast_to(rgb255(GT_COLOR) / 255, (m.sum(), 3)), rtol=1e-6)
    overlay_mask(ax, m, alpha=0)                      # outline only: no new image layer
    assert len(ax.images) == 1 and len(ax.collections) == 2
    plt.close(fig)


def test_legends_name_the_outlines_and_the_fill():
    fig, ax = plt.subplots()
    leg = outline_legend(fig, truth='truth', prediction='p ≥ 0.5')
    assert [t.get_text() for t in leg.get_texts()] == ['truth', 'p ≥ 0.5']
    assert [h.get_linestyle() for h in leg.legend_handles] == ['-', '--']
    assert [matplotlib.colors.to_hex(h.get_color()) for h in leg.legend_handles] == [GT_COLOR, PRED_COLOR]
    assert [t.get_text() for t in outline_legend(fig, prediction=None).get_texts()] == ['ground truth']
    leg = outline_legend(fig, prediction=None, errors=True)
    assert [t.get_text() for t in leg.get_texts()] == ['ground truth', 'hit', 'false alarm', 'miss']
    assert [matplotlib.colors.to_hex(h.get_facecolor()) for h in leg.legend_handles[1:]] == [HIT_COLOR, PRED_COLOR, GT_COLOR]
    patch = mask_legend(fig, 'polyp mask').legend_handles[0]
    assert patch.get_label() == 'polyp mask' and patch.get_facecolor()[3] == pytest.approx(FILL_ALPHA)
    plt.close(fig)


@pytest.mark.parametrize('kind', list(MAP_KINDS))
def test_maps_use_their_kinds_colour_map_on_a_fixed_range(kind):
    fig, ax = plt.subplots()
    m = np.random.default_rng(0).random((16, 16)) * 0.3 + 0.1     # data far from the ends of the range
    im = show_map(ax, m, 'a map', kind=kind, gt=m > 0.25, pred=m > 0.2)
    cmap, lo, hi, label = MAP_KINDS[kind]
    assert im.get_cmap().name == cmap and im.get_clim() == (lo, hi)
    assert ax.get_title() == 'a map' and len(ax.collections) == 2 and not ax.get_xticks().size
    assert colorbar(fig, im, ax, kind).ax.get_ylabel() == label
    plt.close(fig)


def test_show_map_keeps_an_explicit_colour_map_and_refuses_unknown_kinds():
    fig, ax = plt.subplots()
    im = show_map(ax, np.zeros((4, 4)), 't', 'gray')                 # the tutorials' positional form
    assert im.get_cmap().name == 'gray' and im.get_clim() == (0, 1)
    with pytest.raises(ValueError, match="kind='probability': use one of mask, uncertainty, variance, attribution"):
        show_map(ax, np.zeros((4, 4)), kind='probability')
    plt.close(fig)


def test_error_map_colours_each_pixel_by_what_went_wrong():
    prob = np.array([[0.9, 0.9, 0.1, 0.1]])
    gt = np.array([[1, 0, 1, 0]])
    got = error_map(prob, gt)
    want = np.stack([rgb255(HIT_COLOR), rgb255(PRED_COLOR), rgb255(GT_COLOR), np.zeros(3)]) / 255
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    np.testing.assert_allclose(error_map(prob, gt, threshold=0.95)[0, :2], [rgb255(GT_COLOR) / 255, np.zeros(3)], rtol=1e-6)


def test_overlay_rgb_tints_the_mask_and_draws_its_edge():
    img = np.full((20, 20, 3), 100, np.uint8)
    m = np.zeros((20, 20), bool); m[5:15, 5:15] = True
    out = overlay_rgb(img, m, alpha=0.5, width=1)
    c = rgb255(PRED_COLOR)
    assert out.dtype == np.uint8 and (out[~m] == 100).all()
    edge = m.copy(); edge[6:14, 6:14] = False                        # the 1-pixel ring of the square
    assert (out[edge] == c).all()
    np.testing.assert_array_equal(out[6:14, 6:14].reshape(-1, 3), np.broadcast_to(np.round(0.5 * 100 + 0.5 * c), (64, 3)))
    assert (overlay_rgb(img, m, color='#ff0000', width=2)[5:15, 5:7] == [255, 0, 0]).all()   # a 2-pixel edge
    assert (overlay_rgb(img, np.zeros((20, 20)))== img).all()


def test_colour_vision_simulation_and_distances():
    # the Machado et al. (2009) deuteranopia matrix, applied to linear RGB by hand for pure red
    lin_red = np.array([1.0, 0.0, 0.0])
    m = np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]])
    out_lin = np.clip(m @ lin_red, 0, 1)
    srgb = np.where(out_lin <= 0.0031308, 12.92 * out_lin, 1.055 * out_lin ** (1 / 2.4) - 0.055)
    np.testing.assert_allclose(simulate_cvd(np.array([1.0, 0, 0]), 'deuteranopia'), srgb, rtol=1e-6)
    np.testing.assert_allclose(simulate_cvd(np.array([[[255, 0, 0]]], np.uint8), 'deuteranopia')[0, 0], srgb, rtol=1e-6)
    for k in CVD_KINDS: np.testing.assert_allclose(simulate_cvd(np.array([0.5, 0.5, 0.5]), k), 0.5, atol=3e-3)   # greys stay grey
    assert color_difference('#000000', '#ffffff') == pytest.approx(100, abs=0.1)                                 # L* from 0 to 100
    # red and green, the pair the scheme avoids, nearly merge for a deuteranope; truth and prediction stay apart
    assert color_difference('#ff0000', '#00ff00', 'deuteranopia') < 0.4 * color_difference('#ff0000', '#00ff00')
    for k in CVD_KINDS: assert color_difference(GT_COLOR, PRED_COLOR, k) > 40, k
    with pytest.raises(ValueError, match="kind='achromatopsia': use one of protanopia, deuteranopia, tritanopia"):
        simulate_cvd(np.zeros(3), 'achromatopsia')


def test_importing_viz_loads_no_plotting_or_deep_learning_library():
    code = 'import sys, ds2net.viz; print(sorted({m.split(".")[0] for m in sys.modules} & {"matplotlib", "torch", "fastai", "PIL"}))'
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == '[]'
