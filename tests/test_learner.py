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
