"""The `ds2net` command line as a skeptical user tries it: train, resume after SIGTERM, evaluate, predict, synth,
convert, validate; nothing the user made is lost, bad flags are refused before any work starts naming the flag, defaults
work from scratch, the log agrees with the checkpoint, logs stay plain, and the command starts at once."""
import csv, functools, os, pathlib, shutil, signal, subprocess, sys
import numpy as np
import pandas as pd
import pytest, torch
from pathlib import Path
from PIL import Image
from fastai.callback.core import Callback

import ds2net.cli, ds2net.data, ds2net.learner, ds2net.train
from ds2net.cli import main, build_parser
from ds2net.errors import WeightsError
from ds2net.callbacks import NonFiniteLossError
from ds2net.checkpoint import read_checkpoint, CHECKPOINT_FORMAT
from ds2net.data import segmentation_dls
from ds2net.inference import model_from_checkpoint
from ds2net.learner import ds2net_learner, FROM_SCRATCH_LR, FINE_TUNE_LR
from ds2net.metrics import METRIC_NAMES
from ds2net.model import TINY_ENCODER
from ds2net.train import train, run_training
from support import CLI, PoisonAt, log_epochs, md5, strict_json, train_args, tree


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
    from ds2net.inference import model_from_checkpoint, predict_probabilities
    from ds2net.metrics import evaluate_set
    from ds2net.evaluate import load_test_sets
    model, cfg = model_from_checkpoint(trained / 'best.pth')
    for row, data in zip(table.index, ['synthetic:polyp', tmp_path / 'set']):
        (images, masks), = load_test_sets(data, n_synthetic=6, size=64).values()
        expected = evaluate_set(predict_probabilities(model, images, cfg), masks)
        assert table.loc[row, 'meanDic'] == pytest.approx(expected['meanDic'], abs=1e-4) and table.loc[row, 'MAE'] == pytest.approx(expected['MAE'], abs=1e-4)


def test_predict_writes_masks_at_original_sizes(trained, tmp_path):
    src = tmp_path / 'in put é'; src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(src / 'a.png')
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(src / 'b b.jpg')
    (src / 'notes.txt').write_text('not an image')
    before = {p.name: md5(p) for p in src.iterdir()}
    assert main(['predict', '--model', str(trained / 'best.pth'), '--input', str(src), '--out', str(tmp_path / 'pred'), '--overlay', '--device', 'cpu']) == 0
    a, b = Image.open(tmp_path / 'pred' / 'a.png'), Image.open(tmp_path / 'pred' / 'b b.png')
    assert a.size == (100, 80) and b.size == (70, 50) and a.mode == 'L'
    assert Image.open(tmp_path / 'pred' / 'a_overlay.png').size == (100, 80)
    assert {p.name: md5(p) for p in src.iterdir()} == before
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
    monkeypatch.setattr(ds2net.train, 'run_training', functools.partial(run_training, extra_cbs=[SigtermMidEpoch()]))
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
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError, match=r'at epoch 2 of 3, batch 1 of'):
        train('synthetic:polyp', out, encoder=TINY_ENCODER, size=64, bs=4, epochs=3, lr=1e-3, n_synthetic=16, device='cpu', extra_cbs=[PoisonAt(1, 0, float('inf'))])
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


def test_convert_busi_and_dsb(tmp_path, capsys):
    busi = tmp_path / 'BUSI'
    for cls in ('benign', 'normal'):
        (busi / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(busi / cls / f'{cls} (1).png')
        m = np.zeros((20, 30), np.uint8); m[2:8, 3:9] = 255 if cls == 'benign' else 0
        Image.fromarray(m).save(busi / cls / f'{cls} (1)_mask.png')
    assert main(['convert', '--from', 'busi', str(busi), '--out', str(tmp_path / 'busi_out')]) == 0
    assert capsys.readouterr().out == f"2 images and their masks written to {tmp_path / 'busi_out'}\n"  # the count written (item 7)
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


def test_predict_refuses_dataset_masks_and_existing_files(logged_run, synthetic_folder, tmp_path, capsys):
    run, _ = logged_run
    masks_before = tree(synthetic_folder / 'masks')
    for extra in ([], ['--overwrite']):
        assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(synthetic_folder / 'images'),
                     '--out', str(synthetic_folder / 'masks'), *extra]) == 1
        err = capsys.readouterr().err
        assert f"--out {synthetic_folder / 'masks'} is the masks folder of a data set" in err and 'not even with --overwrite' in err
    assert tree(synthetic_folder / 'masks') == masks_before
    out = tmp_path / 'pred'; out.mkdir()
    mine = out / 'polyp_00003.png'; mine.write_bytes(b'my own file')
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(synthetic_folder / 'images'), '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert f'--out {out} already holds polyp_00003.png' in err and 'pass --overwrite to replace them' in err
    assert mine.read_bytes() == b'my own file' and list(out.iterdir()) == [mine]  # refused before writing anything
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(synthetic_folder / 'images'), '--out', str(out),
                 '--overwrite']) == 0
    assert '16 probability masks written' in capsys.readouterr().out
    assert mine.read_bytes() != b'my own file' and len(list(out.iterdir())) == 16


def test_train_refuses_a_finished_run_without_resume(logged_run, synthetic_folder, capsys):
    run, _ = logged_run
    before = tree(run)
    assert main(train_args(synthetic_folder, run, '--epochs', '1')) == 1
    err = capsys.readouterr().err
    assert f'--out {run} already holds best.pth, last.pth, log.csv, summary.json, weights.png' in err
    assert 'pass --resume to continue the run in it, --overwrite to replace its files' in err
    assert tree(run) == before and log_epochs(run) == [0, 1]


def test_overwrite_replaces_only_the_run_files_and_weights_give_the_paper_lr(logged_run, synthetic_folder, tmp_path):
    "--overwrite replaces the old run (and nothing else); with ImageNet-style encoder weights the default lr is 1e-4."
    import timm
    run = tmp_path / 'run'
    shutil.copytree(logged_run[0], run)
    (run / 'notes.txt').write_text('mine')
    weights = tmp_path / 'resnet10t.pth'
    torch.save(timm.create_model(TINY_ENCODER, pretrained=False).state_dict(), weights)
    assert main(train_args(synthetic_folder, run, '--epochs', '1', '--overwrite', '--encoder-weights', str(weights))) == 0
    assert log_epochs(run) == [0] and (run / 'notes.txt').read_text() == 'mine'
    summary = strict_json((run / 'summary.json').read_text())
    assert summary['lr'] == FINE_TUNE_LR == 1e-4 and summary['lr_source'] == 'default with ImageNet weights'
    assert read_checkpoint(run / 'last.pth')['config']['lr'] == 1e-4


def test_predict_names_never_clash(logged_run, tmp_path, capsys):
    run, _ = logged_run
    src = tmp_path / 'in'; src.mkdir()
    sizes = {'a.png': (40, 50), 'a.jpg': (60, 70), 'x.png': (44, 66), 'x_overlay.png': (52, 36)}
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items(): Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / name)
    out = tmp_path / 'pred'
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(src), '--out', str(out), '--overlay']) == 0
    assert '4 probability masks and 4 overlays written' in capsys.readouterr().out
    expected = {'a.png': 'a_png', 'a.jpg': 'a_jpg', 'x.png': 'x_png', 'x_overlay.png': 'x_overlay_png'}
    assert sorted(p.name for p in out.iterdir()) == sorted(n + s for n in expected.values() for s in ('.png', '_overlay.png'))
    for name, stem in expected.items():  # each output belongs to its own input: it has that input's size
        h, w = sizes[name]
        assert Image.open(out / f'{stem}.png').size == (w, h) and Image.open(out / f'{stem}_overlay.png').size == (w, h)


def test_resume_cuts_a_log_that_ran_ahead(logged_run, synthetic_folder, tmp_path):
    "A process killed outright (no handler) between two writes: resume rewrites the log from last.pth."
    run = tmp_path / 'run'
    shutil.copytree(logged_run[0], run)
    with open(run / 'log.csv', 'a') as f: f.write('2,1.0,1.0,0.5,0.5,00:01\n')
    assert main(train_args(synthetic_folder, run, '--epochs', '3', '--resume')) == 0
    assert log_epochs(run) == [0, 1, 2]


BAD_FLAGS = [
    (['--epochs', '0'], '--epochs 0: train for at least 1 epoch'),
    (['--epochs', '-1'], '--epochs -1: train for at least 1 epoch'),
    (['--lr', '-1'], '--lr -1.0: the learning rate must be a positive number'),
    (['--lr', 'nan'], '--lr nan: the learning rate must be a positive number'),
    (['--bs', '0'], '--bs 0: the batch size must be a whole number of at least 1'),
    (['--workers', '-1'], '--workers -1: the number of DataLoader worker processes must be 0 or more'),
    (['--size', '0'], '--size 0: DS2Net needs images of at least 32×32 pixels'),
    (['--size', '-5'], '--size -5: DS2Net needs images of at least 32×32 pixels'),
    (['--size', '16'], '--size 16: DS2Net needs images of at least 32×32 pixels'),
    (['--channels', '0'], '--channels 0: the decoder width must be a whole number of at least 1'),
    (['--weighting', '1,1'], '--weighting 1.0,1.0: DS2Net has 6 side outputs (d1, d2, d3, s1, s2, s3): give 6 weights'),
    (['--clip', '-1'], '--clip -1.0: clip gradients at a positive value'),
    (['--multiscale', '0,1'], '--multiscale 0.0,1.0: give positive scales'),
    (['--encoder', 'no_such_net'], '--encoder no_such_net: timm has no model of that name'),
    (['--encoder-weights', 'missing.pth'], '--encoder-weights missing.pth: no such file'),
    (['--precision', 'fp16'], "--precision fp16 uses fastai's mixed precision with a gradient scaler, which needs a CUDA GPU"),
    (['--resume', '--overwrite'], '--resume and --overwrite contradict each other'),
]


@pytest.fixture
def nothing_built(monkeypatch):
    "Fail the test if data or a model were built."
    def built(*a, **k): raise AssertionError('data or model built before the arguments were checked')
    monkeypatch.setattr(ds2net.data, 'segmentation_dls', built)   # what the run driver builds its data with
    monkeypatch.setattr(ds2net.learner, 'DS2Net', built)


@pytest.mark.parametrize('flags,message', BAD_FLAGS, ids=[' '.join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_up_front(synthetic_folder, tmp_path, capsys, nothing_built, flags, message):
    out = tmp_path / 'new'
    assert main(train_args(synthetic_folder, out, *flags)) == 1
    err = capsys.readouterr().err
    assert f'ds2net train: error: {message}' in err and 'Traceback' not in err
    assert not out.exists()


def test_bad_output_folders_are_refused_up_front(synthetic_folder, tmp_path, capsys, nothing_built, monkeypatch):
    afile = tmp_path / 'afile'; afile.write_text('mine')
    assert main(train_args(synthetic_folder, afile)) == 1
    assert f'--out {afile} is a file, not a folder' in capsys.readouterr().err
    assert main(train_args(synthetic_folder, afile / 'run')) == 1
    assert f'{afile} is a file, so no folder can be made inside it' in capsys.readouterr().err
    assert afile.read_text() == 'mine'
    # a folder that cannot be made (as root, permissions are not enforced: the refusal is simulated at mkdir)
    locked = tmp_path / 'locked' / 'run'
    real_mkdir = pathlib.Path.mkdir
    def mkdir(self, *a, **k):
        if self == locked: raise PermissionError(13, 'Permission denied', str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, 'mkdir', mkdir)
    assert main(train_args(synthetic_folder, locked, '--epochs', '1')) == 1
    err = capsys.readouterr().err
    assert f'--out {locked}: could not create the folder (Permission denied)' in err and 'Traceback' not in err


def test_failed_run_leaves_no_empty_folder(tmp_path, capsys):
    broken = tmp_path / 'broken'; (broken / 'images').mkdir(parents=True); (broken / 'masks').mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(broken / 'images' / 'a.png')  # masks/ is empty
    out = tmp_path / 'runs' / 'new'
    assert main(train_args(broken, out, '--epochs', '1')) == 1
    assert 'no masks found' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()  # every folder the run made is gone
    existing = tmp_path / 'mine'; existing.mkdir()
    assert main(train_args(broken, existing, '--epochs', '1')) == 1
    assert existing.is_dir()  # a folder the user made stays


def test_damaged_checkpoints_are_named(tmp_path, capsys):
    torch.save({'format': CHECKPOINT_FORMAT, 'model': {}}, tmp_path / 'noconfig.pth')
    with pytest.raises(WeightsError, match=r"noconfig.pth is marked as a ds2net checkpoint but is damaged \(no 'config'\)"):
        read_checkpoint(tmp_path / 'noconfig.pth')
    imgs = tmp_path / 'imgs'; imgs.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(imgs / 'a.png')
    assert main(['predict', '--model', str(tmp_path / 'noconfig.pth'), '--input', str(imgs), '--out', str(tmp_path / 'p')]) == 1
    err = capsys.readouterr().err
    assert "damaged (no 'config')" in err and 'KeyError' not in err and not (tmp_path / 'p').exists()


def test_summary_is_valid_json(logged_run):
    run, _ = logged_run
    summary = strict_json((run / 'summary.json').read_text())
    log = list(csv.reader(open(run / 'log.csv')))
    dice_column = log[0].index('dice')
    assert summary['epochs'] == 2 and summary['best_dice'] == pytest.approx(max(float(r[dice_column]) for r in log[1:]), abs=1e-4)


def test_default_lr_from_scratch(logged_run, tmp_path):
    run, text = logged_run
    assert build_parser().parse_args(['train', '--data', 'x', '--out', 'o']).lr is None
    help_text = build_parser()._subparsers._group_actions[0].choices['train'].format_help()
    assert '0.0001' in help_text and '0.003' in help_text and 'from scratch' in help_text
    summary = strict_json((run / 'summary.json').read_text())
    assert summary['lr'] == FROM_SCRATCH_LR == 3e-3 and summary['lr_source'] == 'default from scratch'
    assert 'at lr 0.003 (default from scratch)' in text
    assert read_checkpoint(run / 'last.pth')['config']['lr'] == 3e-3
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=8, seed=0, device='cpu')
    assert ds2net_learner(dls, encoder=TINY_ENCODER).lr == 3e-3
    assert ds2net_learner(dls, encoder=TINY_ENCODER, lr=5e-4).lr == 5e-4


def test_output_to_a_file_is_one_plain_line_per_epoch(logged_run):
    _, text = logged_run
    assert '\r' not in text and 'Warning' not in text and 'Epoch 1/2' not in text
    lines = text.splitlines()
    assert len(lines) == 4, text
    assert lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'dice', 'iou', 'time']
    assert [l.split()[0] for l in lines[1:3]] == ['0', '1'] and all(len(l.split()) == 6 for l in lines[1:3])
    assert lines[3].startswith('trained 2 epochs in ')


def test_no_jit_script_warning_and_the_filter_is_narrow():
    help_run = subprocess.run(CLI + ['--help'], capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and 'usage: ds2net' in help_run.stdout
    assert help_run.stderr == ''
    check = ("import warnings; import ds2net.cli; "
             "warnings.warn('another warning', FutureWarning)")
    other = subprocess.run([sys.executable, '-c', check], capture_output=True, text=True, timeout=300)
    assert other.returncode == 0 and 'another warning' in other.stderr and 'torch.jit.script' not in other.stderr
    # the dependency does warn without the filter: the test above is not empty
    bare = subprocess.run([sys.executable, '-c', 'import fastai.layers'], capture_output=True, text=True, timeout=300)
    assert '`torch.jit.script` is deprecated' in bare.stderr


def test_checkpoint_messages_and_plural(logged_run, tmp_path, capsys):
    run, _ = logged_run
    with pytest.raises(WeightsError, match=r'^ds2net checkpoint not found: '): read_checkpoint(tmp_path / 'none.pth')
    assert main(['evaluate', '--model', str(run), '--data', 'synthetic:polyp']) == 1
    assert f'{run} is a folder, not a checkpoint file: give the file itself, e.g. {run / "best.pth"}' in capsys.readouterr().err
    img = tmp_path / 'one.png'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    assert main(['predict', '--model', str(run / 'last.pth'), '--input', str(img), '--out', str(tmp_path / 'p')]) == 0
    assert f"1 probability mask written to {tmp_path / 'p'}" in capsys.readouterr().out


def test_best_checkpoint_holds_weights_and_config_only(logged_run):
    run, _ = logged_run
    best, last = read_checkpoint(run / 'best.pth'), read_checkpoint(run / 'last.pth')
    assert set(best) == {'format', 'config', 'model', 'epoch', 'best', 'monitor'}
    assert last['completed'] and last['log'] == list(csv.reader(open(run / 'log.csv')))
    assert len(last['opt']['state']) == sum(1 for k in last['model'] if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
    assert (run / 'best.pth').stat().st_size < 0.5 * (run / 'last.pth').stat().st_size
    for name in ('best.pth', 'last.pth'):  # both serve evaluate and predict
        model, cfg = model_from_checkpoint(run / name)
        assert cfg['encoder'] == TINY_ENCODER and cfg['size'] == 64
    for (k, a), b in zip(model_from_checkpoint(run / 'best.pth')[0].state_dict().items(), best['model'].values()):
        torch.testing.assert_close(a, b, msg=k)


def test_library_advice_is_rendered_in_flags(tmp_path, capsys, monkeypatch):
    "A library message names Python parameters (`clip_value=0.5`); the command line shows the same advice in its flags."
    monkeypatch.setattr(ds2net.train, 'run_training', functools.partial(run_training, extra_cbs=[PoisonAt(0, 0, float('inf'))]))
    assert main(['train', *TINY, '--epochs', '1', '--clip', '0', '--precision', 'fp32', '--out', str(tmp_path / 'run')]) == 1
    err = capsys.readouterr().err
    assert 'ds2net train: error: The loss became nan at epoch 1 of 1, batch 1 of' in err  # inf - inf in the loss
    assert 'Try a lower learning rate (`--lr`; it was 4e-05 at this step); gradients are not clipped: clip them (`--clip 0.5`).' in err
    assert 'clip_value' not in err
    monkeypatch.undo()
    assert main(['train', *TINY, '--clip', '-1', '--out', str(tmp_path / 'r2')]) == 1
    assert ('ds2net train: error: --clip -1.0: clip gradients at a positive value, e.g. 0.5 (--clip 0 turns clipping off)'
            in capsys.readouterr().err)


def test_help_validate_and_synth_import_nothing_heavy(synthetic_folder, tmp_path):
    "`ds2net --help`, `validate` and `synth` do not import fastai, torchvision or matplotlib's pyplot (they start at once)."
    code = ("import sys; from ds2net.cli import main\n"
            "try: main(sys.argv[1:])\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in ('fastai', 'torchvision', 'matplotlib.pyplot', 'captum', 'ipywidgets', 'accelerate') if m in sys.modules))")
    for args in (['--help'], ['validate', str(synthetic_folder)], ['synth', '--n', '2', '--size', '32', '--out', str(tmp_path / 's')]):
        r = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == '[]', (args, r.stdout[-300:], r.stderr[-300:])
    r = subprocess.run([sys.executable, '-c', "import sys, ds2net.cli; print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == 'False'  # importing the command line itself imports no torch


# ------------------------------------------------------------------ issue 16: outputs guarded, evaluate checked first

def test_evaluate_out_never_replaces_a_file(logged_run, synthetic_folder, tmp_path, capsys):
    "Item 2: `--out` over a checkpoint, a mask, an old table or into the data is refused before any prediction."
    run, _ = logged_run
    best = run / 'best.pth'
    mask = sorted((synthetic_folder / 'masks').iterdir())[0]
    old = tmp_path / 'table.csv'; old.write_text('my table')
    before = {p: md5(p) for p in (best, mask, old)}
    cmd = ['evaluate', '--model', str(best), '--data', str(synthetic_folder), '--device', 'cpu', '--out']
    for out, message in [
            (best, f'--out {best}: the metrics table is written as .csv; give a file name ending in .csv'),
            (mask, f'--out {mask}: the metrics table is written as .csv; give a file name ending in .csv'),
            (synthetic_folder / 'masks' / 't.csv', f"--out {synthetic_folder / 'masks' / 't.csv'} is inside --data "
             f"{synthetic_folder}, an input of this command: ds2net never writes into its inputs; choose another --out"),
            (run, f'--out {run} is a folder: give the name of a file for the metrics table, e.g. {run / "metrics.csv"}'),
            (old, f'--out {old} already exists: ds2net never replaces a file unless asked; pass --overwrite to replace it, '
                  'or choose another --out')]:
        assert main(cmd + [str(out)]) == 1
        err = capsys.readouterr()
        assert err.err == f'ds2net evaluate: error: {message}\n' and err.out == ''  # nothing evaluated
    assert {p: md5(p) for p in before} == before
    assert main(cmd + [str(old), '--overwrite']) == 0
    assert capsys.readouterr().out.endswith(f'written to {old}\n')
    assert pd.read_csv(old, index_col=0)['n'].tolist() == [16]


def test_bench_json_never_replaces_a_file(tmp_path, capsys, monkeypatch):
    "Item 2: `bench --json` over a checkpoint or an old report is refused before the benchmark runs (ds2net.bench's check)."
    import ds2net.bench
    runs = []
    def library_phase(*a, **k):  # the timed phase, faked: what matters is whether it ran
        runs.append(a); return {'precision': 'fp32', 'step_s': 0.5}, None
    monkeypatch.setattr(ds2net.bench, 'library_phase', library_phase)
    victim = tmp_path / 'best.pth'; victim.write_bytes(b'weights')
    old = tmp_path / 'bench.json'; old.write_text('{"mine": 1}')
    cmd = ['bench', '--device', 'cpu', '--encoder', TINY_ENCODER, '--no-authors', '--no-backends', '--workers', '', '--json']
    for path, message in [(victim, f'--json {victim}: the benchmark report is written as .json; give a file name ending in .json'),
                          (old, f'--json {old} already exists: ds2net never replaces a file unless asked; pass --overwrite to '
                                'replace it, or choose another --json')]:
        assert main(cmd + [str(path)]) == 1
        assert capsys.readouterr().err == f'ds2net bench: error: {message}\n'
    assert runs == [] and victim.read_bytes() == b'weights' and old.read_text() == '{"mine": 1}'
    assert main(cmd + [str(old), '--overwrite']) == 0
    assert capsys.readouterr().out == f'library step 0.500 s; written to {old}\n'
    assert strict_json(old.read_text())['library'] == {'precision': 'fp32', 'step_s': 0.5} and len(runs) == 1


WRITERS = {'train': 'out', 'evaluate': 'csv', 'predict': 'out', 'export': 'out', 'synth': 'out', 'convert': 'out',
           'bench': 'json', 'demo': 'out'}


def test_every_command_that_writes_has_overwrite():
    "Item 2, the class: a command with an output has --overwrite (a new command that writes must be listed here)."
    sub = build_parser()._subparsers._group_actions[0].choices
    outputs = {name for name, p in sub.items() if {a.dest for a in p._actions} & {'out', 'csv', 'json'}}
    assert outputs == set(WRITERS)
    for name, dest in WRITERS.items():
        overwrite = [a for a in sub[name]._actions if a.dest == 'overwrite']
        assert len(overwrite) == 1 and overwrite[0].option_strings == ['--overwrite'] and overwrite[0].const is True, name
        assert overwrite[0].default is False, name


def test_evaluate_warns_about_jpeg_masks_and_checks_sizes_first(logged_run, synthetic_folder, tmp_path, capsys):
    "Items 8 and 14: the warning training gives; a mask of another size named before any prediction."
    run, _ = logged_run
    data = tmp_path / 'jpeg'; shutil.copytree(synthetic_folder, data)
    for m in sorted((data / 'masks').iterdir()): Image.open(m).save(m.with_suffix('.jpg'), quality=75); m.unlink()
    with pytest.warns(UserWarning) as caught:
        assert main(['evaluate', '--model', str(run / 'best.pth'), '--data', str(data), '--device', 'cpu']) == 0
    message = [str(w.message) for w in caught if str(w.message).startswith(str(data))]
    assert len(message) == 1 and message[0].startswith(f'{data}: 16 warning(s), e.g. {data / "masks" / "polyp_00000.jpg"}: mask has ')
    assert 'grey levels (lossy JPEG or anti-aliased edges?)' in message[0]
    assert 'meanDic' in capsys.readouterr().out  # a warning, not an error: the table is printed
    mask = data / 'masks' / 'polyp_00002.jpg'
    Image.open(mask).resize((48, 40)).save(mask)
    assert main(['evaluate', '--model', str(run / 'best.pth'), '--data', str(data), '--device', 'cpu']) == 1
    out = capsys.readouterr()
    assert out.out == '' and out.err.endswith(
        f"ds2net evaluate: error: {data}: 1 error(s) in the data set (run `ds2net validate {data}` for the full report):\n"
        f"  - {mask}: mask is 48x40 but its image {data / 'images' / 'polyp_00002.png'} is 64x64; make them the same size "
        "(resize the mask with nearest-neighbour) or remove the pair\n")


def test_evaluate_a_dsb2018_download_says_convert_it_first(logged_run, tmp_path, capsys):
    "Item 14: one line, not one line per id."
    dsb = ds2net.data.write_example_layout('dsb2018', tmp_path / 'dsb', n=40)
    assert main(['evaluate', '--model', str(logged_run[0] / 'best.pth'), '--data', str(dsb), '--device', 'cpu']) == 1
    assert capsys.readouterr().err == (
        f"ds2net evaluate: error: --data {dsb} is a DSB2018 download (one sub-folder per id, each holding images/ and "
        f"masks/), not a test set in the images/masks layout: convert it first (`ds2net convert --from dsb2018 {dsb} --out "
        "<new folder>`, or `convert_dsb2018` in Python) and evaluate the converted folder\n")


# ------------------------------------------------------------------ issue 18: ds2net export

def test_export_onnx_and_pretrained(trained_run, tmp_path, capsys):
    "`ds2net export` writes what the library writes; the ONNX file predicts what the checkpoint predicts."
    from ds2net.export import load_onnx, model_from_pretrained
    from ds2net.inference import predict_probabilities
    run, _ = trained_run
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    model, cfg = model_from_checkpoint(run / 'best.pth')
    expected = predict_probabilities(model, [img], cfg)[0]
    onnx_path = tmp_path / 'model.onnx'
    assert main(['export', '--model', str(run / 'best.pth'), '--out', str(onnx_path)]) == 0
    assert capsys.readouterr().out == f'written to {onnx_path}\n'
    session = load_onnx(onnx_path)
    np.testing.assert_allclose(session.predict([img], temperature=1.0)[0], expected, atol=1e-4)
    t = cfg['temperature']  # fitted at the end of training: the export carries it, and its predict applies it by default
    assert session.metadata['temperature'] == t
    np.testing.assert_allclose(session.predict([img])[0], predict_probabilities(model, [img], cfg, temperature=t)[0], atol=1e-4)
    folder = tmp_path / 'pretrained'
    assert main(['export', '--model', str(run / 'best.pth'), '--format', 'pretrained', '--out', str(folder)]) == 0
    assert capsys.readouterr().out == f'written to {folder}\n'
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    again, cfg2 = model_from_pretrained(folder)
    np.testing.assert_allclose(predict_probabilities(again, [img], cfg2)[0], expected, atol=1e-5)


def test_export_refuses_existing_files_and_wrong_flags(trained_run, tmp_path, capsys):
    run, _ = trained_run
    onnx_path = tmp_path / 'model.onnx'; onnx_path.write_bytes(b'mine')
    cmd = ['export', '--model', str(run / 'best.pth'), '--out']
    assert main(cmd + [str(onnx_path)]) == 1
    assert capsys.readouterr().err == (f'ds2net export: error: --out {onnx_path} already exists: ds2net never replaces a file '
                                       'unless asked; pass --overwrite to replace it, or choose another --out\n')
    assert onnx_path.read_bytes() == b'mine'
    assert main(cmd + [str(tmp_path / 'p'), '--format', 'pretrained', '--side-outputs']) == 1
    assert capsys.readouterr().err == ("ds2net export: error: --side-outputs is for --format onnx: a pretrained folder holds "
                                       "the whole network\n")
    assert not (tmp_path / 'p').exists()
    assert main(cmd + [str(onnx_path), '--overwrite']) == 0 and onnx_path.read_bytes() != b'mine'
