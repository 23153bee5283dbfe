"Callbacks and learner: deep supervision in fastai, multi-scale steps, clipping, checkpoints, DynamicUnet heads."
import math
import numpy as np
import pytest, torch
from fastai.learner import load_learner
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from fastai.torch_core import set_seed

from ds2net.data import segmentation_dls
from ds2net.model import DS2Net, TINY_ENCODER, WeightsError
from ds2net.callbacks import (DeepSupervisionCallback, MultiScaleDataLoader, GradientClipValue,
                              NonFiniteLossError, CheckpointCallback, read_checkpoint,
                              model_from_checkpoint, load_checkpoint_into, scaled_size, plot_weight_trajectories)
from ds2net.learner import ds2net_learner, attach_side_heads, per_image_scores, ds2net_splitter


@pytest.fixture(scope='module')
def dls():
    set_seed(0, reproducible=True)
    return segmentation_dls('synthetic:polyp', size=64, bs=4, n=20, seed=0, device='cpu')


def tiny_learner(dls, **kwargs):
    set_seed(0, reproducible=True)
    return ds2net_learner(dls, encoder=TINY_ENCODER, lr=1e-3, **kwargs)


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
    class Poison(Callback):
        order = -6
        def after_pred(self):
            if self.training and self.epoch == 1 and self.iter == 1: self.learn.pred = tuple(p * float('nan') for p in self.pred)
    learn = tiny_learner(dls, cbs=[CheckpointCallback(tmp_path, monitor='valid_loss')])
    with pytest.raises(NonFiniteLossError, match=r'became nan at epoch 2 of 2, batch 2 of \d+'):
        learn.fit(2, cbs=Poison())
    ckpt = read_checkpoint(tmp_path / 'last.pth')
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def test_learner_fastai_api(dls, tmp_path):
    import matplotlib.pyplot as plt
    learn = tiny_learner(dls)
    assert len(ds2net_splitter(learn.model)) == 2
    learn.path = tmp_path
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    lr = learn.lr_find(start_lr=1e-6, end_lr=1, num_it=8, show_plot=False)
    lrs = np.array(learn.recorder.lrs)
    np.testing.assert_allclose(lrs, 1e-6 * (1e6) ** (np.arange(len(lrs)) / 8), rtol=1e-5)  # fastai: start_lr·(end/start)^(i/num_it)
    assert np.isclose(lrs, lr.valley, rtol=1e-6).any()  # the suggestion is one of the rates tried
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k]), k  # lr_find leaves the weights as found
    learn.fine_tune(1, 1e-3, freeze_epochs=1)
    loss, dice, iou = learn.validate()
    # the recorded Dice is the mean per-image Dice of the fused probabilities at 0.5, computed here by hand
    probs, targs = learn.get_preds()
    p, g = (probs[:, 0] > 0.5).flatten(1).float(), (targs > 0.5).flatten(1).float()
    inter, total = (p * g).sum(1), p.sum(1) + g.sum(1)
    by_hand = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).mean().item()
    assert dice == pytest.approx(by_hand, abs=1e-6)
    plt.close('all')
    learn.show_results(max_n=2)
    fig = plt.gcf()
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) >= 4  # two samples, each with its target and its prediction
    plt.close('all')
    learn.save('model')
    other = tiny_learner(dls); other.path = tmp_path
    other.load('model')
    for a, b in zip(learn.model.state_dict().values(), other.model.state_dict().values()): torch.testing.assert_close(a, b)
    learn.export(tmp_path / 'export.pkl')
    reloaded = load_learner(tmp_path / 'export.pkl')
    x = dls.valid_ds[0][0]
    torch.testing.assert_close(reloaded.predict(x)[2], learn.predict(x)[2], atol=1e-5, rtol=1e-4)


def test_per_image_scores():
    logits = torch.tensor([[[[3., 3.], [-3., -3.]]], [[[-1., -1.], [-1., -1.]]], [[[1., -1.], [-1., -1.]]]])
    mask = torch.tensor([[[1, 1], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]])
    dice, iou = per_image_scores(logits, mask)
    torch.testing.assert_close(dice, torch.tensor([0.8, 1., 0.]))
    torch.testing.assert_close(iou, torch.tensor([2 / 3, 1., 0.]))


def test_dynamic_unet_side_heads(dls):
    import timm
    from torch import nn
    from fastai.vision.models.unet import DynamicUnet
    body = nn.Sequential(*list(timm.create_model('resnet18', pretrained=False).children())[:-2])
    net = attach_side_heads(DynamicUnet(body, n_out=1, img_size=(64, 64)))
    outs = net(torch.randn(2, 3, 64, 64))
    assert len(outs) == 5 and all(o.shape == (2, 1, 64, 64) for o in outs)
    assert net.levels == (4, 3, 2, 1, 0)
    learn = ds2net_learner(dls, model=net, weighting='exp', lr=1e-3)
    learn.fit(1)
    assert learn.loss_func.last_weights.tolist() == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]
    with pytest.raises(ValueError, match='no fastai UnetBlock'): attach_side_heads(nn.Conv2d(3, 1, 1))


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


# --- mixed precision on the CPU (issue 9) ---

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


def test_bf16_reaches_the_dice_of_fp32_on_the_cpu(tmp_path):
    "The condition for bf16 being the CPU default: the same short run in bf16 ends within 0.01 validation Dice of fp32."
    from ds2net.learner import train, default_precision
    dice = {}
    for precision in ('fp32', 'bf16'):
        s = train('synthetic:polyp', tmp_path / precision, encoder=TINY_ENCODER, size=64, bs=8, epochs=6, lr=3e-3,
                  n_synthetic=96, difficulty=0.2, device='cpu', precision=precision)
        assert s['precision'] == precision
        dice[precision] = s['best_dice']
    assert dice['fp32'] > 0.6, dice  # it learned something, so the comparison means something
    assert abs(dice['bf16'] - dice['fp32']) <= 0.01, dice
    assert default_precision('cpu') in ('bf16', 'fp32')  # bf16 where the CPU has native bf16 instructions
