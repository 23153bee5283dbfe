"""The callbacks one by one: multi-scale steps, plain progress lines, the deep-supervision record, clipping, autocast,
the non-finite stop; and what the loss, the metrics and fastai's tools see while a learner trains with them."""
import io, math
import numpy as np
import pytest, torch
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from fastai.torch_core import TensorMask

from ds2net.callbacks import (DeepSupervisionCallback, MultiScaleDataLoader, MultiScaleTraining, GradientClipValue,
                              NonFiniteLossError, NonFiniteLossCallback, PlainProgress, plot_weight_trajectories,
                              scaled_size, resize_batch, is_terminal, plain_output, use_plain_progress)
from ds2net.checkpoint import CheckpointCallback, read_checkpoint
from ds2net.learner import ds2net_learner
from ds2net.model import TINY_ENCODER
from support import PoisonAt, tiny_learner


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
    e = NonFiniteLossError("The loss became {loss}: clip them (`{clip_value=0.5}`)", loss=float('nan'))
    assert str(e) == 'The loss became nan: clip them (`clip_value=0.5`)'  # Python's words; the CLI says --clip 0.5


class Spy(Callback):
    "Records what the loss and the metrics saw."
    order = 100
    def __init__(self): self.loss_inputs, self.preds = [], []
    def after_pred(self):
        if isinstance(self.learn.pred, tuple): self.loss_inputs.append(len(self.learn.pred))
    def after_loss(self): self.preds.append(self.learn.pred)


def test_loss_sees_side_outputs_and_the_rest_sees_fused(dls):
    learn = tiny_learner(dls)
    spy = Spy()
    learn.fit(1, cbs=spy)
    assert set(spy.loss_inputs) == {6}
    assert all(isinstance(p, torch.Tensor) and p.shape[1] == 1 for p in spy.preds)  # fused, one map
    preds, targs = learn.get_preds()
    assert preds.shape == (len(dls.valid_ds), 1, 64, 64) and 0 <= preds.min() and preds.max() <= 1
    # get_preds' probabilities are the sigmoid of the sum of the six logits
    xb, _ = dls.valid.one_batch()
    learn.model.eval()
    with torch.no_grad(): expected = torch.sigmoid(sum(learn.model(xb)))
    torch.testing.assert_close(preds[:len(xb)], expected.cpu(), atol=1e-5, rtol=1e-4)
    # predict decodes a (H, W) mask like the targets
    dec, _, probs = learn.predict(dls.valid_ds[0][0])
    assert tuple(dec.shape) == (64, 64) and set(dec.unique().tolist()) <= {0, 1} and probs.shape == (1, 64, 64)


def test_weights_and_uncertainties_recorded_per_batch_and_epoch(dls):
    learn = tiny_learner(dls)
    learn.fit(2)
    ds = learn.deep_supervision
    assert len(ds.weights) == 2 and ds.weights[0].shape == (len(dls.train), 6)
    assert ds.epoch_weights.shape == (2, 6) and ds.epoch_uncertainties.shape == (2, 6)
    assert np.allclose(ds.weights[0].max(1), 1) and (ds.weights[0] >= math.exp(-1) - 1e-6).all()
    assert (0 <= ds.uncertainties[0]).all() and (ds.uncertainties[0] <= 1).all()
    # the recorded weights follow from the recorded uncertainties
    u = torch.tensor(ds.uncertainties[1][-1]); a = torch.softmax(u, 0)
    np.testing.assert_allclose(ds.weights[1][-1], (a / a.max()).numpy(), atol=1e-6)
    fig = plot_weight_trajectories(ds)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) >= 6


def test_no_recording_before_training():
    with pytest.raises(ValueError, match='Nothing recorded yet'): plot_weight_trajectories(DeepSupervisionCallback())


def test_multiscale_sizes_and_steps(dls):
    assert [scaled_size(352, s) for s in (0.75, 1, 1.25)] == [256, 352, 448]
    assert [scaled_size(352, s) for s in (0.5, 1, 1.5)] == [192, 352, 512]
    sizes = [tuple(b[0].shape[-2:]) for b in MultiScaleDataLoader(dls.train, (0.5, 1, 1.5))]
    assert sizes[:3] == [(32, 32), (64, 64), (96, 96)] and len(sizes) == 3 * len(dls.train)
    b = next(iter(MultiScaleDataLoader(dls.train, (1.5,))))
    assert b[1].shape[-2:] == (96, 96) and b[1].min() >= 0 and b[1].max() <= 1  # soft mask after bilinear resize

    class CountSteps(Callback):
        def before_fit(self): self.n = 0
        def after_step(self): self.n += 1
    learn = tiny_learner(dls, multiscale=(0.5, 1, 1.5))
    counter = CountSteps()
    learn.fit_one_cycle(2, 1e-3, cbs=counter)
    n = 3 * len(dls.train) * 2
    assert counter.n == n and learn.train_iter == n
    # the one-cycle schedule spans every scale step
    lrs = np.array(learn.recorder.lrs)
    sched = combined_cos(0.25, 1e-3 / 25, 1e-3, 1e-3 / 1e5)
    expected = np.array([sched(i / n) for i in range(n)])
    np.testing.assert_allclose(lrs, expected, rtol=1e-5)


def test_gradient_clipping_by_value_and_norm(dls):
    class Grads(Callback):
        "The gradients of the first step just before (order -1) or just after (order +1) the clipping callback."
        def __init__(self, offset): self.order, self.seen = GradientClipValue.order + offset, None
        def before_step(self):
            if self.seen is None: self.seen = [p.grad.clone() for p in self.learn.model.parameters() if p.grad is not None]
    raw, clipped = Grads(-1), Grads(+1)
    learn = tiny_learner(dls, clip_value=1e-4)
    learn.fit(1, cbs=[raw, clipped])
    # by value: each component clamped to ±1e-4 on its own (not the whole gradient scaled down, as by norm)
    assert max(g.abs().max().item() for g in raw.seen) > 1e-3  # so the clipping had work to do
    for r, c in zip(raw.seen, clipped.seen): torch.testing.assert_close(c, r.clamp(-1e-4, 1e-4), rtol=0, atol=0)
    raw, clipped = Grads(-1), Grads(+1)
    from fastai.callback.training import GradientClip
    raw.order, clipped.order = GradientClip.order - 1, GradientClip.order + 1
    learn = tiny_learner(dls, clip_value=None, clip_norm=1e-3)
    learn.fit(1, cbs=[raw, clipped])
    norm = torch.norm(torch.stack([g.norm() for g in raw.seen]))
    assert norm > 1e-3
    # by norm: the whole gradient scaled by 1e-3 / its norm
    for r, c in zip(raw.seen, clipped.seen): torch.testing.assert_close(c, r * (1e-3 / (norm + 1e-6)), rtol=1e-4, atol=1e-9)


def test_nonfinite_loss_names_epoch_and_batch(dls, tmp_path):
    learn = tiny_learner(dls, cbs=[CheckpointCallback(tmp_path, monitor='valid_loss')])
    with pytest.raises(NonFiniteLossError, match=r'became nan at epoch 2 of 2, batch 2 of \d+'):
        learn.fit(2, cbs=PoisonAt(1, 1))
    ckpt = read_checkpoint(tmp_path / 'last.pth')
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def test_autocast_bf16_runs_the_network_in_bf16_and_the_loss_in_fp32(dls):
    from ds2net.callbacks import Autocast
    class Look(Callback):
        order = Autocast.order + 1
        def before_batch(self): self.autocast_in_batch = torch.is_autocast_enabled('cpu')
        def after_pred(self): self.pred_dtypes = {p.dtype for p in self.pred}
        def after_loss(self): self.loss_dtype, self.autocast_in_loss = self.loss.dtype, torch.is_autocast_enabled('cpu')
    learn = tiny_learner(dls, cbs=[Autocast(), Look()])
    learn.fit(1)
    look = learn.look
    assert look.autocast_in_batch and not look.autocast_in_loss
    assert look.pred_dtypes == {torch.float32} and look.loss_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert not torch.is_autocast_enabled('cpu')  # nothing left switched on after the fit
    assert math.isfinite(learn.recorder.values[-1][0])


def test_callbacks_keep_run_state_out_of_an_export_and_act_in_training_only(dls):
    "`_stateattrs`: a pickled (exported) callback carries no history and no open autocast context; `run_valid=False`."
    import pickle
    from ds2net.callbacks import Autocast
    learn = tiny_learner(dls)
    learn.fit(1)
    ds = learn.deep_supervision
    assert len(ds.weights) == 1
    again = pickle.loads(pickle.dumps(ds))
    assert again.weights == [] and again.uncertainties == [] and again.losses == [] and again.record
    ac = Autocast(); ac._ctx = object()
    assert pickle.loads(pickle.dumps(ac))._ctx is None
    assert [cb.run_valid for cb in (MultiScaleTraining(), GradientClipValue(), NonFiniteLossCallback())] == [False] * 3


def test_resize_batch_keeps_the_mask_type():
    from fastai.torch_core import TensorMask
    class MyMask(TensorMask): pass
    _, y = resize_batch(torch.rand(1, 3, 8, 8), MyMask(torch.zeros(1, 8, 8)), (4, 4))
    assert type(y) is MyMask
