"The `ds2net` command line: train, resume after SIGTERM, evaluate, predict, synth, convert, validate."
import csv, functools, hashlib, os, signal
import numpy as np
import pandas as pd
import pytest
from pathlib import Path
from PIL import Image
from fastai.callback.core import Callback

import ds2net.cli
from ds2net.cli import main, build_parser
from ds2net.callbacks import read_checkpoint, NonFiniteLossError
from ds2net.learner import train
from ds2net.metrics import METRIC_NAMES
from ds2net.model import TINY_ENCODER

TINY = ['--data', 'synthetic:polyp', '--encoder', TINY_ENCODER, '--size', '64', '--bs', '4', '--lr', '1e-3', '--device', 'cpu',
        '--n-synthetic', '16']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    assert main(['train', *TINY, '--epochs', '2', '--out', str(out)]) == 0
    return out


def test_train_writes_checkpoints_log_and_plot(trained):
    for name in ('best.pth', 'last.pth', 'log.csv', 'weights.png', 'summary.json'): assert (trained / name).is_file(), name
    log = pd.read_csv(trained / 'log.csv')
    assert list(log.columns[:5]) == ['epoch', 'train_loss', 'valid_loss', 'dice', 'iou'] and len(log) == 2
    ckpt = read_checkpoint(trained / 'last.pth')
    assert ckpt['epoch'] == 2 and ckpt['completed']
    # Adam's state for every parameter, after as many steps as the two epochs took (12 training images in batches of 4)
    state = ckpt['opt']['state']
    assert len(state) == len(ckpt['model']) - sum(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) for k in ckpt['model'])
    assert {int(s['step']) for s in state} == {2 * 3}
    cfg = ckpt['config']
    assert cfg['encoder'] == TINY_ENCODER and cfg['channels'] == 32 and cfg['size'] == 64
    assert cfg['mean'] == pytest.approx([0.485, 0.456, 0.406]) and cfg['std'] == pytest.approx([0.229, 0.224, 0.225])
    assert len(ckpt['weights_history']) == 2 and ckpt['weights_history'][0].shape[1] == 6


def test_evaluate_from_checkpoint_alone(trained, tmp_path):
    main(['synth', '--kind', 'polyp', '--n', '5', '--size', '96', '--seed', '7', '--out', str(tmp_path / 'set')])
    csv_path = tmp_path / 'table.csv'
    assert main(['evaluate', '--model', str(trained / 'best.pth'), '--data', 'synthetic:polyp', str(tmp_path / 'set'),
                 '--n-synthetic', '6', '--out', str(csv_path), '--device', 'cpu']) == 0
    table = pd.read_csv(csv_path, index_col=0)
    assert list(table.columns[:13]) == list(METRIC_NAMES) and len(table) == 2
    assert table['n'].tolist() == [6, 5]
    # each row is the metrics of the checkpoint's own predictions on that set (predictions pinned in test_pinned_behaviour)
    from ds2net.callbacks import model_from_checkpoint
    from ds2net.learner import predict_probabilities
    from ds2net.metrics import evaluate_set, load_test_sets
    model, cfg = model_from_checkpoint(trained / 'best.pth')
    for row, data in zip(table.index, ['synthetic:polyp', tmp_path / 'set']):
        (images, masks), = load_test_sets(data, n_synthetic=6, size=64).values()
        expected = evaluate_set(predict_probabilities(model, images, cfg), masks)
        assert table.loc[row, 'meanDic'] == pytest.approx(expected['meanDic'], abs=1e-4) and table.loc[row, 'MAE'] == pytest.approx(expected['MAE'], abs=1e-4)


def _md5(p): return hashlib.md5(Path(p).read_bytes()).hexdigest()


def test_predict_writes_masks_at_original_sizes(trained, tmp_path):
    src = tmp_path / 'in put é'; src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(src / 'a.png')
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(src / 'b b.jpg')
    (src / 'notes.txt').write_text('not an image')
    before = {p.name: _md5(p) for p in src.iterdir()}
    assert main(['predict', '--model', str(trained / 'best.pth'), '--input', str(src), '--out', str(tmp_path / 'pred'), '--overlay', '--device', 'cpu']) == 0
    a, b = Image.open(tmp_path / 'pred' / 'a.png'), Image.open(tmp_path / 'pred' / 'b b.png')
    assert a.size == (100, 80) and b.size == (70, 50) and a.mode == 'L'
    assert Image.open(tmp_path / 'pred' / 'a_overlay.png').size == (100, 80)
    assert {p.name: _md5(p) for p in src.iterdir()} == before
    assert main(['predict', '--model', str(trained / 'best.pth'), '--input', str(src), '--out', str(src)]) == 1
    assert main(['predict', '--model', str(trained / 'best.pth'), '--input', str(tmp_path / 'nope'), '--out', str(tmp_path / 'p2')]) == 1


def test_resume_refuses_another_encoder(trained, tmp_path, capsys):
    run = tmp_path / 'copy'; run.mkdir()
    (run / 'last.pth').write_bytes((trained / 'last.pth').read_bytes())
    args = ['train', *TINY, '--epochs', '3', '--out', str(run), '--resume']
    args[args.index('--encoder') + 1] = 'resnet18'
    assert main(args) == 1
    assert "trained with encoder 'resnet10t' and 32 channels, not 'resnet18'" in capsys.readouterr().err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    assert main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'empty'), '--resume']) == 1
    err = capsys.readouterr().err
    assert f"ds2net train: error: --resume: no {tmp_path / 'empty' / 'last.pth'} to resume from; train without --resume first" in err
    assert not (tmp_path / 'empty').exists()


class SigtermMidEpoch(Callback):
    "Send this process SIGTERM after the second training batch of the second epoch (no timers: the same on any machine)."
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 1: os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_then_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    args = ['train', *TINY, '--n-synthetic', '32', '--epochs', '4', '--out', str(out)]
    monkeypatch.setattr(ds2net.cli, 'train', functools.partial(train, extra_cbs=[SigtermMidEpoch()]))
    assert main(args) == 130
    err = capsys.readouterr().err
    assert 'Training interrupted in epoch 2' in err and 'continue with --resume' in err
    ckpt = read_checkpoint(out / 'last.pth')
    assert ckpt['epoch'] == 1 and not ckpt['completed'] and ckpt['interrupted'] == 'SIGTERM in epoch 2, batch 2'
    assert [r[0] for r in csv.reader(open(out / 'log.csv'))] == ['epoch', '0']  # the log agrees with last.pth
    monkeypatch.undo()
    assert main(args + ['--resume']) == 0
    final = read_checkpoint(out / 'last.pth')
    assert final['epoch'] == 4 and final['completed']
    assert len(final['weights_history']) == 4  # the history of the epochs before the stop was kept
    rows = list(csv.reader(open(out / 'log.csv')))
    assert rows[0][0] == 'epoch' and [r[0] for r in rows[1:]] == ['0', '1', '2', '3']  # one header, each epoch once


def test_nonfinite_loss_keeps_last_good_checkpoint(tmp_path):
    class Poison(Callback):
        order = -6
        def after_pred(self):
            if self.training and self.epoch == 1 and self.iter == 0: self.learn.pred = tuple(p * float('inf') for p in self.pred)
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError, match=r'at epoch 2 of 3, batch 1 of'):
        train('synthetic:polyp', out, encoder=TINY_ENCODER, size=64, bs=4, epochs=3, lr=1e-3, n_synthetic=16, device='cpu', extra_cbs=[Poison()])
    assert read_checkpoint(out / 'last.pth')['epoch'] == 1


def test_synth_is_deterministic_and_validate(tmp_path):
    for d in ('a', 'b'):
        assert main(['synth', '--kind', 'ultrasound', '--n', '3', '--size', '64', '--seed', '5', '--out', str(tmp_path / d)]) == 0
    files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*.png'))
    assert len(files) == 6
    assert all((tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes() for f in files)
    assert main(['validate', str(tmp_path / 'a')]) == 0
    (tmp_path / 'a' / 'masks' / files[-1].name).unlink()  # an image without its mask
    assert main(['validate', str(tmp_path / 'a')]) == 1


def test_convert_busi_and_dsb(tmp_path):
    busi = tmp_path / 'BUSI'
    for cls in ('benign', 'normal'):
        (busi / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(busi / cls / f'{cls} (1).png')
        m = np.zeros((20, 30), np.uint8); m[2:8, 3:9] = 255 if cls == 'benign' else 0
        Image.fromarray(m).save(busi / cls / f'{cls} (1)_mask.png')
    assert main(['convert', '--from', 'busi', str(busi), '--out', str(tmp_path / 'busi_out')]) == 0
    assert len(list((tmp_path / 'busi_out' / 'masks').iterdir())) == 2
    assert main(['convert', '--from', 'busi', str(busi), '--out', str(tmp_path / 'busi_nn'), '--no-normal']) == 0
    assert len(list((tmp_path / 'busi_nn' / 'masks').iterdir())) == 1
    dsb = tmp_path / 'dsb' / 'abc'
    (dsb / 'images').mkdir(parents=True); (dsb / 'masks').mkdir()
    Image.fromarray(np.full((16, 16, 4), 120, np.uint8)).save(dsb / 'images' / 'abc.png')
    for i, (y, x) in enumerate([(2, 2), (9, 9)]):
        m = np.zeros((16, 16), np.uint8); m[y:y + 4, x:x + 4] = 255
        Image.fromarray(m).save(dsb / 'masks' / f'n{i}.png')
    assert main(['convert', '--from', 'dsb2018', str(tmp_path / 'dsb'), '--out', str(tmp_path / 'dsb_out')]) == 0
    mask = np.array(Image.open(next((tmp_path / 'dsb_out' / 'masks').iterdir())))
    assert (mask > 0).sum() == 32


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit): build_parser().parse_args(['train', '--data', 'x', '--out', 'o', '--multiscale', '1,a'])
    assert 'expected numbers separated by commas' in capsys.readouterr().err
    assert build_parser().parse_args(['train', '--data', 'x', '--out', 'o', '--weighting', '1,0,1,0,1,0']).weighting == (1, 0, 1, 0, 1, 0)


def test_relative_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(['train', *TINY, '--epochs', '1', '--out', 'runs/rel']) == 0
    assert sorted(p.name for p in (tmp_path / 'runs' / 'rel').iterdir()) == ['best.pth', 'last.pth', 'log.csv', 'summary.json', 'weights.png']
