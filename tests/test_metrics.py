"Tests of ds2net.metrics: each metric against its definition or its known values, the table, errors, speed."
import time

import numpy as np
import pandas as pd
import pytest
import torch

from ds2net.metrics import (CURVE_NAMES, METRIC_NAMES, THRESHOLDS, SegmentationEvaluator, check_mask,
                            check_prediction, evaluate_set, evaluation_table, resize_prediction)
from support import blob


EPS = np.spacing(1)


def random_cases(seed=0, n=5, shape=(24, 32)):
    "Random probability maps (with exact 0s and 1s) and masks, including an empty and a full mask."
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for i in range(n):
        g = blob(shape, rng.integers(6, 18, 2), rng.integers(4, 10))
        p = np.clip(0.6 * g + 0.5 * rng.random(shape) - 0.05, 0, 1)  # informative but noisy, with exact 0s
        p[rng.random(shape) < 0.02] = 1.0
        preds.append(p); gts.append(g)
    preds += [rng.random(shape), rng.random(shape)]
    gts += [np.zeros(shape, bool), np.ones(shape, bool)]
    return preds, gts


def counts(p, g, t):
    b = p >= t
    return (b & g).sum(), (b & ~g).sum(), (~b & ~g).sum(), (~b & g).sum()


def div(a, b): return a / b if b else 0.0


def curves_by_definition(preds, gts, field_specificity=False):
    "Dice, IoU, sensitivity, specificity at each of the 256 thresholds, averaged over images (0 where 0/0)."
    per_image = []
    for p, g in zip(preds, gts):
        rows = []
        for t in THRESHOLDS:
            tp, fp, tn, fn = counts(p, g, t)
            spe = div(tn, tn + fp) if (tp > 0 or not field_specificity) else 0.0
            rows.append((div(2 * tp, 2 * tp + fp + fn), div(tp, tp + fp + fn), div(tp, tp + fn), spe))
        per_image.append(rows)
    c = np.mean(per_image, axis=0)  # (256, 4)
    return dict(zip(('Dic', 'IoU', 'Sen', 'Spe'), c.T))


def emeasure_by_definition(p, g, t):
    "Enhanced-alignment measure (Fan et al. 2018) of the binary map p >= t, pixel by pixel."
    fm, gt = (p >= t).astype(float), g.astype(float)
    n = gt.size
    if gt.sum() == 0: enhanced = 1 - fm
    elif gt.sum() == n: enhanced = fm
    else:
        a, b = fm - fm.mean(), gt - gt.mean()
        align = 2 * a * b / (a**2 + b**2 + EPS)
        enhanced = (align + 1)**2 / 4
    return enhanced.sum() / (n - 1 + EPS)


def evaluate(preds, gts, **kw):
    ev = SegmentationEvaluator(**kw)
    for p, g in zip(preds, gts): ev.step(p, g)
    return ev


@pytest.mark.parametrize('field_specificity', [False, True])
def test_threshold_curves_match_definition(field_specificity):
    preds, gts = random_cases(seed=1)
    ev = evaluate(preds, gts, field_specificity=field_specificity)
    want = curves_by_definition(preds, gts, field_specificity)
    got = ev.curves()
    assert list(got) == list(CURVE_NAMES)
    for k in ('Dic', 'IoU', 'Sen', 'Spe'):
        assert got[k].shape == (256,)
        np.testing.assert_allclose(got[k], want[k], atol=1e-12, err_msg=k)
    res = ev.results()
    for k in ('Dic', 'IoU', 'Sen', 'Spe'):
        assert res[f'mean{k}'] == pytest.approx(want[k].mean(), abs=1e-12)
        assert res[f'max{k}'] == pytest.approx(want[k].max(), abs=1e-12)


def test_field_specificity_differs_only_where_no_true_positive():
    preds, gts = random_cases(seed=2)
    a, b = evaluate(preds, gts).curves(), evaluate(preds, gts, field_specificity=True).curves()
    for k in ('Dic', 'IoU', 'Sen', 'Em'): np.testing.assert_array_equal(a[k], b[k])
    assert (b['Spe'] <= a['Spe']).all() and (b['Spe'] < a['Spe']).any()


def test_emeasure_curve_matches_definition():
    preds, gts = random_cases(seed=3)
    want = np.mean([[emeasure_by_definition(p, g, t) for t in THRESHOLDS] for p, g in zip(preds, gts)], axis=0)
    ev = evaluate(preds, gts)
    np.testing.assert_allclose(ev.curves()['Em'], want, atol=1e-10)
    res = ev.results()
    assert res['meanEm'] == pytest.approx(want.mean(), abs=1e-10)
    assert res['maxEm'] == pytest.approx(want.max(), abs=1e-10)


def test_mae_matches_definition():
    preds, gts = random_cases(seed=4)
    want = np.mean([np.abs(p - g).mean() for p, g in zip(preds, gts)])
    assert evaluate(preds, gts).results()['MAE'] == pytest.approx(want, abs=1e-14)


def test_uint8_maps_use_the_same_256_thresholds():
    "A uint8 value u is foreground at threshold k/255 exactly when u >= k."
    rng = np.random.default_rng(5)
    u = [rng.integers(0, 256, (20, 20), dtype=np.uint8) for _ in range(3)]
    gts = [blob((20, 20), (10, 9), r) for r in (4, 6, 8)]
    want = curves_by_definition([x / 255 for x in u], gts)
    got = evaluate(u, gts).curves()
    for k in want: np.testing.assert_allclose(got[k], want[k], atol=1e-12)
    # the same maps as float64 and float32 probabilities give the same table
    r8 = evaluate(u, gts).results()
    assert evaluate([x / 255 for x in u], gts).results() == pytest.approx(r8, abs=1e-12)
    assert evaluate([(x / 255).astype(np.float32) for x in u], gts).results() == pytest.approx(r8, abs=1e-6)


def test_mask_encodings_and_tensors_agree():
    preds, gts = random_cases(seed=6, n=3)
    ref = evaluate(preds, gts).results()
    assert evaluate(preds, [g.astype(np.uint8) * 255 for g in gts]).results() == ref
    assert evaluate(preds, [g.astype(np.int64) for g in gts]).results() == ref
    assert evaluate(preds, [g.astype(np.float32) for g in gts]).results() == ref
    assert evaluate([torch.tensor(p) for p in preds], [torch.tensor(g) for g in gts]).results() == ref


def test_perfect_prediction():
    g = blob((40, 50), (20, 24), 9)
    n, f = g.size, g.sum()
    res = evaluate([g.astype(float)], [g]).results()
    assert res['Sm'] == pytest.approx(1, abs=1e-9)
    assert res['wFm'] == pytest.approx(1, abs=1e-9)
    assert res['MAE'] == 0
    assert res['maxEm'] == pytest.approx(n / (n - 1), abs=1e-9)  # the MATLAB original divides by N - 1
    for k in ('maxDic', 'maxIoU', 'maxSen', 'maxSpe'): assert res[k] == 1
    # every threshold but 0 binarises the map to the mask itself; at 0 every pixel is foreground
    assert res['meanDic'] == pytest.approx((255 + 2 * f / (f + n)) / 256, abs=1e-12)
    assert res['meanIoU'] == pytest.approx((255 + f / n) / 256, abs=1e-12)
    assert res['meanSen'] == 1
    assert res['meanSpe'] == pytest.approx(255 / 256, abs=1e-12)


def test_all_zero_prediction_on_a_lesion():
    g = blob((40, 50), (20, 24), 9)  # away from the border; its centroid splits it into four mixed quadrants
    n, f = g.size, g.sum()
    res = evaluate([np.zeros(g.shape)], [g]).results()
    assert res['MAE'] == pytest.approx(f / n)
    assert res['wFm'] == 0
    assert res['Sm'] == pytest.approx(0.5 * (1 - f / n), abs=1e-9)  # object score 1 - f/n, region score 0
    assert res['meanEm'] == pytest.approx(0.25 * n / (n - 1), abs=1e-9)
    assert res['maxEm'] == pytest.approx(0.25 * n / (n - 1), abs=1e-9)
    assert res['maxDic'] == pytest.approx(2 * f / (f + n))  # only at threshold 0 is anything foreground
    assert res['meanDic'] == pytest.approx(2 * f / (f + n) / 256)
    assert res['meanSen'] == pytest.approx(1 / 256)
    assert res['meanSpe'] == pytest.approx(255 / 256)
    assert evaluate([np.zeros(g.shape)], [g], field_specificity=True).results()['meanSpe'] == 0


def test_empty_and_full_masks_follow_sm_definition():
    rng = np.random.default_rng(7)
    p = rng.random((16, 16))
    assert evaluate([p], [np.zeros((16, 16), bool)]).results()['Sm'] == pytest.approx(1 - p.mean())
    assert evaluate([p], [np.ones((16, 16), bool)]).results()['Sm'] == pytest.approx(p.mean())
    assert evaluate([p], [np.zeros((16, 16), bool)]).results()['wFm'] == 0  # pysodmetrics' convention


def test_better_predictions_score_better():
    g = blob((48, 48), (24, 24), 10)
    good, bad = np.where(g, 0.9, 0.1), np.roll(np.where(g, 0.9, 0.1), 8, axis=1)
    rg, rb = evaluate([good], [g]).results(), evaluate([bad], [g]).results()
    for k in ('meanDic', 'meanIoU', 'wFm', 'Sm', 'meanEm', 'maxDic'): assert rg[k] > rb[k], k
    assert rg['MAE'] < rb['MAE']


def test_results_keys_and_averaging_over_images():
    preds, gts = random_cases(seed=8, n=4)
    res = evaluate(preds, gts).results()
    assert list(res) == [*METRIC_NAMES, 'n'] and res['n'] == len(preds)
    one = [evaluate([p], [g]).results() for p, g in zip(preds, gts)]
    for k in ('wFm', 'Sm', 'MAE'): assert res[k] == pytest.approx(np.mean([r[k] for r in one]))
    # "mean"/"max" are over thresholds of the curve averaged over images, not averages of per-image maxima
    assert res['maxDic'] <= np.mean([r['maxDic'] for r in one]) + 1e-12


def test_reset_and_empty_evaluator():
    ev = SegmentationEvaluator()
    with pytest.raises(ValueError, match='no images evaluated'): ev.results()
    preds, gts = random_cases(seed=9, n=2)
    ev.step(preds[0], gts[0]); ev.reset()
    assert ev.n == 0
    with pytest.raises(ValueError, match='no images evaluated'): ev.results()


def test_prediction_checks():
    g = np.zeros((8, 8), bool)
    ev = SegmentationEvaluator()
    with pytest.raises(ValueError, match=r'values in \[-3, 5\], outside \[0, 1\].*sigmoid'):
        ev.step(np.linspace(-3, 5, 64).reshape(8, 8), g)
    with pytest.raises(ValueError, match='NaN'): ev.step(np.full((8, 8), np.nan), g)
    with pytest.raises(TypeError, match='dtype int64'): ev.step(np.zeros((8, 8), np.int64), g)
    with pytest.raises(ValueError, match=r'2-D \(H, W\).*\(1, 8, 8\)'): ev.step(np.zeros((1, 8, 8)), g)
    with pytest.raises(ValueError, match=r'prediction of a.png has shape \(4, 4\).*\(8, 8\).*resize_prediction'):
        ev.step(np.zeros((4, 4)), g, name='a.png')
    assert ev.n == 0  # nothing was counted


def test_mask_checks_name_the_offending_value():
    p = np.zeros((4, 4))
    with pytest.raises(ValueError, match='not binary: it holds the value 37'):
        SegmentationEvaluator().step(p, np.array([[0, 37, 255, 255]] * 4, np.uint8))
    with pytest.raises(ValueError, match='not binary: it holds the value 0.5'):
        SegmentationEvaluator().step(p, np.full((4, 4), 0.5))
    with pytest.raises(ValueError, match='mixes the values 1 and 255'):
        check_mask(np.array([[0, 1], [255, 0]]))
    with pytest.raises(ValueError, match=r'ground truth of x must be a 2-D \(H, W\) mask, got shape \(4, 4, 1\)'):
        SegmentationEvaluator().step(p, np.zeros((4, 4, 1)), name='x')
    assert check_mask(np.array([[0, 255]], np.uint8)).dtype == bool


def test_check_prediction_conversions():
    np.testing.assert_array_equal(check_prediction(np.array([[0, 51, 255]], np.uint8)), [[0, 0.2, 1]])
    np.testing.assert_array_equal(check_prediction(np.array([[True, False]])), [[1., 0.]])
    assert check_prediction(np.zeros((2, 2), np.float32)).dtype == np.float64


def test_evaluate_set_length_mismatch():
    preds, gts = random_cases(seed=10, n=3)
    with pytest.raises(ValueError, match='gts has more items'): evaluate_set(preds[:2], gts)
    with pytest.raises(ValueError, match='preds has more items'): evaluate_set(preds, gts[:2])
    with pytest.raises(ValueError, match='pair 1'):
        evaluate_set([preds[0], preds[1] * 3], gts[:2])


def test_resize_prediction_is_bilinear_half_pixel():
    np.testing.assert_allclose(resize_prediction(np.array([[0., 1.], [0., 1.]]), (2, 4)),
                               [[0, .25, .75, 1]] * 2, atol=1e-7)
    rng = np.random.default_rng(11)
    p = rng.random((8, 8))
    down = resize_prediction(p, (4, 4))  # halving samples the centre of each 2x2 block: its mean
    np.testing.assert_allclose(down, p.reshape(4, 2, 4, 2).mean(axis=(1, 3)), atol=1e-6)
    np.testing.assert_allclose(resize_prediction(np.full((5, 7), 0.3), (13, 2)), 0.3, atol=1e-7)
    np.testing.assert_array_equal(resize_prediction(p, (8, 8)), p)
    out = resize_prediction(rng.random((6, 6)), np.zeros((9, 11)).shape)
    assert out.shape == (9, 11) and out.min() >= 0 and out.max() <= 1
    assert resize_prediction(np.array([[0, 255]], np.uint8), (1, 2)).tolist() == [[0., 1.]]
    with pytest.raises(ValueError, match='outside'): resize_prediction(np.full((2, 2), 2.), (4, 4))
    with pytest.raises(ValueError, match='shape must be'): resize_prediction(p, (4, 4, 1))


def test_evaluation_table_and_csv_round_trip(tmp_path):
    a, b = random_cases(seed=12, n=3), random_cases(seed=13, n=2)
    filled = evaluate(*b)
    csv = tmp_path / 'out' / 'table.csv'
    df = evaluation_table({'SetA': a, 'SetB': filled, 'SetC': evaluate_set(*b)}, csv=csv)
    assert df.shape == (3, 14)
    assert list(df.columns) == [*METRIC_NAMES, 'n'] and list(df.index) == ['SetA', 'SetB', 'SetC']
    assert df.index.name == 'dataset'
    assert df.loc['SetA', 'n'] == 5 and df.loc['SetB', 'n'] == 4
    assert df.loc['SetA', list(METRIC_NAMES)].tolist() == pytest.approx(
        [evaluate_set(*a)[k] for k in METRIC_NAMES], abs=1e-15)
    assert df.loc['SetB'].tolist() == pytest.approx(df.loc['SetC'].tolist())
    back = pd.read_csv(csv, index_col='dataset')
    assert list(back.columns) == list(df.columns) and list(back.index) == list(df.index)
    np.testing.assert_allclose(back.values, df.values.astype(float), rtol=1e-12)



def test_evaluation_table_never_replaces_a_file_unasked(tmp_path):
    "Issue 16 item 2: an existing file, or one that is not a .csv (a checkpoint, a mask), is refused before any metric."
    from ds2net.errors import ParameterError
    a = random_cases(seed=12, n=2)
    old, ckpt = tmp_path / 'table.csv', tmp_path / 'best.pth'
    old.write_text('my table'); ckpt.write_bytes(b'weights')
    class Untouchable:  # a set that fails when it is evaluated: the check comes before
        def __iter__(self): raise AssertionError('evaluated before the output was checked')
    for csv, message in [(old, f"csv={str(old)!r} already exists: ds2net never replaces a file unless asked; pass "
                                "overwrite=True to replace it, or choose another csv"),
                         (ckpt, f"csv={str(ckpt)!r}: the metrics table is written as .csv; give a file name ending in .csv")]:
        with pytest.raises(ParameterError) as e: evaluation_table({'a': (Untouchable(), Untouchable())}, csv=csv)
        assert str(e.value) == message
    assert old.read_text() == 'my table' and ckpt.read_bytes() == b'weights'
    df = evaluation_table({'a': a}, csv=old, overwrite=True)
    np.testing.assert_allclose(pd.read_csv(old, index_col='dataset').values, df.values.astype(float), rtol=1e-12)

def test_evaluation_table_field_specificity_and_errors():
    a = random_cases(seed=14, n=2)
    assert (evaluation_table({'a': a}, field_specificity=True).loc['a', 'meanSpe']
            < evaluation_table({'a': a}).loc['a', 'meanSpe'])
    with pytest.raises(ValueError, match='non-empty mapping'): evaluation_table({})
    with pytest.raises(TypeError, match="test set 'x' must be"): evaluation_table({'x': 3})
    with pytest.raises(ValueError, match=r"test set 'y' lack the metrics \['maxSpe'\]"):
        evaluation_table({'y': {k: 0.5 for k in METRIC_NAMES[:-1]}})


def test_speed_100_images_352():
    "The issue asks for <= 20 s on 2 cores; a loose bound here so a busy CI machine does not fail it."
    yy, xx = np.mgrid[:352, :352]
    g = (yy - 170)**2 + (xx - 180)**2 < 70**2
    p = 1 / (1 + np.exp((np.hypot(yy - 175, xx - 172) - 70) / 6))
    t0 = time.perf_counter()
    res = evaluate_set([p] * 100, [g] * 100)
    assert time.perf_counter() - t0 < 60
    assert res['n'] == 100
