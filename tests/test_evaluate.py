"""Evaluation from files: prediction PNGs against masks matched by stem, masks read by the rule training uses."""
import numpy as np
import pytest
from PIL import Image

from ds2net.metrics import evaluate_set, resize_prediction
from ds2net.evaluate import check_data_source, evaluate_folders, read_gt
from support import blob, write_png


def make_folders(tmp_path, n=3):
    rng = np.random.default_rng(15)
    pdir, gdir = tmp_path / 'pred', tmp_path / 'gt'
    pdir.mkdir(); gdir.mkdir()
    preds, gts = [], []
    for i in range(n):
        g = blob((30, 40), rng.integers(10, 20, 2), rng.integers(5, 9))
        u = (np.clip(0.7 * resize_prediction(g.astype(float), (20, 20)) + 0.3 * rng.random((20, 20)), 0, 1)
             * 255).astype(np.uint8)
        write_png(pdir / f'img{i}.png', u)
        write_png(gdir / f'img{i}.png', g.astype(np.uint8) * 255)
        preds.append(u); gts.append(g)
    return pdir, gdir, preds, gts


def test_evaluate_folders_matches_arrays(tmp_path):
    pdir, gdir, preds, gts = make_folders(tmp_path)
    before = {f: f.read_bytes() for f in [*pdir.iterdir(), *gdir.iterdir()]}
    res = evaluate_folders(pdir, gdir)
    want = evaluate_set([resize_prediction(u, g.shape) for u, g in zip(preds, gts)], gts)
    assert res == pytest.approx(want, abs=1e-12)
    assert {f: f.read_bytes() for f in [*pdir.iterdir(), *gdir.iterdir()]} == before  # files untouched


def test_evaluate_folders_unmatched_files_are_named(tmp_path):
    pdir, gdir, _, _ = make_folders(tmp_path)
    (pdir / 'img0.png').rename(pdir / 'lonely.png')
    with pytest.raises(ValueError) as e: evaluate_folders(pdir, gdir)
    msg = str(e.value)
    assert 'lonely.png' in msg and 'no mask' in msg and 'img0.png' in msg and 'no prediction' in msg


def test_evaluate_folders_masks_and_file_errors(tmp_path):
    pdir, gdir, preds, gts = make_folders(tmp_path)
    # a JPEG mask has in-between values: an error naming the file, unless gt_threshold is given
    (gdir / 'img1.png').unlink()
    Image.fromarray(gts[1].astype(np.uint8) * 255).save(gdir / 'img1.jpg', quality=60)
    jpg = np.asarray(Image.open(gdir / 'img1.jpg'))
    assert len(np.unique(jpg)) > 2
    with pytest.raises(ValueError, match=r'img1.jpg is not binary.*gt_threshold=127'): evaluate_folders(pdir, gdir)
    res = evaluate_folders(pdir, gdir, gt_threshold=127)  # mask > 127, the rule of training: the same as >= 128
    gts2 = [gts[0], jpg >= 128, gts[2]]
    np.testing.assert_array_equal(read_gt(gdir / 'img1.jpg', 127), jpg >= 128)
    assert res == pytest.approx(evaluate_set([resize_prediction(u, g.shape) for u, g in zip(preds, gts2)], gts2))
    # two masks with one stem
    write_png(gdir / 'img1.png', gts[1].astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="share the stem 'img1'"): evaluate_folders(pdir, gdir, gt_threshold=127)
    (gdir / 'img1.jpg').unlink()
    # predictions must be PNG and grayscale
    Image.fromarray(preds[0]).save(pdir / 'img0.jpg')
    with pytest.raises(ValueError, match=r'img0.jpg in pred_dir: predictions must be saved as PNG'):
        evaluate_folders(pdir, gdir)
    (pdir / 'img0.jpg').unlink()
    rgb = np.stack([preds[0], preds[0] // 2, preds[0]], -1)
    write_png(pdir / 'img0.png', rgb)
    with pytest.raises(ValueError, match='img0.png is a colour image'): evaluate_folders(pdir, gdir)
    with pytest.raises(FileNotFoundError, match='is not a directory'): evaluate_folders(tmp_path / 'nope', gdir)


def test_evaluate_folders_reads_16bit_and_grey_rgb_predictions(tmp_path):
    pdir, gdir, preds, gts = make_folders(tmp_path, n=2)
    ref = evaluate_folders(pdir, gdir)
    write_png(pdir / 'img0.png', np.stack([preds[0]] * 3, -1))  # grey stored as RGB
    write_png(pdir / 'img1.png', preds[1].astype(np.uint16) * 257)  # 16-bit, same values
    assert evaluate_folders(pdir, gdir) == pytest.approx(ref, abs=1e-12)


def test_read_gt_keeps_binary_masks_whatever_the_threshold(tmp_path):
    g = blob((10, 12), (5, 6), 3)
    write_png(tmp_path / 'm01.png', g.astype(np.uint8))  # a 0/1 mask: thresholding it at 128 would empty it
    np.testing.assert_array_equal(read_gt(tmp_path / 'm01.png', gt_threshold=128), g)
    mixed = g.astype(np.uint8) * 255
    mixed[0, 0] = 1
    write_png(tmp_path / 'mixed.png', mixed)
    with pytest.raises(ValueError, match='mixed.png mixes the values 1 and 255'):
        read_gt(tmp_path / 'mixed.png', gt_threshold=128)


def test_one_mask_rule_at_the_boundary(tmp_path):
    "`gt_threshold` means what `--threshold` means in training and validation: foreground is a value above it."
    from ds2net.data import read_mask
    mask = np.array([[0, 126, 127], [128, 129, 255]], np.uint8)
    write_png(tmp_path / 'm.png', mask)
    expected = mask > 127
    np.testing.assert_array_equal(read_gt(tmp_path / 'm.png', gt_threshold=127), expected)   # 127 itself is background
    np.testing.assert_array_equal(read_mask(tmp_path / 'm.png', threshold=127).astype(bool), expected)
    np.testing.assert_array_equal(read_gt(tmp_path / 'm.png', gt_threshold=128), mask > 128)
    write_png(tmp_path / 'm16.png', mask.astype(np.uint16) * 257)                              # a 16-bit mask: the same rule
    np.testing.assert_array_equal(read_gt(tmp_path / 'm16.png', gt_threshold=127), expected)


def test_check_data_source_names_the_parameter(tmp_path):
    from ds2net.errors import ParameterError
    with pytest.raises(ParameterError, match=rf"^data='{tmp_path / 'none'}': no such folder; give a data folder") as e:
        check_data_source(str(tmp_path / 'none'))
    assert e.value.param == 'data'
    with pytest.raises(ParameterError, match=r"^test_set='synthetic:x': use one of synthetic:polyp"):
        check_data_source('synthetic:x', 'test_set')
    assert check_data_source(str(tmp_path)) is None and check_data_source('synthetic:polyp') == 'polyp'
