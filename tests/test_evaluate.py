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


# ------------------------------------------------------------------ evaluate_checkpoint: checked first, streamed (issue 16)

import warnings
import pandas as pd
import torch
import ds2net.evaluate
from ds2net.checkpoint import save_checkpoint
from ds2net.data import DatasetError, load_samples, write_example_layout
from ds2net.errors import ParameterError, WeightsError
from ds2net.evaluate import evaluate_checkpoint
from ds2net.metrics import METRIC_NAMES, SegmentationEvaluator
from ds2net.model import DS2Net, TINY_ENCODER
from support import md5


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    "An untrained tiny DS2Net saved with the library (64 px): enough to evaluate, quick to build."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'best.pth'
    return save_checkpoint(path, DS2Net(TINY_ENCODER, pretrained=False),
                           config=dict(size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))


@pytest.fixture
def nothing_predicted(monkeypatch):
    "Fail the test if a network is built or a prediction made."
    def built(*a, **k): raise AssertionError('a network was built or an image predicted before the checks')
    monkeypatch.setattr(ds2net.evaluate, 'load_model', built)
    monkeypatch.setattr(ds2net.evaluate, 'predict_probabilities', built)


def test_evaluate_csv_is_checked_before_any_work(tiny_checkpoint, tmp_path, nothing_predicted):
    "Item 2: never over a checkpoint, a mask or an old table; a folder or an unwritable place is found before the work."
    root = write_example_layout('pairs', tmp_path / 'set')
    mask = sorted((root / 'masks').iterdir())[0]
    old = tmp_path / 'old.csv'; old.write_text('my table')
    afile = tmp_path / 'afile'; afile.write_text('mine')
    before = {p: md5(p) for p in [tiny_checkpoint, mask, old, afile]}
    cases = [
        (tiny_checkpoint, f"csv={str(tiny_checkpoint)!r}: the metrics table is written as .csv; give a file name ending in .csv"),
        (mask, f"csv={str(mask)!r}: the metrics table is written as .csv; give a file name ending in .csv"),
        (root / 'masks' / 'new.csv', f"csv={str(root / 'masks' / 'new.csv')!r} is inside data={str(root)!r}, an input of this "
                                     "command: ds2net never writes into its inputs; choose another csv"),
        (tmp_path, f"csv={str(tmp_path)!r} is a folder: give the name of a file for the metrics table, e.g. "
                   f"{tmp_path / 'metrics.csv'}"),
        (old, f"csv={str(old)!r} already exists: ds2net never replaces a file unless asked; pass overwrite=True to replace "
              "it, or choose another csv"),
        (afile / 't.csv', f"csv={str(afile / 't.csv')!r}: {afile} is a file, so no folder can be made inside it; choose "
                          "another csv"),
    ]
    for csv, message in cases:
        with pytest.raises(ParameterError) as e: evaluate_checkpoint(tiny_checkpoint, str(root), csv=csv, device='cpu')
        assert str(e.value) == message and e.value.param == 'csv'
    assert {p: md5(p) for p in before} == before


def test_evaluate_overwrite_replaces_the_table(tiny_checkpoint, tmp_path):
    old = tmp_path / 'old.csv'; old.write_text('my table')
    table = evaluate_checkpoint(tiny_checkpoint, 'synthetic:polyp', csv=old, n_synthetic=3, device='cpu', overwrite=True)
    back = pd.read_csv(old, index_col=0)
    assert list(back.columns) == [*METRIC_NAMES, 'n'] and back['n'].tolist() == [3]
    np.testing.assert_allclose(back[list(METRIC_NAMES)].values, table[list(METRIC_NAMES)].values.astype(float), rtol=1e-12)
    made = tmp_path / 'new' / 'deeper'
    with pytest.raises(WeightsError, match='^ds2net checkpoint not found'):  # the folders made for the table are removed
        evaluate_checkpoint(tmp_path / 'none.pth', 'synthetic:polyp', csv=made / 't.csv', n_synthetic=1)
    assert not (tmp_path / 'new').exists()


def test_evaluate_arguments_are_checked_first(tiny_checkpoint, nothing_predicted):
    for kwargs, message in [(dict(bs=0), 'bs=0: the batch size must be a whole number of at least 1'),
                            (dict(n_synthetic=0), 'n_synthetic=0: a synthetic test set needs a whole number of at least 1 image'),
                            (dict(gt_threshold=255), 'gt_threshold=255: use a whole number from 0 to 254 (mask values above it '
                                                     'are foreground)')]:
        with pytest.raises(ParameterError) as e: evaluate_checkpoint(tiny_checkpoint, 'synthetic:polyp', **kwargs)
        assert str(e.value) == message


def _warning_of(fn):
    "The one warning `fn()` gives (all others are errors of the test)."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = fn()
    assert len(caught) == 1, [str(w.message) for w in caught]
    return str(caught[0].message), result


@pytest.mark.parametrize('kind', ['jpeg', '01_at_127'])
def test_evaluate_warns_about_masks_as_training_does(tiny_checkpoint, tmp_path, kind):
    "Item 8: JPEG masks read at threshold 0, or 0/1 masks read at 127 (every truth empty): the warning of training."
    root = write_example_layout('pairs', tmp_path / 'set')
    for m in sorted((root / 'masks').iterdir()):
        if kind == 'jpeg': Image.open(m).save(m.with_suffix('.jpg'), quality=75); m.unlink()
        else: write_png(m, (np.asarray(Image.open(m)) > 0).astype(np.uint8))
    threshold = 0 if kind == 'jpeg' else 127
    training, _ = _warning_of(lambda: load_samples(root, threshold=threshold))  # what `train` warns, by the same rule
    assert ('mask has' in training and 'grey levels (lossy JPEG or anti-aliased edges?)' in training if kind == 'jpeg' else
            'mask has non-zero pixels but none above threshold 127, so it counts as empty' in training), training
    message, table = _warning_of(lambda: evaluate_checkpoint(tiny_checkpoint, str(root), gt_threshold=threshold, device='cpu'))
    assert message == training
    assert table['n'].tolist() == [4]


def test_evaluate_checks_sizes_first_and_names_the_mask(tmp_path, tiny_checkpoint, nothing_predicted):
    "Item 14: a mask that is not its image's size is named, with advice in plain words, before any prediction."
    root = write_example_layout('pairs', tmp_path / 'set')
    mask = sorted((root / 'masks').iterdir())[2]
    Image.open(mask).resize((48, 40)).save(mask)
    image = root / 'images' / mask.name
    with pytest.raises(DatasetError) as e: evaluate_checkpoint(tiny_checkpoint, str(root), device='cpu')
    assert str(e.value) == (f"{root}: 1 error(s) in the data set (run `ds2net validate {root}` for the full report):\n"
                            f"  - {mask}: mask is 48x40 but its image {image} is 64x64; make them the same size (resize the "
                            "mask with nearest-neighbour) or remove the pair")


def test_evaluate_a_dsb2018_download_says_convert_it_first(tmp_path, tiny_checkpoint, nothing_predicted):
    "Item 14: one message, not one line per id."
    dsb = write_example_layout('dsb2018', tmp_path / 'dsb', n=40)
    with pytest.raises(ParameterError) as e: evaluate_checkpoint(tiny_checkpoint, ['synthetic:polyp', str(dsb)], device='cpu')
    assert e.value.param == 'data' and str(e.value) == (
        f"data={str(dsb)!r} is a DSB2018 download (one sub-folder per id, each holding images/ and masks/), not a test set "
        f"in the images/masks layout: convert it first (`ds2net convert --from dsb2018 {dsb} --out <new folder>`, or "
        "`convert_dsb2018` in Python) and evaluate the converted folder")


def test_evaluate_streams_one_batch_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    "Item 17: images are read, predicted and scored `bs` at a time; no list of every image or map is ever built."
    root = write_example_layout('pairs', tmp_path / 'set', n=5)
    expected = evaluate_checkpoint(tiny_checkpoint, str(root), bs=8, device='cpu')
    events, predict, step, read = [], ds2net.evaluate.predict_probabilities, SegmentationEvaluator.step, ds2net.evaluate.read_image
    monkeypatch.setattr(ds2net.evaluate, 'read_image', lambda p: events.append('read') or read(p))
    monkeypatch.setattr(ds2net.evaluate, 'predict_probabilities',
                        lambda model, images, *a, **k: events.append(f'predict {len(images)}') or predict(model, images, *a, **k))
    monkeypatch.setattr(SegmentationEvaluator, 'step', lambda self, *a, **k: events.append('score') or step(self, *a, **k))
    table = evaluate_checkpoint(tiny_checkpoint, str(root), bs=2, device='cpu')
    assert events == ['read', 'read', 'predict 2', 'score', 'score'] * 2 + ['read', 'predict 1', 'score']
    np.testing.assert_allclose(table[list(METRIC_NAMES)].values.astype(float),
                               expected[list(METRIC_NAMES)].values.astype(float), atol=1e-6)  # the same table
