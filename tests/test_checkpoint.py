"""Checkpoint files: what they hold, how they are written (atomically, durably), the one read-check-load, and old files."""
import os, stat
import numpy as np
import pytest, torch
from fastcore.foundation import L

from ds2net.errors import WeightsError
from ds2net.checkpoint import (CHECKPOINT_FORMAT, CheckpointCallback, check_compatible, load_checkpoint_into,
                               load_training_state, read_checkpoint, save_checkpoint, to_plain)
from ds2net.inference import model_from_checkpoint
from ds2net.model import DS2Net, TINY_ENCODER
from support import tiny_learner


def test_to_plain_keeps_only_what_weights_only_can_read():
    t = torch.ones(2, requires_grad=True)
    out = to_plain({'t': t, 'a': np.arange(3), 'f': np.float32(1.5), 'l': L([1, 2]), 'tu': (np.int64(3), 's'), 'n': None})
    assert out['t'].requires_grad is False and torch.equal(out['t'], torch.ones(2))
    assert torch.equal(out['a'], torch.arange(3)) and out['f'] == 1.5 and type(out['f']) is float
    assert out['l'] == [1, 2] and type(out['l']) is list and out['tu'] == [3, 's'] and type(out['tu'][0]) is int
    assert out['n'] is None


def test_checkpoint_files_and_their_errors(tmp_path):
    torch.manual_seed(0)
    model = DS2Net(TINY_ENCODER, channels=8)
    path = save_checkpoint(tmp_path / 'sub' / 'a.pth', model, dict(size=64), epoch=3, note=np.float64(0.5))
    ckpt = read_checkpoint(path)
    assert ckpt['format'] == CHECKPOINT_FORMAT and ckpt['epoch'] == 3 and ckpt['note'] == 0.5
    assert ckpt['config'] == {**model.config, 'size': 64}
    loaded, cfg = model_from_checkpoint(path)
    assert not loaded.training and cfg['size'] == 64
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()): assert torch.equal(a, b)
    other = DS2Net(TINY_ENCODER, channels=8)
    assert load_checkpoint_into(other, path)['epoch'] == 3
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    # errors name the file and say what to do
    with pytest.raises(WeightsError, match=f'{tmp_path / "sub"} is a folder, not a checkpoint file: give the file itself, e.g. {tmp_path / "sub"}/best.pth'):
        read_checkpoint(tmp_path / 'sub')
    with pytest.raises(WeightsError, match=f'^ds2net checkpoint not found: {tmp_path / "none.pth"}$'): read_checkpoint(tmp_path / 'none.pth')
    torch.save({'format': 'other'}, tmp_path / 'o.pth')
    with pytest.raises(WeightsError, match=r"o\.pth is not a ds2net checkpoint .* use `load_reference_checkpoint`"): read_checkpoint(tmp_path / 'o.pth')
    torch.save({'format': CHECKPOINT_FORMAT, 'config': {'encoder': 'x'}}, tmp_path / 'd.pth')
    with pytest.raises(WeightsError, match=r"damaged \(no 'channels' in its config; no 'model' weights\): use another checkpoint"):
        read_checkpoint(tmp_path / 'd.pth')
    with pytest.raises(WeightsError, match=r"was trained with another network \(channels: checkpoint 8, model 16\)\. Build the model from the checkpoint"):
        check_compatible(ckpt, DS2Net(TINY_ENCODER, channels=16), 'run/a.pth')
    check_compatible(ckpt, other)  # the same network: no error


def test_checkpoint_carries_config_and_refuses_other_networks(dls, tmp_path):
    learn = tiny_learner(dls, cbs=[CheckpointCallback(tmp_path, dict(size=64, mean=[0.5] * 3, std=[0.2] * 3))])
    learn.fit(1)
    model, cfg = model_from_checkpoint(tmp_path / 'best.pth')
    assert cfg['encoder'] == TINY_ENCODER and cfg['channels'] == 32 and cfg['size'] == 64 and cfg['mean'] == [0.5] * 3
    with pytest.raises(WeightsError, match=r"encoder: checkpoint 'resnet10t', model 'resnet18'"):
        load_checkpoint_into(DS2Net('resnet18'), tmp_path / 'best.pth')
    with pytest.raises(WeightsError, match='channels: checkpoint 32, model 16'):
        load_checkpoint_into(DS2Net(TINY_ENCODER, channels=16), tmp_path / 'best.pth')
    torch.save({'model': {}}, tmp_path / 'other.pth')
    with pytest.raises(WeightsError, match='not a ds2net checkpoint'): read_checkpoint(tmp_path / 'other.pth')


def test_checkpoints_are_atomic_and_durable(tmp_path, monkeypatch):
    model = DS2Net(TINY_ENCODER)
    path = save_checkpoint(tmp_path / 'last.pth', model, epoch=1)
    synced, real_fsync = [], os.fsync
    def fsync(fd): synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)); real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    save_checkpoint(path, model, epoch=2)
    assert synced == [False, True]  # the file, then the folder that holds the new name
    assert read_checkpoint(path)['epoch'] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']
    real_save = torch.save
    def half_save(obj, f): f.write(b'half a checkpoint'); raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', half_save)
    with pytest.raises(OSError, match='No space left'): save_checkpoint(path, model, epoch=3)
    monkeypatch.setattr(torch, 'save', real_save)
    assert read_checkpoint(path)['epoch'] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']


def test_checkpoint_without_drop_path_rate_still_loads(tmp_path):
    model = DS2Net(TINY_ENCODER, channels=8)
    save_checkpoint(tmp_path / 'new.pth', model, dict(size=64))
    old = torch.load(tmp_path / 'new.pth', weights_only=True)
    assert old['config']['drop_path_rate'] == 0.0
    del old['config']['drop_path_rate']  # as written before the key existed
    torch.save(old, tmp_path / 'old.pth')
    loaded, cfg = model_from_checkpoint(tmp_path / 'old.pth')
    assert 'drop_path_rate' not in cfg and loaded.drop_path_rate == 0.0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_one_read_check_load_for_resume_evaluate_and_predict(tmp_path, dls):
    "load_checkpoint_into takes a path or an already read checkpoint; load_training_state restores the optimizer too."
    learn = tiny_learner(dls, cbs=[CheckpointCallback(tmp_path, dict(size=64))])
    learn.fit(1)
    ckpt = read_checkpoint(tmp_path / 'last.pth')
    other = tiny_learner(dls)
    assert load_training_state(other, ckpt, tmp_path / 'last.pth') is ckpt  # read once, passed on
    for a, b in zip(other.model.state_dict().values(), learn.model.state_dict().values()): assert torch.equal(a, b)
    assert other.opt.state_dict()['state'][0]['step'] == learn.opt.state_dict()['state'][0]['step']
    with pytest.raises(WeightsError, match=r"last\.pth was trained with another network \(channels: checkpoint 32, model 16\)\. "
                                           r"Resume with the same channels, or choose a new out\.$"):
        check_compatible(ckpt, dict(channels=16), tmp_path / 'last.pth', "Resume with the same {channels}, or choose a new {out}.")
    old = dict(ckpt, config={k: v for k, v in ckpt['config'].items() if k != 'in_chans'})  # from before in_chans was stored
    check_compatible(old, other.model)


WHAT_ONE_IS = ("A ds2net checkpoint is the best.pth or last.pth that `ds2net train` writes, or a file written by "
               "`save_checkpoint(path, model, config=data_config(dls))`: the network, its weights, and the input size and "
               "normalisation it was trained with.")
OTHERS = " For the authors' checkpoints use `load_reference_checkpoint`; ImageNet weights for an encoder go in encoder_weights."


class Planted:
    "A pickle that makes a folder when unpickled: the stand-in for a malicious file."
    def __init__(self, folder): self.folder = str(folder)
    def __reduce__(self): return (os.mkdir, (self.folder,))


def test_files_that_are_not_ds2net_checkpoints_say_what_they_are_and_what_one_is(tmp_path, dls):
    "Issue 16, item 11: an image, a fastai export, a malicious pickle, bare weights: one message each, no torch text."
    import pickle
    from PIL import Image
    Image.new('RGB', (8, 8)).save(tmp_path / 'x.png')
    learn = tiny_learner(dls)
    learn.export(tmp_path / 'export.pkl')  # fastai's own export: a pickle of the whole Learner
    (tmp_path / 'evil.pth').write_bytes(pickle.dumps(Planted(tmp_path / 'planted')))
    torch.save(Planted(tmp_path / 'planted'), tmp_path / 'evil_zip.pth')
    torch.save(DS2Net(TINY_ENCODER).state_dict(), tmp_path / 'state.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    whole = (tmp_path / 'state.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(whole[:len(whole) // 2])
    pickled = ("it holds pickled Python objects, not only tensors, numbers and strings: a fastai `learn.export()` file, a "
               "whole model saved with torch.save, or other code; ds2net never unpickles such a file, since that can run any code")
    for name, why in [('x.png', 'it is a PNG image'), ('export.pkl', pickled), ('evil.pth', pickled), ('evil_zip.pth', pickled),
                      ('state.pth', 'it holds bare weights, a state dict without the configuration of the network they belong to'),
                      ('empty.pth', 'the file is empty'),
                      ('cut.pth', 'it is a zip archive but not a whole torch file: cut short, or damaged')]:
        for load in (read_checkpoint, model_from_checkpoint):
            with pytest.raises(WeightsError) as e: load(tmp_path / name)
            assert str(e.value) == f"{tmp_path / name} is not a ds2net checkpoint ({why}). {WHAT_ONE_IS}{OTHERS}", name
            assert '\x1b' not in str(e.value) and 'weights_only=False' not in str(e.value)
    assert not (tmp_path / 'planted').exists()  # nothing was unpickled


def test_a_checkpoint_of_the_network_alone_says_what_prediction_needs(tmp_path):
    "Issue 16, item 11: `save_checkpoint(p, DS2Net(...))` has no image size: a message instead of KeyError: 'size'."
    from ds2net.inference import predict_probabilities
    model = DS2Net(TINY_ENCODER).eval()
    save_checkpoint(tmp_path / 'bare.pth', model)
    with pytest.raises(WeightsError) as e: model_from_checkpoint(tmp_path / 'bare.pth')
    assert str(e.value) == (f"{tmp_path / 'bare.pth'} holds a DS2Net and its weights but not the image size it was trained "
                            f"at (no 'size' in its config), which prediction needs. {WHAT_ONE_IS} Save it again with "
                            "`config=data_config(dls)`, or at least `config=dict(size=352)` (the training size).")
    save_checkpoint(tmp_path / 'sized.pth', model, dict(size=64))  # the size alone: ImageNet normalisation, as every ds2net run
    loaded, cfg = model_from_checkpoint(tmp_path / 'sized.pth')
    assert (cfg['size'], cfg['mean'], cfg['std']) == (64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    prob = predict_probabilities(loaded, [image], cfg)[0]
    imagenet = dict(size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert prob.shape == (40, 50) and np.array_equal(prob, predict_probabilities(loaded, [image], imagenet)[0])
