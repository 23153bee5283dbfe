"""The callbacks module's parts one by one, fast: sizes of multi-scale steps, checkpoint files and their errors, atomic
writes, plain progress lines, the deep-supervision record. (Training with them is in test_training and test_cli.)"""
import io, math, os
import numpy as np
import pytest, torch
from fastai.torch_core import TensorMask, set_seed
from fastcore.foundation import L

from ds2net.callbacks import (DeepSupervisionCallback, MultiScaleDataLoader, MultiScaleTraining, GradientClipValue,
                              NonFiniteLossError, CheckpointCallback, PlainProgress, plot_weight_trajectories, scaled_size,
                              resize_batch, to_plain, atomic_write, remove_stale_temps, save_checkpoint, read_checkpoint,
                              check_compatible, load_checkpoint_into, model_from_checkpoint, is_terminal, plain_output,
                              use_plain_progress, CHECKPOINT_FORMAT, TEMP_SUFFIX)
from ds2net.data import segmentation_dls
from ds2net.learner import ds2net_learner
from ds2net.model import DS2Net, TINY_ENCODER, WeightsError


@pytest.mark.parametrize('size,scale,multiple,expected', [(352, 0.75, 32, 256), (352, 1.25, 32, 448), (352, 0.5, 32, 192),
                                                          (100, 1.0, 32, 96), (100, 0.1, 32, 32), (50, 1.0, 8, 48), (53, 1.0, 8, 56)])
def test_scaled_size_rounds_to_the_nearest_multiple(size, scale, multiple, expected):
    assert scaled_size(size, scale, multiple) == expected


def test_resize_batch_resizes_images_and_masks_bilinearly_with_aligned_corners():
    x = torch.rand(2, 3, 8, 8)
    y = TensorMask((torch.rand(2, 8, 8) > 0.5).long())
    xs, ys = resize_batch(x, y, (16, 12))
    assert xs.shape == (2, 3, 16, 12) and ys.shape == (2, 16, 12) and isinstance(ys, TensorMask)
    torch.testing.assert_close(xs, torch.nn.functional.interpolate(x, size=(16, 12), mode='bilinear', align_corners=True))
    expected = torch.nn.functional.interpolate(y.float()[:, None], size=(16, 12), mode='bilinear', align_corners=True)[:, 0]
    torch.testing.assert_close(ys.as_subclass(torch.Tensor), expected)
    # a (B, 1, H, W) mask stays so, a plain tensor stays plain; the same size returns the very same tensors
    y4 = torch.rand(2, 1, 8, 8)
    _, y4s = resize_batch(x, y4, (4, 4))
    assert y4s.shape == (2, 1, 4, 4) and type(y4s) is torch.Tensor
    same = resize_batch(x, y, (8, 8))
    assert same[0] is x and same[1] is y


def test_multiscale_loader_and_callback_arguments():
    class DL:
        bs, device = 4, 'cpu'
        def __len__(self): return 2
        def __iter__(self): yield from [(torch.rand(4, 3, 64, 64), torch.zeros(4, 64, 64)) for _ in range(2)]
    ms = MultiScaleDataLoader(DL(), (0.5, 1.0), multiple=32)
    assert len(ms) == 4 and ms.bs == 4 and ms.device == 'cpu'
    assert [tuple(b[0].shape[-2:]) for b in ms] == [(32, 32), (64, 64)] * 2
    with pytest.raises(AttributeError): ms.__missing_dunder__
    with pytest.raises(ValueError, match=r'scales must be positive numbers, got \(1\.0, 0\.0\)'): MultiScaleTraining((1, 0))
    with pytest.raises(ValueError, match=r'scales must be positive numbers, got \(\)'): MultiScaleTraining(())
    assert MultiScaleTraining((1, 2)).scales == (1.0, 2.0) and MultiScaleTraining().scales == (0.75, 1.0, 1.25)
    with pytest.raises(ValueError, match='clip must be positive, got 0'): GradientClipValue(0)
    assert GradientClipValue().clip == 0.5


def test_to_plain_keeps_only_what_weights_only_can_read():
    t = torch.ones(2, requires_grad=True)
    out = to_plain({'t': t, 'a': np.arange(3), 'f': np.float32(1.5), 'l': L([1, 2]), 'tu': (np.int64(3), 's'), 'n': None})
    assert out['t'].requires_grad is False and torch.equal(out['t'], torch.ones(2))
    assert torch.equal(out['a'], torch.arange(3)) and out['f'] == 1.5 and type(out['f']) is float
    assert out['l'] == [1, 2] and type(out['l']) is list and out['tu'] == [3, 's'] and type(out['tu'][0]) is int
    assert out['n'] is None


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / 'f.bin'
    assert atomic_write(path, lambda f: f.write(b'first')) == path and path.read_bytes() == b'first'
    def broken(f): f.write(b'half'); raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'): atomic_write(path, broken)
    assert path.read_bytes() == b'first' and sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']
    atomic_write(path, lambda f: f.write(b'second'))
    assert path.read_bytes() == b'second'


def test_remove_stale_temps_removes_only_its_own_temp_files(tmp_path):
    for name in ('best.pth', 'last.pth', 'log.csv', 'mine.txt'): (tmp_path / (name + TEMP_SUFFIX)).write_text('x')
    (tmp_path / 'last.pth').write_text('keep')
    gone = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in gone) == ['best.pth.tmp', 'last.pth.tmp', 'log.csv.tmp']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth', 'mine.txt.tmp']
    assert remove_stale_temps(tmp_path) == []


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


def test_is_terminal_and_plain_output(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self): return True
    class Closed(io.StringIO):
        def isatty(self): raise ValueError('closed')
    assert is_terminal(Tty()) and not is_terminal(io.StringIO()) and not is_terminal(Closed()) and not is_terminal(object())
    monkeypatch.setattr('sys.stdout', Tty())
    assert is_terminal() and not plain_output()
    monkeypatch.setattr('sys.stdout', io.StringIO())
    assert not is_terminal() and plain_output()


@pytest.fixture(scope='module')
def dls():
    set_seed(0, reproducible=True)
    return segmentation_dls('synthetic:polyp', size=64, bs=4, n=12, seed=0, device='cpu')


def test_plain_progress_prints_a_header_and_one_line_per_epoch(dls):
    from fastai.callback.progress import ProgressCallback
    out = io.StringIO()
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, lr=1e-3)
    use_plain_progress(learn, force=True)
    assert not any(isinstance(cb, ProgressCallback) for cb in learn.cbs)
    assert sum(isinstance(cb, PlainProgress) for cb in use_plain_progress(learn, force=True).cbs) == 1  # not twice
    learn.plain_progress.file = out
    learn.fit(2)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'dice', 'iou', 'time'] and len(lines) == 3
    for i, line in enumerate(lines[1:]):
        cells = line.split()
        assert cells[0] == str(i) and len(cells) == 6
        assert float(cells[1]) == pytest.approx(learn.recorder.values[i][0], abs=1e-6)  # six decimals
        assert len(cells[1].split('.')[1]) == 6
    assert learn.logger is not learn.plain_progress._write  # the logger is given back after the fit
    assert use_plain_progress(ds2net_learner(dls, encoder=TINY_ENCODER), force=False).cbs.filter(lambda c: isinstance(c, PlainProgress)) == []


def test_deep_supervision_record_restore_and_plot(dls):
    ds = DeepSupervisionCallback()
    assert ds.epoch_weights.shape == (0, 0) and ds.epoch_uncertainties.shape == (0, 0) and ds.record
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, lr=1e-3)
    learn.deep_supervision.restore([np.ones((3, 6))], [np.full((3, 6), 0.5)], [np.zeros((3, 6))])
    learn.fit(1)
    ds = learn.deep_supervision
    assert len(ds.weights) == 2 and np.array_equal(ds.weights[0], np.ones((3, 6)))  # the restored epoch, then the new one
    assert ds.epoch_uncertainties[0].tolist() == [0.5] * 6 and len(ds.losses) == 2
    np.testing.assert_allclose(ds.epoch_weights[1], ds.weights[1].mean(0))
    learn.fit(1)  # a new fit starts a new history
    assert len(ds.weights) == 1
    fig = plot_weight_trajectories(ds, names=('a', 'b'))
    labels = [l.get_label() for l in fig.axes[0].lines if not l.get_label().startswith('_')]
    assert labels == ['a', 'b', 'output 3', 'output 4', 'output 5', 'output 6']
    assert fig.axes[0].get_ylabel() == 'weight w' and fig.axes[1].get_ylabel() == 'uncertainty u'
    assert fig.axes[0].get_xlabel().startswith('training step')
    quiet = ds2net_learner(dls, encoder=TINY_ENCODER, lr=1e-3)
    quiet.deep_supervision.record = False
    quiet.fit(1)
    assert quiet.deep_supervision.weights == []


def test_nonfinite_loss_error_prints_its_message_only():
    e = NonFiniteLossError('The loss became nan at epoch 1')
    assert str(e) == 'The loss became nan at epoch 1' and e.message == str(e) and isinstance(e, RuntimeError)
