"Tests of ds2net.data: synthetic sets, readers, layouts, validation, conversion, splits and DataLoaders."
import hashlib, pickle, time
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from fastai.data.block import DataBlock
from fastai.torch_core import TensorMask
from fastai.vision.augment import Resize
from fastai.vision.data import ImageBlock, MaskBlock
from PIL import Image
from scipy import ndimage

from ds2net.data import (SYNTHETIC_KINDS, make_polyp, make_ultrasound, make_nuclei, make_synthetic, write_synthetic,
                         read_image, read_mask, read_masks_union, find_pairs, find_test_sets, detect_layout,
                         validate_dataset, load_samples, DatasetError, convert_busi, convert_dsb2018,
                         GroupSplitter, segmentation_dls, write_example_layout, show_samples, synthetic_kind,
                         TensorBinaryMask, IMAGE_EXTS)
from ds2net.errors import ParameterError

# ---------------------------------------------------------------- helpers

def tree_digest(root):
    "Hash of every file's path and bytes under root (to prove user files are never modified)."
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob('*')):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file(): h.update(p.read_bytes())
    return h.hexdigest()

def save(arr, path, **kw):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(path, **kw)
    return path

def pairs_folder(root, n=4, size=32, seed=0, img_ext='.png', mask_ext='.png', names=None):
    "An images/masks folder of synthetic polyps."
    ims, mks = make_polyp(n, size=size, seed=seed)
    names = names or [f'img_{i}' for i in range(n)]
    for name, im, mk in zip(names, ims, mks):
        save(im, Path(root)/'images'/f'{name}{img_ext}')
        save(mk * np.uint8(255), Path(root)/'masks'/f'{name}{mask_ext}')
    return Path(root)

# ---------------------------------------------------------------- synthetic data

@pytest.mark.parametrize('kind', SYNTHETIC_KINDS)
def test_synthetic_shapes_dtypes_binary(kind):
    ims, mks = make_synthetic(kind, 6, size=48, seed=1)
    assert ims.shape == (6, 48, 48, 3) and ims.dtype == np.uint8
    assert mks.shape == (6, 48, 48) and mks.dtype == np.uint8
    assert set(np.unique(mks)) <= {0, 1}
    assert all(m.any() for m in mks), 'every synthetic image holds a lesion'
    assert all(m.mean() < 0.7 for m in mks)
    assert ims.std() > 5, 'images are not blank'

@pytest.mark.parametrize('kind', SYNTHETIC_KINDS)
def test_synthetic_deterministic_by_seed(kind):
    a, b = make_synthetic(kind, 5, size=40, seed=3), make_synthetic(kind, 5, size=40, seed=3)
    np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])
    c = make_synthetic(kind, 5, size=40, seed=4)
    assert not np.array_equal(a[0], c[0])
    longer = make_synthetic(kind, 9, size=40, seed=3)   # image i does not depend on n
    np.testing.assert_array_equal(longer[0][:5], a[0]); np.testing.assert_array_equal(longer[1][:5], a[1])

def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic kind 'xray': choose one of polyp, ultrasound, nuclei"):
        make_synthetic('xray', 2)
    with pytest.raises(ValueError, match='at least 1'): make_polyp(0)
    with pytest.raises(ValueError, match='at least 16'): make_nuclei(2, size=8)
    with pytest.raises(ValueError, match='from 0 \\(easy\\) to 1 \\(hard\\)'): make_ultrasound(2, difficulty=1.2)
    with pytest.raises(ValueError, match='seed=-1'): make_polyp(2, seed=-1)

def _contrast(ims, mks, shift=(0, 0)):
    "Mean over images of |mean inside - mean outside| of the grey image, with the mask shifted by `shift` pixels."
    out = []
    for im, mk in zip(ims.astype(np.float32).mean(-1), mks.astype(bool)):
        m = np.roll(mk, shift, axis=(0, 1))
        if m.any() and (~m).any(): out.append(abs(im[m].mean() - im[~m].mean()))
    return float(np.mean(out))

@pytest.mark.parametrize('kind', SYNTHETIC_KINDS)
def test_synthetic_masks_aligned_with_images(kind):
    ims, mks = make_synthetic(kind, 16, size=96, seed=2, difficulty=0.0)
    at_zero = _contrast(ims, mks)
    assert at_zero > 20, f'{kind}: lesions stand out from the background at difficulty 0 ({at_zero:.1f})'
    for shift in [(3, 0), (-3, 0), (0, 3), (0, -3)]:   # the mask is where the lesion is, not a few pixels off
        assert _contrast(ims, mks, shift) < at_zero

@pytest.mark.parametrize('kind', SYNTHETIC_KINDS)
def test_difficulty_knob_lowers_contrast(kind):
    easy = _contrast(*make_synthetic(kind, 24, size=64, seed=5, difficulty=0.0))
    hard = _contrast(*make_synthetic(kind, 24, size=64, seed=5, difficulty=1.0))
    assert hard < 0.75 * easy, f'{kind}: contrast {easy:.1f} at difficulty 0, {hard:.1f} at 1'

def test_polyp_variety():
    "Small and large polyps, sometimes more than one, some low-contrast."
    ims, mks = make_polyp(200, size=96, seed=0, difficulty=0.5)
    counts = np.array([ndimage.label(m)[1] for m in mks])
    areas = mks.reshape(len(mks), -1).mean(1)
    assert (counts >= 2).mean() > 0.1, 'several polyps in some images'
    assert (areas < 0.015).sum() >= 5 and (areas > 0.06).sum() >= 40, 'small and large polyps'
    per_image = [abs(im[m.astype(bool)].mean() - im[~m.astype(bool)].mean()) for im, m in zip(ims.astype(np.float32).mean(-1), mks)]
    assert np.quantile(per_image, 0.1) < 0.4 * np.median(per_image), 'some polyps barely differ from the tissue'

def _touching_share(mks):
    "Share of connected blobs with two or more separate peaks of the distance transform (touching nuclei)."
    multi = total = 0
    for m in mks:
        lab, k = ndimage.label(m)
        edt = ndimage.distance_transform_edt(m)
        peaks, _ = ndimage.label((edt == ndimage.maximum_filter(edt, size=3)) & (edt >= 2), structure=np.ones((3, 3)))
        for j in range(1, k + 1):
            total += 1; multi += len(np.unique(peaks[(lab == j) & (peaks > 0)])) >= 2
    return multi / total

def test_nuclei_many_and_touching():
    ims, mks = make_nuclei(10, size=128, seed=0)
    counts = [ndimage.label(m)[1] for m in mks]
    assert min(counts) >= 15, f'many nuclei per image ({counts})'
    assert _touching_share(mks) > 0.1, 'some nuclei touch'
    assert _touching_share(make_nuclei(10, size=128, seed=0, difficulty=1.0)[1]) > _touching_share(make_nuclei(10, size=128, seed=0, difficulty=0.0)[1])

def test_generation_speed():
    "1,000 images of 256x256 per kind; the docs quote the real figure (about 1.5-3 s per kind on 2 cores)."
    for kind in SYNTHETIC_KINDS:
        t = time.perf_counter()
        ims, mks = make_synthetic(kind, 1000, size=256, seed=0)
        dt = time.perf_counter() - t
        assert ims.shape == (1000, 256, 256, 3)
        assert dt < 30, f'{kind}: {dt:.1f} s for 1,000 images'

def test_write_synthetic_byte_identical(tmp_path):
    a = write_synthetic('polyp', tmp_path/'a', n=3, size=48, seed=11)
    b = write_synthetic('polyp', tmp_path/'b', n=3, size=48, seed=11)
    c = write_synthetic('polyp', tmp_path/'c', n=3, size=48, seed=12)
    assert a == tmp_path/'a'
    names = sorted(str(p.relative_to(a)) for p in a.rglob('*.png'))
    assert names == [f'{d}/polyp_0000{i}.png' for d in ('images', 'masks') for i in range(3)]
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)
    ims, mks = make_polyp(3, size=48, seed=11)
    np.testing.assert_array_equal(read_image(a/'images'/'polyp_00002.png'), ims[2])
    raw = np.asarray(Image.open(a/'masks'/'polyp_00002.png'))
    assert set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(raw // 255, mks[2])

def test_write_synthetic_refuses_a_folder_with_files(tmp_path):
    out = write_synthetic('nuclei', tmp_path/'s', n=2, size=32)
    before = tree_digest(out)
    with pytest.raises(FileExistsError, match='already holds files; choose an empty output folder or pass overwrite=True'):
        write_synthetic('nuclei', out, n=2, size=32, seed=1)
    assert tree_digest(out) == before
    write_synthetic('nuclei', out, n=2, size=32, seed=1, overwrite=True)
    assert tree_digest(out) != before

# ---------------------------------------------------------------- reading images and masks

def test_mask_formats(tmp_path):
    ref = make_polyp(1, size=40, seed=3)[1][0]
    pal = Image.new('P', (40, 40)); pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762); pal.putdata(list(ref.ravel()))
    forms = {'01.png': Image.fromarray(ref), '0255.png': Image.fromarray(ref * 255),
             'rgb.png': Image.fromarray(np.dstack([ref * 0, ref * 255, ref * 0])),   # green foreground
             'palette.png': pal, '16bit.png': Image.fromarray(ref.astype(np.uint16) * 65535),
             '16bit01.tif': Image.fromarray(ref.astype(np.uint16)), '0255.tif': Image.fromarray(ref * 255),
             'bool.png': Image.fromarray(ref.astype(bool)), '0255.bmp': Image.fromarray(ref * 255)}
    for name, im in forms.items():
        p = save(im, tmp_path/name)
        got = read_mask(p)
        assert got.dtype == np.uint8 and got.shape == (40, 40), name
        np.testing.assert_array_equal(got, ref, err_msg=name)
    assert Image.open(tmp_path/'16bit.png').mode.startswith('I')
    assert Image.open(tmp_path/'palette.png').mode == 'P'

def test_mask_threshold(tmp_path):
    p = save(np.array([[0, 5, 100, 128, 255]], np.uint8), tmp_path/'m.png')
    np.testing.assert_array_equal(read_mask(p), [[0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(read_mask(p, threshold=127), [[0, 0, 0, 1, 1]])
    p16 = save(np.array([[0, 5 * 257, 100 * 257, 128 * 257, 65535]], np.uint16), tmp_path/'m16.png')
    np.testing.assert_array_equal(read_mask(p16, threshold=127), [[0, 0, 0, 1, 1]])   # threshold scaled for 16-bit
    with pytest.raises(ValueError, match='threshold=300'): read_mask(p, threshold=300)

def test_jpeg_mask_with_threshold(tmp_path):
    ref = make_polyp(1, size=64, seed=4)[1][0]
    p = save(ref * 255, tmp_path/'m.jpg', quality=70)
    assert read_mask(p, threshold=127).astype(bool).__xor__(ref.astype(bool)).mean() < 0.01
    assert read_mask(p).sum() >= ref.sum()   # threshold 0 takes the compression noise as foreground

def test_images_made_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    got = read_image(save(grey, tmp_path/'g.png'))
    assert got.shape == (3, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, axis=2))
    rgba = np.dstack([np.full((3, 4), 10, np.uint8), np.full((3, 4), 20, np.uint8), np.full((3, 4), 30, np.uint8), np.zeros((3, 4), np.uint8)])
    got = read_image(save(rgba, tmp_path/'rgba.png'))
    assert got.shape == (3, 4, 3)
    np.testing.assert_array_equal(got[0, 0], [10, 20, 30])   # alpha dropped, not composited
    got = read_image(save(grey.astype(np.uint16) * 257, tmp_path/'g16.png'))
    np.testing.assert_array_equal(got[..., 0], grey)      # 16-bit scaled to 8
    rgb = make_polyp(1, size=16, seed=0)[0][0]
    np.testing.assert_array_equal(read_image(save(rgb, tmp_path/'x.tif')), rgb)
    np.testing.assert_array_equal(read_image(save(rgb, tmp_path/'x.bmp')), rgb)

def test_read_errors_name_the_file(tmp_path):
    good = save(np.zeros((64, 64, 3), np.uint8), tmp_path/'good.png')
    (tmp_path/'cut.png').write_bytes(good.read_bytes()[:60])
    (tmp_path/'text.png').write_text('hello')
    for name in ('cut.png', 'text.png'):
        with pytest.raises(DatasetError, match=f'{name}: cannot read this image .*replace it with a good copy'):
            read_image(tmp_path/name)
    with pytest.raises(DatasetError, match='cut.png: cannot read this mask'): read_mask(tmp_path/'cut.png')
    with pytest.raises(DatasetError, match='nothere.png: no such image file'): read_image(tmp_path/'nothere.png')
    assert issubclass(DatasetError, ValueError)

def test_union_of_masks_of_different_size_is_an_error(tmp_path):
    a = save(np.zeros((10, 10), np.uint8), tmp_path/'a.png'); b = save(np.zeros((10, 12), np.uint8), tmp_path/'b.png')
    with pytest.raises(DatasetError, match='b.png: mask is 12x10 but .*a.png is 10x10'): read_masks_union([a, b])

# ---------------------------------------------------------------- layouts

def test_pairs_with_tiff_and_jpg(tmp_path):
    root = pairs_folder(tmp_path/'clinic', n=3, img_ext='.tif', mask_ext='.tiff')
    ims, mks = make_polyp(3, size=32, seed=7)
    save(ims[0], root/'images'/'kv.jpg'); save(mks[0] * 255, root/'masks'/'kv.png')
    save(ims[1], root/'images'/'up.JPEG'); save(mks[1] * 255, root/'masks'/'up.bmp')
    pairs = find_pairs(root)
    assert [(i.name, m.name) for i, m in pairs] == [('img_0.tif', 'img_0.tiff'), ('img_1.tif', 'img_1.tiff'),
                                                    ('img_2.tif', 'img_2.tiff'), ('kv.jpg', 'kv.png'), ('up.JPEG', 'up.bmp')]
    np.testing.assert_array_equal(read_mask(root/'masks'/'img_1.tiff'), make_polyp(3, size=32, seed=0)[1][1])
    assert detect_layout(root) == 'pairs'
    assert validate_dataset(root).ok

def test_train_test_with_subfolders(tmp_path):
    root = write_example_layout('split', tmp_path/'polyps', n=4)
    assert detect_layout(root) == 'split'
    sets = find_test_sets(root)
    assert list(sets) == ['CVC-ClinicDB', 'Kvasir'] and sets['Kvasir'] == root/'test'/'Kvasir'
    assert find_test_sets(root/'test') == sets
    assert find_test_sets(root/'test'/'Kvasir') == {'Kvasir': root/'test'/'Kvasir'}
    r = validate_dataset(root)
    assert r.ok and r.layout == 'split'
    assert r.sets == {'train': 4, 'test/CVC-ClinicDB': 2, 'test/Kvasir': 2}
    assert (r.n_images, r.n_masks, r.n_pairs) == (8, 8, 8)
    # a test/ folder that is itself one images/masks set
    root2 = tmp_path/'simple'
    pairs_folder(root2/'train'); pairs_folder(root2/'test', n=2)
    assert find_test_sets(root2) == {'test': root2/'test'}
    assert validate_dataset(root2).sets == {'train': 4, 'test': 2}

def test_find_test_sets_errors(tmp_path):
    (tmp_path/'nothing').mkdir()
    with pytest.raises(DatasetError, match='nothing: no test set found'): find_test_sets(tmp_path/'nothing')
    with pytest.raises(DatasetError, match='no such folder'): find_test_sets(tmp_path/'missing')

def test_busi_union_and_normal_in_or_out(tmp_path):
    src = write_example_layout('busi', tmp_path/'BUSI', n=3, size=48)
    before = tree_digest(src)
    assert detect_layout(src) == 'busi'
    r = validate_dataset(src)
    assert r.ok and r.sets == {'benign': 3, 'malignant': 3, 'normal': 3}
    assert (r.n_images, r.n_masks, r.n_pairs, r.n_empty_masks) == (9, 11, 9, 3)
    r = validate_dataset(src, include_normal=False)
    assert r.sets == {'benign': 3, 'malignant': 3} and r.n_empty_masks == 0 and "left out" in r.summary()
    out = convert_busi(src, tmp_path/'busi_all')
    assert len(find_pairs(out)) == 9
    out = convert_busi(src, tmp_path/'busi_lesions', include_normal=False)
    pairs = find_pairs(out)
    assert [i.name for i, _ in pairs][:2] == ['benign (1).png', 'benign (2).png'] and len(pairs) == 6
    union = read_mask(src/'benign'/'benign (1)_mask.png') | read_mask(src/'benign'/'benign (1)_mask_1.png')
    assert read_mask(src/'benign'/'benign (1)_mask_1.png').any() and read_mask(src/'benign'/'benign (1)_mask.png').any()
    np.testing.assert_array_equal(read_mask(out/'masks'/'benign (1).png'), union)
    assert (out/'images'/'benign (1).png').read_bytes() == (src/'benign'/'benign (1).png').read_bytes()  # copied as is
    assert set(np.unique(np.asarray(Image.open(out/'masks'/'benign (1).png')))) == {0, 255}
    assert tree_digest(src) == before

def test_busi_more_masks_and_name_clash(tmp_path):
    src = tmp_path/'busi'
    ims, mks = make_ultrasound(2, size=32, seed=0)
    save(ims[0], src/'benign'/'case (1).png'); save(ims[1], src/'malignant'/'case (1).png')
    for k, suffix in enumerate(['_mask', '_mask_1', '_mask_2', '_mask_10']):
        m = np.zeros((32, 32), np.uint8); m[k * 8:(k + 1) * 8, :4] = 255
        save(m, src/'benign'/f'case (1){suffix}.png')
    save(mks[1] * 255, src/'malignant'/'case (1)_mask.png')
    samples = load_samples(src)
    assert [p.name for p in samples['benign'][0].masks] == ['case (1)_mask.png', 'case (1)_mask_1.png', 'case (1)_mask_2.png', 'case (1)_mask_10.png']
    out = convert_busi(src, tmp_path/'out')
    assert sorted(p.name for p in (out/'images').iterdir()) == ['benign_case (1).png', 'malignant_case (1).png']
    assert read_mask(out/'masks'/'benign_case (1).png')[:, :4].all()

def test_busi_missing_mask_and_orphan_mask(tmp_path):
    src = write_example_layout('busi', tmp_path/'BUSI', n=2, size=32)
    (src/'benign'/'benign (2)_mask.png').unlink()
    save(np.zeros((32, 32), np.uint8), src/'malignant'/'ghost_mask.png')
    r = validate_dataset(src)
    assert not r.ok
    assert any('benign (2).png: image has no mask; expected' in e and 'benign (2)_mask.png' in e for e in r.errors)
    assert any('ghost_mask.png: mask has no image' in e for e in r.errors)
    with pytest.raises(DatasetError, match='image has no mask'): convert_busi(src, tmp_path/'out')
    assert not (tmp_path/'out').exists(), 'nothing written when the source has errors'

def test_dsb2018_union(tmp_path):
    src = write_example_layout('dsb2018', tmp_path/'stage1_train', n=3, size=48)
    before = tree_digest(src)
    assert detect_layout(src) == 'dsb2018'
    r = validate_dataset(src)
    assert r.ok and r.n_pairs == 3 and r.n_masks > 20 and r.image_modes == {'RGBA': 3}
    out = convert_dsb2018(src, tmp_path/'dsb')
    _, mks = make_nuclei(3, size=48, seed=0)
    ids = sorted(p.name for p in src.iterdir())
    for i, id_ in enumerate(ids):
        assert len(list((src/id_/'masks').iterdir())) > 1
        np.testing.assert_array_equal(read_mask(out/'masks'/f'{id_}.png'), mks[i])
        assert read_image(out/'images'/f'{id_}.png').shape == (48, 48, 3)
    assert tree_digest(src) == before

def test_dsb2018_problems(tmp_path):
    src = write_example_layout('dsb2018', tmp_path/'dsb', n=3, size=32)
    ids = sorted(p.name for p in src.iterdir())
    for f in (src/ids[0]/'masks').iterdir(): f.unlink()
    save(np.zeros((16, 16), np.uint8), src/ids[1]/'masks'/'odd.png')
    r = validate_dataset(src, layout='dsb2018')
    assert any(f'{ids[0]}.png: image has no mask' in e for e in r.errors)
    assert any('odd.png: mask is 16x16 but its image' in e for e in r.errors)

def test_convert_errors(tmp_path):
    with pytest.raises(DatasetError, match='no such folder'): convert_busi(tmp_path/'none', tmp_path/'o')
    pairs = pairs_folder(tmp_path/'pairs')
    with pytest.raises(DatasetError, match="looks like the 'pairs' layout, not busi"): convert_busi(pairs, tmp_path/'o')
    with pytest.raises(DatasetError, match="not dsb2018"): convert_dsb2018(pairs, tmp_path/'o')
    busi = write_example_layout('busi', tmp_path/'busi', n=1, size=32)
    before = tree_digest(busi)
    with pytest.raises(ParameterError) as e: convert_busi(busi, busi/'converted')
    assert (e.value.param, str(e.value)) == ('out', f"out={str(busi/'converted')!r} is inside src={str(busi)!r}, an input of "
                                             f"this command: ds2net never writes into its inputs; choose another out")
    assert tree_digest(busi) == before
    convert_busi(busi, tmp_path/'c')
    with pytest.raises(FileExistsError, match='already holds files'): convert_busi(busi, tmp_path/'c')

# ---------------------------------------------------------------- bad input: a clear error, nothing silent

def _errors_of(root): r = validate_dataset(root); assert not r.ok; return r.errors

def test_image_without_mask(tmp_path):
    root = pairs_folder(tmp_path/'d'); (root/'masks'/'img_1.png').unlink()
    errs = _errors_of(root)
    assert len(errs) == 1 and 'img_1.png: image has no mask; expected' in errs[0] and 'Add its mask or move the image out' in errs[0]

def test_mask_without_image(tmp_path):
    root = pairs_folder(tmp_path/'d'); (root/'images'/'img_2.png').unlink()
    errs = _errors_of(root)
    assert len(errs) == 1 and 'img_2.png: mask has no image' in errs[0] and 'Add its image or move the mask out' in errs[0]

def test_unreadable_and_truncated_files(tmp_path):
    root = pairs_folder(tmp_path/'d', size=64)
    p = root/'images'/'img_0.png'; p.write_bytes(p.read_bytes()[:200])
    (root/'masks'/'img_3.png').write_bytes(b'not a png at all')
    errs = _errors_of(root)
    assert len(errs) == 2
    assert 'img_0.png: cannot read this image' in errs[0] and 'truncated' in errs[0]
    assert 'img_3.png: cannot read this mask' in errs[1] and 'replace it with a good copy or move it out' in errs[1]

def test_size_mismatch_is_reported(tmp_path):
    root = pairs_folder(tmp_path/'d')
    save(np.zeros((20, 30), np.uint8), root/'masks'/'img_1.png')
    errs = _errors_of(root)
    assert len(errs) == 1 and 'img_1.png: mask is 30x20 but its image' in errs[0] and 'is 32x32' in errs[0]
    assert validate_dataset(root).n_pairs == 3

def test_empty_folders(tmp_path):
    (tmp_path/'empty').mkdir()
    errs = _errors_of(tmp_path/'empty')
    assert errs == [f"{tmp_path/'empty'}: the folder is empty; put a data set there (see `ds2net synth` for a synthetic one)"]
    (tmp_path/'e2'/'images').mkdir(parents=True); (tmp_path/'e2'/'masks').mkdir()
    errs = _errors_of(tmp_path/'e2')
    assert any('images: no images found' in e for e in errs) and any('masks: no masks found' in e for e in errs)
    errs = _errors_of(tmp_path/'missing')
    assert errs == [f"{tmp_path/'missing'}: no such folder; check the path"]
    (tmp_path/'junk').mkdir(); (tmp_path/'junk'/'readme.txt').write_text('x')
    assert 'no known data set layout' in _errors_of(tmp_path/'junk')[0]

def test_empty_mask_is_counted_not_an_error(tmp_path):
    root = pairs_folder(tmp_path/'d')
    save(np.zeros((32, 32), np.uint8), root/'masks'/'img_0.png')
    r = validate_dataset(root)
    assert r.ok and r.n_empty_masks == 1 and 'empty masks: 1' in str(r)

def test_two_files_with_one_stem(tmp_path):
    root = pairs_folder(tmp_path/'d')
    save(np.zeros((32, 32, 3), np.uint8), root/'images'/'img_0.jpg')
    errs = _errors_of(root)
    assert len(errs) == 1 and "img_0.jpg and" in errs[0] and "img_0.png: 2 image files share the stem 'img_0'" in errs[0]
    root = pairs_folder(tmp_path/'e'); save(np.zeros((32, 32), np.uint8), root/'masks'/'img_1.tif')
    assert "2 mask files share the stem 'img_1'" in _errors_of(root)[0]

def test_non_image_files_ignored_and_listed(tmp_path):
    root = pairs_folder(tmp_path/'d')
    (root/'images'/'Thumbs.db').write_bytes(b'x'); (root/'masks'/'.DS_Store').write_bytes(b'x')
    (root/'masks'/'._img_0.png').write_bytes(b'macOS resource fork'); (root/'images'/'sub').mkdir()
    r = validate_dataset(root)
    assert r.ok and r.n_pairs == 4
    assert sorted(Path(p.rstrip('/')).name for p in r.ignored) == ['.DS_Store', '._img_0.png', 'Thumbs.db', 'sub']
    assert 'Thumbs.db' in str(r) and 'ignored (not image files) (4)' in str(r)

def test_names_with_spaces_and_non_ascii(tmp_path):
    root = pairs_folder(tmp_path/'données à voir', names=['a b', 'Pólipo nº 2', '息肉 3', 'x(1)'])
    r = validate_dataset(root)
    assert r.ok and r.n_pairs == 4
    assert {i.stem for i, _ in find_pairs(root)} == {'a b', 'Pólipo nº 2', '息肉 3', 'x(1)'}
    dls = segmentation_dls(root, size=32, bs=2, valid_pct=0.5)
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 3, 32, 32)

def test_jpeg_masks_warned(tmp_path):
    root = pairs_folder(tmp_path/'d', n=2, size=64, mask_ext='.jpg')
    r = validate_dataset(root)
    assert r.ok and len(r.warnings) == 2 and 'grey levels' in r.warnings[0] and 'threshold=127' in r.warnings[0]
    assert validate_dataset(root, threshold=127).warnings == []

def test_summary_lists_everything(tmp_path):
    root = pairs_folder(tmp_path/'d', n=3)
    (root/'masks'/'img_0.png').unlink(); (root/'images'/'notes.txt').write_text('x')
    s = validate_dataset(root).summary()
    for part in ['layout: pairs', 'images: 3', 'masks: 2', 'pairs: 2', 'empty masks: 0', '32x32 (2)', 'notes.txt',
                 'img_0.png: image has no mask', 'FAILED: 1 error']:
        assert part in s, part

def test_dataloaders_run_the_same_checks(tmp_path):
    root = pairs_folder(tmp_path/'d')
    (root/'masks'/'img_1.png').unlink(); save(np.zeros((8, 8), np.uint8), root/'masks'/'img_2.png')
    with pytest.raises(DatasetError) as e: segmentation_dls(root, size=32, bs=2)
    msg = str(e.value)
    assert 'img_1.png: image has no mask' in msg and 'img_2.png: mask is 8x8' in msg and 'ds2net validate' in msg
    assert len(e.value.problems) == 2

def test_user_files_never_modified(tmp_path):
    roots = [pairs_folder(tmp_path/'p'), write_example_layout('split', tmp_path/'s', n=3),
             write_example_layout('busi', tmp_path/'b', n=2, size=32), write_example_layout('dsb2018', tmp_path/'n', n=2, size=32)]
    before = [tree_digest(r) for r in roots]
    for r in roots:
        validate_dataset(r)
        dls = segmentation_dls(r, size=32, bs=1, valid_pct=0.4)
        dls.one_batch(); dls.valid.one_batch()
    convert_busi(roots[2], tmp_path/'bo'); convert_dsb2018(roots[3], tmp_path/'no')
    assert [tree_digest(r) for r in roots] == before

# ---------------------------------------------------------------- DataLoaders

def test_synthetic_dataloaders_batch(tmp_path):
    dls = segmentation_dls('synthetic:nuclei', size=64, bs=4, n=10, seed=0)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (8, 2)
    xb, yb = dls.one_batch()
    assert type(xb).__name__ == 'TensorImage' and xb.shape == (4, 3, 64, 64) and xb.dtype == torch.float32
    assert isinstance(yb, TensorMask) and type(yb) is TensorBinaryMask and yb.shape == (4, 64, 64) and yb.dtype == torch.int64
    assert set(yb.unique().tolist()) == {0, 1}
    assert -2.2 < xb.min() < 0 < xb.max() < 2.7   # ImageNet-normalised
    xv, yv = dls.valid.one_batch()
    ims, mks = make_nuclei(10, size=64, seed=0)
    idx = [int(s.name.split('_')[1]) for s in dls.valid_ds.items]
    np.testing.assert_array_equal(yv.numpy(), mks[idx])   # valid set: not augmented, same pixels
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(((xv[0] * std + mean) * 255).permute(1, 2, 0).numpy(), ims[idx[0]], atol=0.6)
    with pytest.raises(ValueError, match="use one of synthetic:polyp"): segmentation_dls('synthetic:cats')

def test_synthetic_dataloaders_small_and_fast():
    t = time.perf_counter()
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=12, seed=0)
    dls.one_batch()
    assert time.perf_counter() - t < 10

def test_folder_dataloaders_resize_and_batch(tmp_path):
    root = tmp_path/'d'
    ims, mks = make_polyp(5, size=80, seed=0)
    for i in range(5):   # different sizes and formats in one set
        im, mk = (ims[i][:60], mks[i][:60]) if i % 2 else (ims[i], mks[i])
        save(im, root/'images'/f'{i}.jpg' if i == 1 else root/'images'/f'{i}.png')
        save(mk * 255, root/'masks'/f'{i}.png')
    dls = segmentation_dls(root, size=48, bs=2, valid_pct=0.4, seed=0)
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 3, 48, 48) and yb.shape == (2, 48, 48) and set(yb.unique().tolist()) <= {0, 1}
    assert (len(dls.train_ds), len(dls.valid_ds)) == (3, 2)

def test_bs_larger_than_training_set(tmp_path):
    with pytest.raises(ValueError, match='bs=8 but the training set holds only 4 item'):
        segmentation_dls('synthetic:polyp', size=32, bs=8, n=5)

def test_validation_by_fraction_is_seeded(tmp_path):
    def valid_names(seed): return sorted(s.name for s in segmentation_dls('synthetic:polyp', size=32, bs=2, n=20, seed=seed, valid_pct=0.25).valid_ds.items)
    root = pairs_folder(tmp_path/'d', n=10)
    def folder_valid(seed): return sorted(s.name for s in segmentation_dls(root, size=32, bs=2, seed=seed, valid_pct=0.3).valid_ds.items)
    assert folder_valid(1) == folder_valid(1) and len(folder_valid(1)) == 3
    assert folder_valid(1) != folder_valid(2)
    assert len(valid_names(0)) == 5

def test_validation_by_folder(tmp_path):
    root = write_example_layout('split', tmp_path/'s', n=4)
    dls = segmentation_dls(root, size=32, bs=2, valid_folder='test')
    assert len(dls.train_ds) == 4 and {s.split for s in dls.train_ds.items} == {'train'}
    assert sorted(s.split for s in dls.valid_ds.items) == ['test/CVC-ClinicDB'] * 2 + ['test/Kvasir'] * 2
    dls = segmentation_dls(root, size=32, bs=2, valid_folder='test/Kvasir')
    assert {s.split for s in dls.valid_ds.items} == {'test/Kvasir'}
    dls = segmentation_dls(root, size=32, bs=2, valid_pct=0.25)   # no valid/ folder: a fraction of train, test untouched
    assert {s.split for s in dls.valid_ds.items} == {'train'} and len(dls.valid_ds) == 1 and len(dls.train_ds) == 3
    pairs_folder(root/'valid', n=2, seed=9)
    dls = segmentation_dls(root, size=32, bs=2)   # a valid/ folder is used when there is one
    assert {s.split for s in dls.valid_ds.items} == {'valid'} and len(dls.train_ds) == 4
    with pytest.raises(ValueError, match="valid_folder='tset': .* has no such folder"): segmentation_dls(root, size=32, bs=2, valid_folder='tset')
    with pytest.raises(ValueError, match='group_fn splits one set by group, but .* has a validation folder \\(valid\\)'):
        segmentation_dls(root, size=32, bs=2, group_fn=lambda p: p.stem)
    with pytest.raises(ValueError, match='needs a root with train/'): segmentation_dls(root/'train', size=32, bs=2, valid_folder='test')

def test_group_splitter_keeps_groups_together():
    files = [Path(f'/data/seq{v:02d}_frame{f:03d}.png') for v in range(12) for f in range(3 + v % 4)]
    group = lambda p: p.name.split('_')[0]
    for seed in range(5):
        s = GroupSplitter(group, valid_pct=0.25, seed=seed)
        train, valid = s(files)
        assert sorted(train + valid) == list(range(len(files)))
        tg, vg = {group(files[i]) for i in train}, {group(files[i]) for i in valid}
        assert not tg & vg and tg and vg
        assert len(valid) >= 0.25 * len(files)
    assert GroupSplitter(group, 0.25, seed=3)(files) == GroupSplitter(group, 0.25, seed=3)(files)
    with pytest.raises(ValueError, match="all in group 'same'; check group_fn"): GroupSplitter(lambda p: 'same')(files)
    with pytest.raises(ValueError, match='valid_pct=1.5'): GroupSplitter(group, valid_pct=1.5)

def test_group_split_in_dataloaders(tmp_path):
    names = [f'patient{p}_img{i}' for p in range(5) for i in range(3)]
    root = pairs_folder(tmp_path/'d', n=15, names=names)
    seen = []
    def patient(path): seen.append(path); return path.name.split('_')[0]
    dls = segmentation_dls(root, size=32, bs=2, group_fn=patient, valid_pct=0.2, seed=0)
    assert all(isinstance(p, Path) and p.parent.name == 'images' for p in seen)
    tp = {s.name.split('_')[0] for s in dls.train_ds.items}; vp = {s.name.split('_')[0] for s in dls.valid_ds.items}
    assert not tp & vp and len(vp) >= 1 and len(dls.valid_ds) % 3 == 0

def test_augmentation_moves_image_and_mask_together(tmp_path):
    "Images are their own masks (white on black): after flips, rotation and zoom the two must still coincide."
    root = tmp_path/'d'
    rng = np.random.default_rng(0)
    originals = []
    for i in range(8):
        m = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(8, 30, 2)
        m[y:y + 24, x:x + 8] = 1; m[y + 16:y + 24, x:x + 24] = 1   # an 'L': not symmetric
        originals.append(m)
        save(np.repeat(m[..., None] * 255, 3, axis=2).astype(np.uint8), root/'images'/f'{i}.png'); save(m * 255, root/'masks'/f'{i}.png')
    torch.manual_seed(0)
    dls = segmentation_dls(root, size=64, bs=4, valid_pct=0.25, seed=0, aug_kwargs=dict(p_affine=1.0))
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    changed = 0
    for _ in range(3):
        xb, yb = dls.train.one_batch()
        for x, y in zip(xb, yb):
            img = ((x * std + mean).mean(0) > 0.5).numpy()
            agree = (img == y.numpy().astype(bool)).mean()
            assert agree > 0.97, f'image and mask disagree on {1 - agree:.1%} of pixels'
            changed += not any(np.array_equal(y.numpy(), o) for o in originals)
    assert changed >= 6, 'augmentation did transform the masks'

def test_busi_and_dsb_read_directly(tmp_path):
    busi = write_example_layout('busi', tmp_path/'b', n=4, size=32)
    dls = segmentation_dls(busi, size=32, bs=2, include_normal=False, valid_pct=0.25)
    assert len(dls.train_ds) + len(dls.valid_ds) == 8
    dsb = write_example_layout('dsb2018', tmp_path/'n', n=4, size=32)
    dls = segmentation_dls(dsb, size=32, bs=2, valid_pct=0.25)
    xb, yb = dls.valid.one_batch()
    _, mks = make_nuclei(4, size=32, seed=0)
    ids = sorted(p.name for p in dsb.iterdir())
    for s, y in zip(dls.valid_ds.items, yb): np.testing.assert_array_equal(y.numpy(), mks[ids.index(s.name)])

def test_show_batch_draws_mask_overlays():
    dls = segmentation_dls('synthetic:polyp', size=32, bs=4, n=8)
    plt.close('all')
    dls.show_batch(max_n=4)
    fig = plt.gcf()
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 4 and all(len(ax.images) == 2 for ax in drawn), 'each image with its mask on top'
    plt.close('all')
    ims, mks = make_polyp(3, size=32)
    fig = show_samples(ims, mks, ncols=3)
    assert len(fig.axes) == 3 and all(len(ax.images) == 2 for ax in fig.axes)
    plt.close(fig)

def test_dataloaders_can_be_pickled_empty():
    "Learner.export pickles `dls.new_empty()`: the getters must be picklable and the images not travel with it."
    dls = segmentation_dls('synthetic:polyp', size=32, bs=2, n=6)
    blob = pickle.dumps(dls.new_empty())
    assert len(blob) < 200_000

# ---------------------------------------------------------------- the package: four modules, one namespace

def test_data_package_reexports_its_three_modules():
    "`from ds2net.data import X` reaches every public name of data.loaders, data.synthetic, data.folders and data.validation."
    import importlib
    import ds2net.data as data
    mods = [importlib.import_module(f'ds2net.data.{m}') for m in ('loaders', 'synthetic', 'folders', 'validation')]
    names = [n for m in mods for n in m.__all__]
    assert sorted(data.__all__) == sorted(names) and len(set(names)) == len(names)
    for m in mods:
        for n in m.__all__: assert getattr(data, n) is getattr(m, n), n
    assert data.segmentation_dls.__module__ == 'ds2net.data.loaders'
    assert not (Path(data.__file__).parent.parent/'data.py').exists()   # the old single module is gone


# ---------------------------------------------------------------- one rule in one place, errors that name parameters

def test_synthetic_sources_are_read_by_one_function():
    assert [synthetic_kind(s) for s in ('synthetic:polyp', 'synthetic:ultrasound', 'synthetic:nuclei', 'runs/kvasir', None)] == \
        ['polyp', 'ultrasound', 'nuclei', None, None]
    with pytest.raises(ParameterError) as e: synthetic_kind('synthetic:polyps')
    assert e.value.param == 'data' and str(e.value) == ("data='synthetic:polyps': use one of synthetic:polyp, "
                                                        "synthetic:ultrasound, synthetic:nuclei or a folder")
    with pytest.raises(ParameterError) as e: segmentation_dls('synthetic:cats')
    assert e.value.param == 'source' and str(e.value).startswith("source='synthetic:cats': use one of synthetic:polyp")

def test_image_extensions_are_the_files_modules_list():
    import ds2net.files
    assert IMAGE_EXTS is ds2net.files.IMAGE_EXTS

def test_bad_arguments_name_their_parameter(tmp_path):
    "Each refusal is a ParameterError that says which argument was wrong, as Python writes it."
    cases = [(lambda: make_polyp(0), 'n', 'n=0: the number of images must be a whole number of at least 1'),
             (lambda: make_polyp(2, size=8), 'size', 'size=8: the image side must be a whole number of pixels, at least 16'),
             (lambda: make_polyp(2, seed=-1), 'seed', 'seed=-1: the seed must be a whole number, 0 or more'),
             (lambda: make_polyp(2, difficulty=float('nan')), 'difficulty', 'difficulty=nan: the difficulty must be a number from 0 (easy) to 1 (hard)'),
             (lambda: make_synthetic('xray', 2), 'kind', "unknown synthetic kind 'xray': choose one of polyp, ultrasound, nuclei"),
             (lambda: read_mask(tmp_path/'m.png', threshold=255), 'threshold',
              'threshold=255: use a whole number from 0 to 254 (mask values above it are foreground)'),
             (lambda: validate_dataset(tmp_path, layout='voc'), 'layout', "layout='voc': choose one of pairs, split, sets, busi, dsb2018 (or None to detect it)"),
             (lambda: GroupSplitter(valid_pct=0), 'valid_pct', 'valid_pct=0: use a fraction between 0 and 1, e.g. 0.2')]
    for f, param, message in cases:
        with pytest.raises(ParameterError) as e: f()
        assert (e.value.param, str(e.value)) == (param, message)

def test_write_synthetic_refuses_bad_outputs_before_any_work(tmp_path):
    afile = tmp_path/'afile'; afile.write_text('mine')
    with pytest.raises(ParameterError) as e: write_synthetic('polyp', afile, n=2, size=32)
    assert e.value.param == 'out' and str(e.value) == f"out={str(afile)!r} is a file, not a folder: give a folder to write the data set into"
    with pytest.raises(ParameterError, match='n=0'): write_synthetic('polyp', tmp_path/'new', n=0)
    assert afile.read_text() == 'mine' and not (tmp_path/'new').exists()

def test_show_batch_is_registered_for_ds2nets_masks_only():
    "Importing ds2net leaves fastai's drawing of a plain fastai MaskBlock DataLoader as it was."
    ds2 = segmentation_dls('synthetic:polyp', size=32, bs=4, n=8, seed=0)
    plain = DataBlock(blocks=(ImageBlock, MaskBlock(codes=['background', 'foreground'])), get_x=lambda s: s.image,
                      get_y=lambda s: s.masks, item_tfms=Resize(32)).dataloaders(ds2.train_ds.items, bs=4, device='cpu')
    assert type(plain.one_batch()[1]) is TensorMask and type(ds2.one_batch()[1]) is TensorBinaryMask
    plt.close('all')
    plain.show_batch(max_n=4)
    fig = plt.gcf()   # fastai's: the mask painted with its colour map over the whole image; no outline, no legend
    assert [(len(ax.images), ax.images[-1].get_cmap().name, len(ax.collections)) for ax in fig.axes] == [(2, 'tab20', 0)] * 4
    assert not fig.legends
    plt.close('all')
    ds2.show_batch(max_n=4)
    fig = plt.gcf()   # ds2net's: a translucent RGBA fill and an outline, and a legend naming the ground truth
    assert all(ax.images[-1].get_array().shape == (32, 32, 4) and len(ax.collections) == 1 for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ['ground truth']
    plt.close('all')


def test_reading_or_checking_a_data_set_imports_no_fastai_or_torch():
    "`ds2net validate` and the readers start fast: fastai comes with the DataLoaders, torch with the generators."
    import subprocess, sys
    code = ('import sys, ds2net.data.validation, ds2net.data as d; d.read_mask; d.validate_dataset\n'
            'print(sorted({m.split(".")[0] for m in sys.modules} & {"fastai", "torch", "matplotlib"}))\n'
            'd.segmentation_dls; print("fastai" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ['[]', 'True']


# ---------------------------------------------------------------- issue 16 (items 3, 6, 7, 9, 16): data safety
from ds2net.cli import main
from ds2net.data import convert_dataset


def test_convert_never_writes_into_its_source_nor_holds_it(tmp_path, capsys):
    "Item 6: `convert --from dsb2018 cvx/images --out cvx --overwrite` wrote into its source; both directions are refused."
    src = write_example_layout('dsb2018', tmp_path/'cvx'/'images', n=3, size=32)
    before = tree_digest(tmp_path/'cvx')
    assert main(['convert', '--from', 'dsb2018', str(src), '--out', str(tmp_path/'cvx'), '--overwrite']) == 1
    assert capsys.readouterr().err == (f"ds2net convert: error: --out {tmp_path/'cvx'} contains src={str(src)!r}, an input of "
                                       f"this command: ds2net keeps its outputs and inputs apart; choose another --out\n")
    assert main(['convert', '--from', 'dsb2018', str(src), '--out', str(src/'x'), '--overwrite']) == 1
    assert capsys.readouterr().err == (f"ds2net convert: error: --out {src/'x'} is inside src={str(src)!r}, an input of "
                                       f"this command: ds2net never writes into its inputs; choose another --out\n")
    (tmp_path/'out').mkdir(); (tmp_path/'out'/'images').symlink_to(src)  # into the source through a link: refused too
    with pytest.raises(ParameterError) as e: convert_dsb2018(src, tmp_path/'out', overwrite=True)
    assert str(e.value) == (f"out={str(tmp_path/'out'/'images')!r} is src={str(src)!r} itself, an input of this command: "
                            f"ds2net never writes over its inputs; choose another out")
    assert tree_digest(tmp_path/'cvx') == before


def test_convert_never_writes_through_a_link(tmp_path):
    "Item 3 (convert): a link in the output named like a file to write is refused, and the file it points to kept."
    busi = write_example_layout('busi', tmp_path/'busi', n=1, size=32)
    victim = save(np.full((32, 32), 7, np.uint8), tmp_path/'victim.png'); before = victim.read_bytes()
    (tmp_path/'out'/'masks').mkdir(parents=True); (tmp_path/'out'/'masks'/'benign (1).png').symlink_to(victim)
    with pytest.raises(ParameterError) as e: convert_busi(busi, tmp_path/'out', overwrite=True)
    assert (e.value.param, str(e.value)) == ('out', f"out={str(tmp_path/'out'/'masks')!r} holds symbolic links of the names "
                                             f"to write (benign (1).png): ds2net never writes through a link, not even with "
                                             f"overwrite=True; remove them or choose another out")
    assert victim.read_bytes() == before and not (tmp_path/'out'/'images').exists()


def test_convert_gives_every_image_its_own_name_and_counts_what_it_wrote(tmp_path):
    "Item 7: 11 images in, 10 out, success reported; now 11 in, 11 out, each with its own mask, the renamed one said."
    src = write_example_layout('busi', tmp_path/'busi', n=3, size=32)  # 9 images
    ims, mks = make_ultrasound(2, size=32, seed=5)
    save(ims[0], src/'malignant'/'benign (1).png'); save(mks[0] * 255, src/'malignant'/'benign (1)_mask.png')  # a duplicate name...
    save(ims[1], src/'benign'/'malignant_benign (1).png')                                                      # ...and the name it
    save(mks[1] * 255, src/'benign'/'malignant_benign (1)_mask.png')                                           # would be renamed to
    conv = convert_dataset('busi', src, tmp_path/'out')
    names = sorted(p.name for p in (tmp_path/'out'/'images').iterdir())
    assert conv.n_written == 11 == len(names) == len({n.casefold() for n in names}) == len(list((tmp_path/'out'/'masks').iterdir()))
    assert conv.renamed == [('benign/benign (1).png', 'benign_benign (1).png'),
                            ('malignant/benign (1).png', 'malignant_benign (1)_2.png')]
    assert (tmp_path/'out'/'images'/'malignant_benign (1).png').read_bytes() == (src/'benign'/'malignant_benign (1).png').read_bytes()
    assert (tmp_path/'out'/'images'/'malignant_benign (1)_2.png').read_bytes() == (src/'malignant'/'benign (1).png').read_bytes()
    np.testing.assert_array_equal(read_mask(tmp_path/'out'/'masks'/'malignant_benign (1)_2.png'), mks[0])
    assert str(conv) == (f"11 images and their masks written to {tmp_path/'out'} (2 renamed so that no two share a name: "
                         f"benign/benign (1).png as benign_benign (1).png, malignant/benign (1).png as malignant_benign (1)_2.png)")
    assert validate_dataset(tmp_path/'out').n_pairs == 11
    case = write_example_layout('busi', tmp_path/'case', n=1, size=32)  # names that differ only in case: one file on macOS
    for suffix in ('', '_mask', '_mask_1'): (case/'benign'/f'benign (1){suffix}.png').rename(case/'benign'/f'Benign (1){suffix}.png')
    save(ims[0], case/'malignant'/'benign (1).png'); save(mks[0] * 255, case/'malignant'/'benign (1)_mask.png')
    conv = convert_dataset('busi', case, tmp_path/'case_out', include_normal=False)
    assert conv.n_written == 3 and sorted(p.name for p in (tmp_path/'case_out'/'masks').iterdir()) == \
        ['benign_Benign (1).png', 'malignant (1).png', 'malignant_benign (1).png']


def masks_as(root, f):
    "Rewrite every mask of an images/masks folder as f(mask as read, 0/1)."
    for p in sorted((root/'masks').iterdir()): save(f(read_mask(p)), p)
    return root


def test_validate_warns_when_the_masks_cannot_be_the_ground_truth(tmp_path, capsys):
    "Item 9: `validate` said 'OK: ready for training' for all-empty, all-full and inverted masks; now it warns, saying what to check."
    d16 = lambda name: write_synthetic('polyp', tmp_path/name, n=16, size=64)
    assert main(['validate', str(d16('d16'))]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == '  OK: ready for training'
    cases = {
        'empty': (lambda m: np.zeros_like(m), [], "every mask is empty: none of the 16 masks has a pixel above threshold 0, so a "
                  "network trained on them learns to predict nothing. Check that the masks folder holds the ground truth and "
                  "not blank images"),
        'zero_one': (lambda m: m, ['--threshold', '127'], "every mask is empty: none of the 16 masks has a pixel above threshold "
                     "127, so a network trained on them learns to predict nothing. Check that the masks folder holds the "
                     "ground truth, and the threshold: masks stored as 0/1 (or with values up to 127) are empty at "
                     "threshold=127; use threshold=0 for them"),
        'full': (lambda m: np.full_like(m, 255), [], "every mask is full: every pixel of the 16 masks is above threshold 0, so "
                 "there is nothing to segment. Check the threshold (a background stored as a low value, e.g. 1, or JPEG noise, "
                 "is foreground at threshold=0: try threshold=127) and whether the masks are inverted (objects black on white)"),
        'inverted': (lambda m: (1 - m) * 255, [], None)}
    for name, (f, extra, message) in cases.items():
        root = masks_as(d16(name), f)
        assert main(['validate', str(root), *extra]) == 0, name
        out = capsys.readouterr().out
        report = validate_dataset(root, threshold=int(extra[1]) if extra else 0)
        if name == 'inverted':
            fg = report.foreground
            assert 0.85 < fg < 0.95 and f'foreground: {fg:.1%} of the pixels' in out
            message = (f"the masks look inverted: on average {fg:.0%} of a mask's pixels are foreground (16 of 16 masks are "
                       f"more than half foreground), while the objects to segment usually cover less of an image than the "
                       f"background. If the masks mark the background in white, invert them (255 minus each value) before "
                       f"training; check the threshold too (values above 0 are foreground). If the objects really are that "
                       f"large, ignore this warning")
        assert report.ok and report.warnings[-1] == message and f'    - {message}\n' in out, name
        k = len(report.warnings)
        assert out.splitlines()[-1] == f"  OK: no errors, but read the {k} warning{'s' if k > 1 else ''} above before training"
        assert 'ready for training' not in out
        with pytest.warns(UserWarning, match=r'warning\(s\), e\.g\. '):  # train warns too (load_samples)
            load_samples(root, threshold=int(extra[1]) if extra else 0)
    assert (validate_dataset(tmp_path/'empty').n_empty_masks, validate_dataset(tmp_path/'full').n_full_masks) == (16, 16)


def test_dataloaders_refuse_bad_arguments_at_the_boundary(tmp_path):
    "Item 16: `segmentation_dls(bs=0)` raised ZeroDivisionError and `size=64.5` a TypeError (folders); now a ParameterError naming each."
    folder = pairs_folder(tmp_path/'d', n=8)
    cases = [(dict(bs=0), 'bs', 'bs=0: the batch size must be a whole number of at least 1'),
             (dict(bs=2.0), 'bs', 'bs=2.0: the batch size must be a whole number of at least 1'),
             (dict(size=64.5), 'size', 'size=64.5: the image side must be a whole number of pixels, at least 16'),
             (dict(size=True), 'size', 'size=True: the image side must be a whole number of pixels, at least 16'),
             (dict(seed=1.5), 'seed', 'seed=1.5: the seed must be a whole number, 0 or more'),
             (dict(num_workers=-1), 'num_workers', 'num_workers=-1: the number of DataLoader worker processes must be a whole '
                                                   'number, 0 or more (0 loads the batches in the main process)'),
             (dict(valid_pct='0.2'), 'valid_pct', "valid_pct='0.2': use a fraction between 0 and 1, e.g. 0.2")]
    for source in ('synthetic:polyp', folder):
        for kwargs, param, message in cases:
            with pytest.raises(ParameterError) as e: segmentation_dls(source, **{'size': 32, 'bs': 2, 'n': 8, **kwargs})
            assert (e.value.param, str(e.value)) == (param, message), (source, kwargs)
    with pytest.raises(ParameterError) as e: segmentation_dls('synthetic:polyp', size=32, bs=1, n=1)
    assert (e.value.param, str(e.value)) == ('n', 'n=1: a synthetic set needs a whole number of at least 2 images (some to '
                                                  'train on, some to validate on)')
