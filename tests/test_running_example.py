"""The running example's cache: trained once, loaded after, retrained when the recipe, the version or the entry changes.

Every test uses a tiny recipe (32×32 images, one epoch) in a temporary cache, so each training takes seconds."""
import json, subprocess, sys

import numpy as np
import pytest
import torch

from ds2net.errors import ParameterError, ParameterExistsError
from ds2net.inference import predict_probabilities
from ds2net.model import DS2Net
from ds2net.running_example import (RECIPE, CACHE_ENV, MANIFEST, CHECKPOINT, recipe_with, recipe_key, cache_root,
                                    entry_folder, entry_problem, held_out_set, held_out_dice, running_example,
                                    mask_regions, mask_region_means)

TINY = dict(size=32, n_synthetic=20, bs=4, epochs=1, n_test=4)


@pytest.fixture(autouse=True)
def no_env_cache(monkeypatch):
    "No test depends on the caller's DS2NET_CACHE."
    monkeypatch.delenv(CACHE_ENV, raising=False)


def test_first_call_trains_and_writes_a_whole_entry(tmp_path):
    ex = running_example(tmp_path, **TINY)
    assert ex.trained
    assert ex.folder == tmp_path/f'running-example-{recipe_key(recipe_with(**TINY))}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [ex.folder.name]  # no temporary folder left beside it
    manifest = json.loads((ex.folder/MANIFEST).read_text())
    assert manifest['recipe'] == json.loads(json.dumps(recipe_with(**TINY)))
    assert manifest['held_out_dice'] == ex.held_out_dice
    assert entry_problem(ex.folder, recipe_with(**TINY)) is None
    assert len(ex.log) == TINY['epochs'] and list(ex.log.columns[:4]) == ['epoch', 'train_loss', 'valid_loss', 'dice']
    assert ex.config['encoder'] == RECIPE['encoder'] and ex.config['size'] == TINY['size']
    assert not ex.model.training


def test_cache_hit_does_not_retrain(tmp_path):
    first = running_example(tmp_path, **TINY)
    stamp, data = first.checkpoint.stat().st_mtime_ns, first.checkpoint.read_bytes()
    again = running_example(tmp_path, **TINY)
    assert not again.trained
    assert again.checkpoint.stat().st_mtime_ns == stamp and again.checkpoint.read_bytes() == data
    assert again.held_out_dice == first.held_out_dice
    for (k, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_retrain_flag_trains_again(tmp_path):
    running_example(tmp_path, **TINY)
    assert running_example(tmp_path, retrain=True, **TINY).trained


@pytest.mark.parametrize('name,value', [('epochs', 2), ('size', 48), ('lr', 1e-3), ('seed', 1), ('encoder', 'resnet18'),
                                        ('difficulty', 0.8), ('weighting', 'equal'), ('multiscale', (0.75, 1, 1.25)),
                                        ('n_test', 50), ('precision', 'bf16')])
def test_a_recipe_change_changes_the_key(name, value):
    assert recipe_key(recipe_with(**{name: value})) != recipe_key(RECIPE)
    assert entry_folder(recipe_with(**{name: value}), '/c') != entry_folder(RECIPE, '/c')


def test_the_version_is_part_of_the_key():
    assert recipe_key(RECIPE, version='0.0.0') != recipe_key(RECIPE)
    assert recipe_key(dict(RECIPE)) == recipe_key(RECIPE)  # equal recipes: equal keys


def test_a_changed_recipe_trains_its_own_entry_and_leaves_the_old_one(tmp_path):
    first = running_example(tmp_path, **TINY)
    stamp = first.checkpoint.stat().st_mtime_ns
    other = running_example(tmp_path, **{**TINY, 'seed': 1})
    assert other.trained and other.folder != first.folder
    assert first.checkpoint.stat().st_mtime_ns == stamp and entry_problem(first.folder, recipe_with(**TINY)) is None


@pytest.mark.parametrize('damage', ['truncated checkpoint', 'no manifest', 'manifest of another recipe', 'unreadable manifest'])
def test_a_damaged_entry_is_retrained(tmp_path, damage):
    first = running_example(tmp_path, **TINY)
    folder = first.folder
    if damage == 'truncated checkpoint': first.checkpoint.write_bytes(first.checkpoint.read_bytes()[:1000])
    elif damage == 'no manifest': (folder/MANIFEST).unlink()
    elif damage == 'manifest of another recipe':
        m = json.loads((folder/MANIFEST).read_text()); m['recipe']['epochs'] = 7
        (folder/MANIFEST).write_text(json.dumps(m))
    else: (folder/MANIFEST).write_text('{"ds2net": ')
    assert entry_problem(folder, recipe_with(**TINY)) is not None
    again = running_example(tmp_path, **TINY)
    assert again.trained and again.folder == folder
    assert entry_problem(folder, recipe_with(**TINY)) is None
    assert len(again.log) == TINY['epochs']


def test_the_environment_variable_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path/'from-env'))
    assert cache_root() == tmp_path/'from-env'
    ex = running_example(**TINY)
    assert ex.folder.parent == tmp_path/'from-env' and ex.checkpoint.is_file()
    assert running_example(tmp_path/'given', **TINY).folder.parent == tmp_path/'given'  # the argument wins


def test_default_cache_is_under_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert cache_root() == tmp_path/'ds2net'


def test_files_the_library_did_not_write_are_never_removed(tmp_path):
    folder = entry_folder(recipe_with(**TINY), tmp_path)
    folder.mkdir()
    (folder/'notes.txt').write_text('mine')
    (folder/CHECKPOINT).write_bytes(b'half a checkpoint')
    with pytest.raises(ParameterExistsError) as e:
        running_example(tmp_path, **TINY)
    assert str(e.value) == (f"cache='{tmp_path}': the cache entry {folder.name} holds files ds2net did not write "
                            f"(notes.txt); move them away, or give another cache folder (or set DS2NET_CACHE)")
    assert e.value.param == 'cache'
    assert (folder/'notes.txt').read_text() == 'mine' and (folder/CHECKPOINT).read_bytes() == b'half a checkpoint'
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # refused before training: no temporary folder


def test_a_cache_that_is_a_file_is_refused(tmp_path):
    (tmp_path/'file').write_text('x')
    with pytest.raises(ParameterError) as e: running_example(tmp_path/'file', **TINY)
    assert str(e.value) == (f"cache='{tmp_path/'file'}' is a file: give a folder for the running example's cache "
                            f"(or set DS2NET_CACHE)")
    assert (tmp_path/'file').read_text() == 'x'


def test_an_unknown_recipe_value_is_refused():
    with pytest.raises(ParameterError) as e: running_example(epochz=3)
    assert str(e.value) == f"epochz is not part of the running example's recipe: change one of {', '.join(RECIPE)}"


def test_a_killed_runs_temporary_folder_is_removed(tmp_path):
    folder = entry_folder(recipe_with(**TINY), tmp_path)
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    partial = tmp_path/f'.{folder.name}.partial-{dead.pid}'
    partial.mkdir(); (partial/CHECKPOINT).write_bytes(b'killed while training')
    ex = running_example(tmp_path, **TINY)
    assert ex.trained and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_held_out_dice_agrees_with_an_independent_count(tmp_path):
    ex = running_example(tmp_path, **{**TINY, 'n_test': 6})
    images, masks = held_out_set(ex.recipe)
    assert images.shape == (6, 32, 32, 3) and masks.shape == (6, 32, 32)
    probs = predict_probabilities(ex.model, list(images), ex.config)
    def dice(p, m):
        pred, gt = p > 0.5, m > 0
        return 1.0 if pred.sum() + gt.sum() == 0 else 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    expected = np.mean([dice(p, m) for p, m in zip(probs, masks)])
    assert held_out_dice(ex.model, ex.config, images, masks) == pytest.approx(expected, abs=1e-6)
    assert ex.held_out_dice == pytest.approx(expected, abs=1e-6)


def test_dls_are_the_ones_it_was_trained_on(tmp_path):
    ex = running_example(tmp_path, **TINY)
    dls = ex.dls()
    assert len(dls.train_ds) + len(dls.valid_ds) == TINY['n_synthetic'] and len(dls.valid_ds) == 4
    assert ex.learner().model is ex.model


def test_mask_regions_split_the_image():
    disk = (np.hypot(*np.mgrid[-16:16, -16:16]) < 8).astype(np.uint8)
    r = mask_regions(disk, width=2)
    assert (r['boundary'].astype(int) + r['inside'] + r['outside'] == 1).all()  # every pixel in exactly one region
    # along a radius the disk covers offsets 0..7: inside up to 5, the band from 6 to 9 (2 pixels either side), outside from 10
    row = r['boundary'][16, 16:], r['inside'][16, 16:], r['outside'][16, 16:]
    assert [int(b) + 2 * int(i) + 3 * int(o) for b, i, o in zip(*row)][:12] == [2] * 6 + [1] * 4 + [3] * 2
    framed = mask_regions(disk, width=2, border=5)
    assert set(framed) == {'boundary', 'inside', 'outside', 'image border'}
    assert framed['image border'].sum() == 32 * 32 - 22 * 22 and not framed['image border'][5:-5, 5:-5].any()
    assert (framed['outside'] | framed['image border'] == r['outside']).all() and not (framed['outside'] & framed['image border']).any()


def test_mask_region_means_average_each_image_alone():
    torch.manual_seed(0)
    model = DS2Net('resnet10t').eval()
    images, masks = held_out_set(recipe_with(size=64, n_test=3))
    config = dict(size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    table = mask_region_means(model, config, images, masks, bs=2)
    assert list(table.columns) == ['boundary', 'inside', 'outside', 'image border'] and len(table) == 6
    per_image = [mask_region_means(model, config, images[i:i + 1], masks[i:i + 1]) for i in range(3)]
    assert np.allclose(table.values, np.mean([t.values for t in per_image], axis=0), atol=1e-6)
    assert ((table.values > 0) & (table.values < 1)).all()  # sigmoid masks
