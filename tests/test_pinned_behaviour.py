"""Behaviour pinned to values, end to end: a trained model's predictions (Python and CLI) are its own forward pass and
clear a Dice floor; `--resume` restores exactly the state in last.pth; a non-finite loss leaves the weights as they were
before the bad batch; the CLI's error messages name what was wrong. Each test here fails under a plausible bug that the
range checks of the other files let through (see `make mutants`)."""
import copy, csv, json
import numpy as np
import pandas as pd
import pytest, torch
import torch.nn.functional as F
from PIL import Image
from fastai.callback.core import Callback

import ds2net.demo
import ds2net.train
from ds2net.cli import main
from ds2net.callbacks import NonFiniteLossError
from ds2net.checkpoint import read_checkpoint
from ds2net.data import make_synthetic, segmentation_dls
from ds2net.evaluate import SYNTHETIC_TEST_SEED
from ds2net.inference import model_from_checkpoint, predict_probabilities, predict_files
from ds2net.learner import ds2net_learner
from ds2net.metrics import evaluate_set
from ds2net.model import TINY_ENCODER
from ds2net.train import train, TrainingInterrupted
from support import EASY
from support import PoisonAt


DICE_FLOOR = 0.6  # the run below reaches about 0.8 on held-out images; an inverted or broken prediction gets well under 0.3


@pytest.fixture(scope='module')
def trained(trained_run):
    "The session's tiny trained run (conftest.py): 6 epochs on easy synthetic polyps."
    return trained_run


@pytest.fixture(scope='module')
def held_out():
    "Held-out synthetic images of the training size and of other sizes, with their masks (never seen in training)."
    images, masks = make_synthetic('polyp', 12, size=64, seed=SYNTHETIC_TEST_SEED, difficulty=0.2)
    return images, masks


def _normalise(images:np.ndarray, cfg)->torch.Tensor:
    "By hand: uint8 (B, H, W, 3) → (x / 255 − mean) / std, channels first."
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)


def _forward_probability(model, x, size=None)->np.ndarray:
    "The model's own answer: sigmoid of the sum of its six side-output logits (optionally resized as logits)."
    model.eval()
    with torch.no_grad(): fused = sum(model(x))
    if size is not None: fused = F.interpolate(fused, size=size, mode='bilinear', align_corners=False)
    return torch.sigmoid(fused)[:, 0].numpy()


def _dice(pred:np.ndarray, gt:np.ndarray)->float:
    p, g = pred.astype(bool), gt.astype(bool)
    return 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())


def test_predict_probabilities_are_the_models_forward_pass(trained, held_out):
    out, _ = trained
    model, cfg = model_from_checkpoint(out / 'best.pth')
    images, _ = held_out
    assert cfg['size'] == 64 and images.shape[1:3] == (64, 64)
    probs = np.stack(predict_probabilities(model, list(images), cfg, bs=5))
    np.testing.assert_allclose(probs, _forward_probability(model, _normalise(images, cfg)), atol=1e-5)
    # another size: the image is resized to the training size, the fused logits back to the image's size
    big = np.asarray(Image.fromarray(images[0]).resize((80, 96), Image.BILINEAR))
    small = np.asarray(Image.fromarray(big).resize((64, 64), Image.BILINEAR))
    got = predict_probabilities(model, [big], cfg)[0]
    assert got.shape == (96, 80)
    np.testing.assert_allclose(got, _forward_probability(model, _normalise(small[None], cfg), size=(96, 80))[0], atol=1e-5)


def test_cli_predict_writes_the_models_probabilities(trained, held_out, tmp_path, capsys):
    out, _ = trained
    model, cfg = model_from_checkpoint(out / 'best.pth')
    images, _ = held_out
    src = tmp_path / 'in'; src.mkdir()
    for i, im in enumerate(images[:4]): Image.fromarray(im).save(src / f'im{i}.png')
    assert main(['predict', '--model', str(out / 'best.pth'), '--input', str(src), '--out', str(tmp_path / 'pred'),
                 '--device', 'cpu']) == 0
    assert f"4 probability masks written to {tmp_path / 'pred'}" in capsys.readouterr().out
    expected = _forward_probability(model, _normalise(images[:4], cfg))
    for i in range(4):
        written = np.asarray(Image.open(tmp_path / 'pred' / f'im{i}.png')).astype(float)
        assert np.abs(written - np.round(expected[i] * 255)).max() <= 1  # 8-bit rounding of the same probabilities
    # the Python function writes the same files
    paths = predict_files(out / 'best.pth', src, tmp_path / 'pred2', device='cpu')
    assert [p.name for p in paths] == [f'im{i}.png' for i in range(4)]
    for p in paths: assert p.read_bytes() == (tmp_path / 'pred' / p.name).read_bytes()


def test_trained_model_clears_a_dice_floor_on_held_out_images(trained, held_out):
    out, summary = trained
    assert summary['best_dice'] >= DICE_FLOOR  # on its validation split
    model, cfg = model_from_checkpoint(out / 'best.pth')
    images, masks = held_out
    probs = predict_probabilities(model, list(images), cfg)
    dice = np.mean([_dice(p > 0.5, m) for p, m in zip(probs, masks)])
    assert dice >= DICE_FLOOR, dice
    # and the opposite answer is far below it: the floor tells a prediction from its inverse
    assert np.mean([_dice(p <= 0.5, m) for p, m in zip(probs, masks)]) < 0.3


def test_evaluate_scores_the_models_own_predictions(trained, held_out, tmp_path):
    "`ds2net evaluate` on synthetic data: the table equals the metrics of the model's forward pass on the same images."
    out, _ = trained
    model, cfg = model_from_checkpoint(out / 'best.pth')
    assert main(['evaluate', '--model', str(out / 'best.pth'), '--data', 'synthetic:polyp', '--n-synthetic', '12',
                 '--device', 'cpu', '--out', str(tmp_path / 't.csv')]) == 0
    table = pd.read_csv(tmp_path / 't.csv', index_col=0)
    # the CLI's synthetic test set: 12 images of the checkpoint's size from the held-out seed, at its default difficulty
    images, masks = make_synthetic('polyp', 12, size=64, seed=SYNTHETIC_TEST_SEED)
    probs = _forward_probability(model, _normalise(images, cfg))
    expected = evaluate_set(list(probs), list(masks))
    for name in ('meanDic', 'meanIoU', 'MAE', 'Sm'):
        assert table[name].iloc[0] == pytest.approx(expected[name], abs=2e-3), name


class Snapshot(Callback):
    "Copies of the model's and optimizer's state when the fit starts (after any resume has loaded them)."
    order = -100
    def before_fit(self):
        self.model_state = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
        self.opt_state = copy.deepcopy(self.learn.opt.state_dict())


class InterruptAt(Callback):
    "Interrupt training (as Ctrl-C would) after a chosen batch of a chosen epoch: no signal, no timing."
    def __init__(self, epoch, batch): self.at = (epoch, batch)
    def after_batch(self):
        if self.training and (self.epoch, self.iter) == self.at: raise KeyboardInterrupt


def _assert_same_state(a:dict, b:dict, what:str):
    assert a.keys() == b.keys(), what
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f'{what}: {k}')


def test_resume_restores_the_model_and_optimizer_of_last_pth(tmp_path):
    out = tmp_path / 'run'
    small = dict(EASY, n_synthetic=32)
    train('synthetic:polyp', out, epochs=2, **small)
    saved = read_checkpoint(out / 'last.pth')
    snap = Snapshot()
    train('synthetic:polyp', out, epochs=3, resume=True, extra_cbs=[snap], **small)
    _assert_same_state(snap.model_state, saved['model'], 'model after --resume')
    state, saved_state = snap.opt_state["state"], saved['opt']['state']
    assert len(state) == len(saved_state) == len(list(snap.learn.model.parameters()))
    steps = {int(s['step']) for s in saved_state if 'step' in s}
    assert steps == {2 * 3}, steps  # 26 training images, batches of 8 (the last one dropped): 3 steps an epoch, 2 epochs
    for i, (s, t) in enumerate(zip(state, saved_state)):
        assert s.keys() == t.keys(), i
        for k in s:
            if isinstance(s[k], torch.Tensor): torch.testing.assert_close(s[k], t[k], rtol=0, atol=0, msg=f'optimizer state {i}.{k}')
            else: assert s[k] == t[k], (i, k)


def _log_rows(run):
    return list(csv.reader(open(run / 'log.csv')))


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    small = dict(EASY, n_synthetic=32)
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    train('synthetic:polyp', whole, epochs=3, **small)
    with pytest.raises(TrainingInterrupted, match='Training interrupted in epoch 2'):
        train('synthetic:polyp', cut, epochs=3, extra_cbs=[InterruptAt(1, 1)], **small)
    assert read_checkpoint(cut / 'last.pth')['epoch'] == 1
    train('synthetic:polyp', cut, epochs=3, resume=True, **small)
    a, b = read_checkpoint(whole / 'last.pth'), read_checkpoint(cut / 'last.pth')
    assert a['epoch'] == b['epoch'] == 3 and a['completed'] and b['completed']
    assert len(a['weights_history']) == len(b['weights_history']) == 3
    ra, rb = _log_rows(whole), _log_rows(cut)
    assert ra[0] == rb[0] and [r[0] for r in ra[1:]] == [r[0] for r in rb[1:]] == ['0', '1', '2']
    # the epoch finished before the interruption is the uninterrupted run's first epoch, to the digit (same seed)
    assert ra[1][:-1] == rb[1][:-1]


def test_log_never_runs_ahead_of_last_pth_when_a_checkpoint_write_fails(tmp_path, monkeypatch):
    "The disk fills up while last.pth of epoch 2 is written: the log still ends where last.pth ends (epoch 1)."
    import ds2net.checkpoint
    real, writes = ds2net.checkpoint.save_checkpoint, []
    def failing(path, *args, **kwargs):
        if path.name == 'last.pth':
            writes.append(path)
            if len(writes) == 2: raise OSError(28, 'No space left on device', str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(ds2net.checkpoint, 'save_checkpoint', failing)
    out = tmp_path / 'run'
    with pytest.raises(OSError, match='No space left on device'):
        train('synthetic:polyp', out, epochs=3, **dict(EASY, n_synthetic=32))
    assert read_checkpoint(out / 'last.pth')['epoch'] == 1
    assert [r[0] for r in _log_rows(out)[1:]] == ['0']


def test_nonfinite_loss_leaves_every_parameter_as_before_the_bad_batch():
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=20, seed=0, device='cpu')
    poison = PoisonAt(1, 1)
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, lr=1e-3, cbs=[poison])
    with pytest.raises(NonFiniteLossError, match=r'became nan at epoch 2 of 2, batch 2 of \d+'): learn.fit(2)
    assert poison.before is not None
    for n, p in learn.model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert torch.equal(p.detach(), poison.before[n]), f'{n} changed by the step with the NaN loss'
    # no optimizer state was touched by the bad batch either: Adam's running averages stay finite
    for s in learn.opt.state_dict()['state']:
        for k, v in s.items():
            if isinstance(v, torch.Tensor): assert torch.isfinite(v).all(), k


TINY = ['--encoder', TINY_ENCODER, '--size', '64', '--bs', '4', '--epochs', '1', '--device', 'cpu']


@pytest.mark.parametrize('data,message', [
    ('{tmp}/nowhere', '--data {tmp}/nowhere: no such folder; give a data folder (check it with `ds2net validate`) or synthetic:<kind>'),
    ('synthetic:polyps', '--data synthetic:polyps: use one of synthetic:polyp, synthetic:ultrasound, synthetic:nuclei or a folder'),
    ('{tmp}/empty', '{tmp}/empty: the folder is empty; put a data set there (see `ds2net synth` for a synthetic one)'),
])
def test_train_with_bad_data_names_it(tmp_path, capsys, data, message):
    (tmp_path / 'empty').mkdir()
    data, message = data.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(['train', '--data', data, '--out', str(tmp_path / 'run'), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith('ds2net train: error: ') and message in err and 'Traceback' not in err
    assert not (tmp_path / 'run').exists()


def test_evaluate_with_bad_data_names_it(trained, tmp_path, capsys):
    out, _ = trained
    ok = str(out / 'best.pth')
    for data, message in [(tmp_path / 'nowhere', f"--data {tmp_path / 'nowhere'}: no such folder; give a data folder "
                                                 "(check it with `ds2net validate`) or synthetic:<kind>"),
                          ('synthetic:polyps', '--data synthetic:polyps: use one of synthetic:polyp, synthetic:ultrasound, '
                                               'synthetic:nuclei or a folder')]:
        assert main(['evaluate', '--model', ok, '--data', 'synthetic:polyp', str(data), '--device', 'cpu']) == 1
        err = capsys.readouterr()
        assert f'ds2net evaluate: error: {message}' in err.err and 'Traceback' not in err.err
        assert err.out == ''  # refused before the first (good) set was evaluated
    assert main(['evaluate', '--model', str(tmp_path / 'none.pth'), '--data', 'synthetic:polyp']) == 1
    assert f'ds2net evaluate: error: ds2net checkpoint not found: {tmp_path / "none.pth"}' in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='the message is for machines without a CUDA GPU')
def test_device_cuda_without_a_gpu_says_so(trained, tmp_path, capsys):
    assert main(['train', '--data', 'synthetic:polyp', '--out', str(tmp_path / 'run'), *TINY[:-1], 'cuda']) == 1
    err = capsys.readouterr().err
    assert 'ds2net train: error: --device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu' in err
    assert not (tmp_path / 'run').exists()
    img = tmp_path / 'a.png'; Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    assert main(['predict', '--model', str(trained[0] / 'best.pth'), '--input', str(img), '--out', str(tmp_path / 'p'),
                 '--device', 'cuda']) == 1
    assert '--device cuda was asked for but PyTorch sees no CUDA GPU here' in capsys.readouterr().err
    assert not (tmp_path / 'p').exists()


def test_fp16_on_the_cpu_is_refused_with_the_way_out(tmp_path, capsys):
    assert main(['train', '--data', 'synthetic:polyp', '--out', str(tmp_path / 'run'), *TINY, '--precision', 'fp16']) == 1
    err = capsys.readouterr().err
    assert ("ds2net train: error: --precision fp16 uses fastai's mixed precision with a gradient scaler, which needs a "
            "CUDA GPU; use bf16 or fp32 on the CPU") in err


def test_demo_with_a_tiny_configuration(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ds2net.demo, 'DEMO_CONFIG', dict(ds2net.demo.DEMO_CONFIG, size=64, n_synthetic=32, bs=8))
    monkeypatch.setattr(ds2net.demo, 'DEMO_TEST_IMAGES', 6)
    out = tmp_path / 'demo'
    assert main(['demo', '--out', str(out), '--epochs', '1']) == 0
    text = capsys.readouterr().out
    for name in ('best.pth', 'last.pth', 'log.csv', 'weights.png', 'metrics.csv', 'predictions.png', 'summary.json'):
        assert (out / name).is_file(), name
    summary = json.loads((out / 'summary.json').read_text())
    table = pd.read_csv(out / 'metrics.csv', index_col=0)
    assert table['n'].tolist() == [6] and summary['meanDic'] == pytest.approx(table['meanDic'].iloc[0])
    assert summary['epochs'] == 1 and summary['device'] == 'cpu'
    assert f'Demo written to {out}: best.pth, last.pth, log.csv, weights.png, metrics.csv, predictions.png' in text
    assert f"validation meanDic on 6 held-out synthetic images: {summary['meanDic']:.4f}" in text
    assert Image.open(out / 'predictions.png').size[0] > 400  # a grid of six columns
