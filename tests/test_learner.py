"""The learner as fastai users use it: lr_find, fine_tune, validate, show_results, save/load, export, fastai's
interpretation; plain progress lines in a log file."""
import subprocess, sys
import numpy as np
import pytest, torch
from fastai.learner import load_learner

from ds2net.learner import ds2net_splitter
from ds2net.losses import structure_loss
from support import tiny_learner


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


def test_fastai_interpretation_works_as_on_any_learner(dls):
    "With reduction='none', fastai's get_preds(with_loss=True), top_losses and SegmentationInterpretation.plot_top_losses work."
    import matplotlib.pyplot as plt
    from fastai.interpret import Interpretation, SegmentationInterpretation
    learn = tiny_learner(dls)
    learn.fit(1)
    probs, targs, losses = learn.get_preds(with_loss=True)
    assert losses.shape == (len(dls.valid_ds),) and learn.loss_func.reduction == 'mean'  # fastai puts it back
    x, y = dls.valid.one_batch()
    with torch.no_grad():  # each image's own six structure losses, weighted by the batch's uncertainty weights
        outs = learn.model.eval()(x)
        w, _ = learn.loss_func.side_weights(outs)
        by_hand = [sum(w[n] * structure_loss(o[i:i + 1], y[i:i + 1]) for n, o in enumerate(outs)).item() for i in range(len(x))]
    assert losses[:len(x)].tolist() == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    worst, idx = Interpretation.from_learner(learn).top_losses(2)
    assert worst.tolist() == pytest.approx(losses.sort(descending=True).values[:2].tolist())
    plt.close('all')
    SegmentationInterpretation.from_learner(learn).plot_top_losses(2)
    assert len([ax for ax in plt.gcf().axes if ax.images]) >= 4  # two images, each with target and prediction
    plt.close('all')


def test_a_learner_prints_plain_lines_when_its_output_is_a_file(tmp_path):
    "A Python script whose output goes to a file gets one plain line per epoch, as `ds2net train` does, not bar redraws."
    script = (
        "from ds2net.data import segmentation_dls\n"
        "from ds2net.learner import ds2net_learner\n"
        "dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=12, seed=0, device='cpu')\n"
        "learn = ds2net_learner(dls, encoder='resnet10t', lr=1e-3)\n"
        "learn.fit(2)\n"
        "print('done', any(type(cb).__name__ == 'ProgressCallback' for cb in learn.cbs))\n")
    log = tmp_path / 'log.txt'
    with open(log, 'w') as f:
        r = subprocess.run([sys.executable, '-W', 'ignore', '-c', script], stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    lines = [l for l in text.splitlines() if l.strip()]
    assert '\r' not in text and lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'dice', 'iou', 'time'], text
    assert [l.split()[0] for l in lines[1:3]] == ['0', '1'] and lines[3] == 'done True'  # the bar is back after the fit


def _stepped(make, params, grads, n, hypers=None):
    "Copies of `params` after `n` steps of the optimizer `make(copies)` with these gradients (and hyper-parameters set before each step)."
    q = [p.detach().clone().requires_grad_() for p in params]
    opt = make(q)
    for i in range(n):
        if hypers: opt.set_hypers(**hypers[i])
        for p, g in zip(q, grads): p.grad = g.clone()
        opt.step()
    return q, opt


@pytest.mark.parametrize('impl', ['fused', 'foreach', 'single'])
def test_fused_adam_step_equals_torch_adamw(impl):
    "One step (and three) of FusedAdam on DS2Net's parameters equals PyTorch's AdamW, given fastai's betas and eps, to 1e-6."
    from ds2net.learner import FusedAdam
    from ds2net.model import DS2Net, TINY_ENCODER
    torch.manual_seed(0)
    params = list(DS2Net(TINY_ENCODER, channels=8).parameters())
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    for n in (1, 3):
        ref, _ = _stepped(lambda q: torch.optim.AdamW(q, lr=3e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2), params, grads, n)
        ours, opt = _stepped(lambda q: FusedAdam(q, lr=3e-3, wd=1e-2, impl=impl), params, grads, n)
        assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-6
        assert max((a - p).abs().max().item() for a, p in zip(ours, params)) > 1e-3 * n  # and it did move them
        assert {opt.state[p]['step'] for p in ours} == {n}  # fastai's state: the step as a number


def test_fused_adam_follows_fastai_adam_schedules_and_do_wd():
    "With lr, mom and wd changed at every step (as fit_one_cycle does) and no weight decay on some tensors (fastai's do_wd), FusedAdam equals fastai's Adam."
    from fastai.optimizer import Adam
    from ds2net.learner import FusedAdam
    torch.manual_seed(1)
    params = [torch.randn(16, 8), torch.randn(8), torch.randn(3, 3, 3, 3)]
    grads = [torch.randn_like(p) for p in params]
    hypers = [dict(lr=1e-2, mom=0.95, wd=0.1), dict(lr=3e-2, mom=0.9, wd=0.2), dict(lr=5e-3, mom=0.85, wd=0.05)]
    def make(opt_func):
        def f(q):
            opt = opt_func(q, lr=1e-2, wd=0.1)
            opt.state[q[1]]['do_wd'] = False  # a bias: fastai's Learner sets this for norm layers and biases
            return opt
        return f
    ref, _ = _stepped(make(Adam), params, grads, 3, hypers)
    ours, _ = _stepped(make(FusedAdam), params, grads, 3, hypers)
    for a, b in zip(ours, ref): torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    q = torch.ones(4, requires_grad=True); q.grad = torch.zeros(4)  # no gradient: the weight decay alone moves it
    opt = FusedAdam([q], lr=0.1, wd=0.5); opt.step()
    assert q.tolist() == pytest.approx([1 - 0.1 * 0.5] * 4, abs=1e-7)
    opt = FusedAdam([q], lr=0.1, wd=0.5); opt.state[q]['do_wd'] = False; before = q.tolist(); opt.step()
    assert q.tolist() == before


def test_fused_adam_resumes_a_fastai_adam_state():
    "A state written by fastai's Adam (as in older checkpoints) loads into FusedAdam and the next step is fastai's, and back."
    import copy
    from fastai.optimizer import Adam
    from ds2net.learner import FusedAdam
    torch.manual_seed(2)
    params, grads = [torch.randn(10, 4), torch.randn(4)], [torch.randn(10, 4), torch.randn(4)]
    for first, then in ((Adam, FusedAdam), (FusedAdam, Adam)):
        q, opt = _stepped(lambda q: first(q, lr=1e-2, wd=0.1), params, grads, 2)
        state = opt.state_dict()
        ref = [p.detach().clone().requires_grad_() for p in q]; r_opt = first(ref, lr=1e-2, wd=0.1); r_opt.load_state_dict(copy.deepcopy(state))
        new = [p.detach().clone().requires_grad_() for p in q]; n_opt = then(new, lr=1e-2, wd=0.1); n_opt.load_state_dict(copy.deepcopy(state))
        for p, g in zip(ref + new, grads + grads): p.grad = g.clone()
        r_opt.step(); n_opt.step()
        for a, b in zip(new, ref): torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert n_opt.state[new[0]]['step'] == 3


def test_the_learner_steps_with_fused_adam_as_fastai_adam_would(dls):
    "ds2net_learner's default optimizer is FusedAdam, with do_wd off on norm layers and biases; two batches give fastai Adam's weights."
    from fastai.optimizer import Adam
    from ds2net.learner import FusedAdam
    from ds2net.errors import ParameterError
    from fastai.callback.core import Callback, CancelFitException
    from fastai.data.core import DataLoaders

    class StopAfter(Callback):
        def __init__(self, n): self.n = n
        def after_batch(self):
            if self.training and self.iter + 1 >= self.n: raise CancelFitException()

    fixed = DataLoaders(dls.train.new(shuffle=False), dls.valid)  # the same batches for both
    runs = {}
    for name, opt_func in (('fused', None), ('fastai', Adam)):
        learn = tiny_learner(fixed, **({} if opt_func is None else dict(opt_func=opt_func)))
        learn.fit(1, lr=1e-3, wd=0.1, cbs=[StopAfter(2)])
        runs[name] = learn
    assert type(runs['fused'].opt) is FusedAdam
    no_wd = [p for p in runs['fused'].model.parameters() if runs['fused'].opt.state[p].get('do_wd') is False]
    assert no_wd and all(p.ndim == 1 for p in no_wd)  # biases and norm layers
    for (k, a), b in zip(runs['fused'].model.state_dict().items(), runs['fastai'].model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    with pytest.raises(ParameterError) as e: FusedAdam([torch.zeros(1)], lr=1e-3, impl='loop')
    assert str(e.value) == "impl='loop': use 'fused', 'foreach' or 'single'"
