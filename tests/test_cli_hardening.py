"""The command line as a skeptical user tries it (issue 10): nothing the user made is lost, bad flags are refused
before any work starts, defaults work from scratch, the log agrees with the checkpoint, and logs stay plain."""
import csv, hashlib, json, os, pathlib, shutil, signal, stat, subprocess, sys
import numpy as np
import pytest, torch
from pathlib import Path
from PIL import Image
from fastai.callback.core import Callback

import ds2net.learner
from ds2net.cli import main, build_parser
from ds2net.callbacks import (read_checkpoint, save_checkpoint, CheckpointCallback, CHECKPOINT_FORMAT, NonFiniteLossError,
                              model_from_checkpoint)
from ds2net.data import segmentation_dls
from ds2net.learner import train, ds2net_learner, FROM_SCRATCH_LR, FINE_TUNE_LR, TrainingInterrupted
from ds2net.model import DS2Net, TINY_ENCODER, WeightsError, SIDE_OUTPUT_NAMES

CLI = [sys.executable, '-c', 'import sys; from ds2net.cli import main; sys.exit(main())']
TINY = dict(encoder=TINY_ENCODER, size=64, bs=4, n_synthetic=16, device='cpu')


def _md5(p): return hashlib.md5(Path(p).read_bytes()).hexdigest()
def _tree(folder): return {str(p.relative_to(folder)): _md5(p) for p in sorted(Path(folder).rglob('*')) if p.is_file()}
def _strict_json(text): return json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} is not valid JSON'))
def _log_epochs(run): return [int(r[0]) for r in list(csv.reader(open(run / 'log.csv')))[1:]]


def _train_args(data, out, *extra):
    return ['train', '--data', str(data), '--encoder', TINY_ENCODER, '--size', '64', '--bs', '4', '--device', 'cpu',
            '--out', str(out), *extra]


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    "A synthetic data set in the images/masks layout, as a user's folder."
    out = tmp_path_factory.mktemp('data') / 'base'
    assert main(['synth', '--n', '16', '--size', '64', '--seed', '3', '--out', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def logged_run(base, tmp_path_factory):
    "`ds2net train ... > log.txt 2>&1` with no --lr, in a separate process whose output is a file."
    root = tmp_path_factory.mktemp('logged')
    out, log = root / 'RUN', root / 'log.txt'
    with open(log, 'w') as f:
        proc = subprocess.run(CLI + _train_args(base, out, '--epochs', '2'), stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    return out, text


# 1. predict never overwrites a file without --overwrite, and never writes into a data set's masks folder

def test_predict_refuses_dataset_masks_and_existing_files(logged_run, base, tmp_path, capsys):
    run, _ = logged_run
    masks_before = _tree(base / 'masks')
    for extra in ([], ['--overwrite']):
        assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(base / 'images'),
                     '--out', str(base / 'masks'), *extra]) == 1
        err = capsys.readouterr().err
        assert f"--out {base / 'masks'} is the masks folder of a data set" in err and 'not even with --overwrite' in err
    assert _tree(base / 'masks') == masks_before
    out = tmp_path / 'pred'; out.mkdir()
    mine = out / 'polyp_00003.png'; mine.write_bytes(b'my own file')
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(base / 'images'), '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert f'--out {out} already holds polyp_00003.png' in err and 'pass --overwrite to replace them' in err
    assert mine.read_bytes() == b'my own file' and list(out.iterdir()) == [mine]  # refused before writing anything
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(base / 'images'), '--out', str(out),
                 '--overwrite']) == 0
    assert '16 probability masks written' in capsys.readouterr().out
    assert mine.read_bytes() != b'my own file' and len(list(out.iterdir())) == 16


# 2. train refuses a folder that holds a run unless --resume or --overwrite

def test_train_refuses_a_finished_run_without_resume(logged_run, base, capsys):
    run, _ = logged_run
    before = _tree(run)
    assert main(_train_args(base, run, '--epochs', '1')) == 1
    err = capsys.readouterr().err
    assert f'--out {run} already holds best.pth, last.pth, log.csv, summary.json, weights.png' in err
    assert 'pass --resume to continue the run in it, --overwrite to replace its files' in err
    assert _tree(run) == before and _log_epochs(run) == [0, 1]


def test_overwrite_replaces_only_the_run_files_and_weights_give_the_paper_lr(logged_run, base, tmp_path):
    "--overwrite replaces the old run (and nothing else); with ImageNet-style encoder weights the default lr is 1e-4."
    import timm
    run = tmp_path / 'run'
    shutil.copytree(logged_run[0], run)
    (run / 'notes.txt').write_text('mine')
    weights = tmp_path / 'resnet10t.pth'
    torch.save(timm.create_model(TINY_ENCODER, pretrained=False).state_dict(), weights)
    assert main(_train_args(base, run, '--epochs', '1', '--overwrite', '--encoder-weights', str(weights))) == 0
    assert _log_epochs(run) == [0] and (run / 'notes.txt').read_text() == 'mine'
    summary = _strict_json((run / 'summary.json').read_text())
    assert summary['lr'] == FINE_TUNE_LR == 1e-4 and summary['lr_source'] == 'default with ImageNet weights'
    assert read_checkpoint(run / 'last.pth')['config']['lr'] == 1e-4


# 3. output names are unique, and the count is what was written

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


# 4. the log and the checkpoint agree after an interruption at any point of the end of an epoch

class SigtermAt(Callback):
    "Send this process SIGTERM at the end of one epoch, just before (offset -1) or just after (+1) the checkpoint."
    def __init__(self, epoch, offset): self.at, self.order = epoch, CheckpointCallback.order + offset
    def after_epoch(self):
        if self.epoch == self.at: os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize('offset,epochs_saved', [(-1, 1), (1, 2)])
def test_log_agrees_with_checkpoint_after_sigterm_at_epoch_end(tmp_path, offset, epochs_saved):
    out = tmp_path / 'run'
    with pytest.raises(TrainingInterrupted, match='continue with --resume'):
        train('synthetic:polyp', out, epochs=3, lr=1e-3, extra_cbs=[SigtermAt(1, offset)], **TINY)
    ckpt = read_checkpoint(out / 'last.pth')
    assert ckpt['epoch'] == epochs_saved and _log_epochs(out) == list(range(epochs_saved))
    (out / 'last.pth.tmp').write_bytes(b'left by a killed process')  # durability: a stale temp file goes at start
    train('synthetic:polyp', out, epochs=3, lr=1e-3, resume=True, **TINY)
    assert _log_epochs(out) == [0, 1, 2] and read_checkpoint(out / 'last.pth')['epoch'] == 3
    assert not (out / 'last.pth.tmp').exists()


def test_resume_cuts_a_log_that_ran_ahead(logged_run, base, tmp_path):
    "A process killed outright (no handler) between two writes: resume rewrites the log from last.pth."
    run = tmp_path / 'run'
    shutil.copytree(logged_run[0], run)
    with open(run / 'log.csv', 'a') as f: f.write('2,1.0,1.0,0.5,0.5,00:01\n')
    assert main(_train_args(base, run, '--epochs', '3', '--resume')) == 0
    assert _log_epochs(run) == [0, 1, 2]


# 5-8. bad flags and files are refused before anything is built, naming the flag; no empty folder stays

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
    monkeypatch.setattr(ds2net.learner, 'segmentation_dls', built)
    monkeypatch.setattr(ds2net.learner, 'DS2Net', built)


@pytest.mark.parametrize('flags,message', BAD_FLAGS, ids=[' '.join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_up_front(base, tmp_path, capsys, nothing_built, flags, message):
    out = tmp_path / 'new'
    assert main(_train_args(base, out, *flags)) == 1
    err = capsys.readouterr().err
    assert f'ds2net train: error: {message}' in err and 'Traceback' not in err
    assert not out.exists()


def test_bad_output_folders_are_refused_up_front(base, tmp_path, capsys, nothing_built, monkeypatch):
    afile = tmp_path / 'afile'; afile.write_text('mine')
    assert main(_train_args(base, afile)) == 1
    assert f'--out {afile} is a file, not a folder' in capsys.readouterr().err
    assert main(_train_args(base, afile / 'run')) == 1
    assert f'{afile} is a file, so no folder can be made inside it' in capsys.readouterr().err
    assert afile.read_text() == 'mine'
    # a folder that cannot be made (as root, permissions are not enforced: the refusal is simulated at mkdir)
    locked = tmp_path / 'locked' / 'run'
    real_mkdir = pathlib.Path.mkdir
    def mkdir(self, *a, **k):
        if self == locked: raise PermissionError(13, 'Permission denied', str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, 'mkdir', mkdir)
    assert main(_train_args(base, locked, '--epochs', '1')) == 1
    err = capsys.readouterr().err
    assert f'--out {locked}: could not create the folder (Permission denied)' in err and 'Traceback' not in err


def test_failed_run_leaves_no_empty_folder(tmp_path, capsys):
    broken = tmp_path / 'broken'; (broken / 'images').mkdir(parents=True); (broken / 'masks').mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(broken / 'images' / 'a.png')  # masks/ is empty
    out = tmp_path / 'runs' / 'new'
    assert main(_train_args(broken, out, '--epochs', '1')) == 1
    assert 'no masks found' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()  # every folder the run made is gone
    existing = tmp_path / 'mine'; existing.mkdir()
    assert main(_train_args(broken, existing, '--epochs', '1')) == 1
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
    summary = _strict_json((run / 'summary.json').read_text())
    log = list(csv.reader(open(run / 'log.csv')))
    dice_column = log[0].index('dice')
    assert summary['epochs'] == 2 and summary['best_dice'] == pytest.approx(max(float(r[dice_column]) for r in log[1:]), abs=1e-4)


# 6. the default learning rate suits a run from scratch

def test_default_lr_from_scratch(logged_run, tmp_path):
    run, text = logged_run
    assert build_parser().parse_args(['train', '--data', 'x', '--out', 'o']).lr is None
    help_text = build_parser()._subparsers._group_actions[0].choices['train'].format_help()
    assert '0.0001' in help_text and '0.003' in help_text and 'from scratch' in help_text
    summary = _strict_json((run / 'summary.json').read_text())
    assert summary['lr'] == FROM_SCRATCH_LR == 3e-3 and summary['lr_source'] == 'default from scratch'
    assert 'at lr 0.003 (default from scratch)' in text
    assert read_checkpoint(run / 'last.pth')['config']['lr'] == 3e-3
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=8, seed=0, device='cpu')
    assert ds2net_learner(dls, encoder=TINY_ENCODER).lr == 3e-3
    assert ds2net_learner(dls, encoder=TINY_ENCODER, lr=5e-4).lr == 5e-4


# 9. a non-finite loss says what happened and what is true of the run, without fastai's wrapper

class PoisonFirstBatch(Callback):
    order = -6
    def after_pred(self):
        if self.training and self.epoch == 0 and self.iter == 0: self.learn.pred = tuple(p * float('inf') for p in self.pred)


def test_nonfinite_loss_message_is_true_to_the_run(tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError) as info:
        train('synthetic:polyp', out, epochs=2, lr=1e-3, precision='fp32', extra_cbs=[PoisonFirstBatch()], **TINY)
    msg = str(info.value)
    assert msg.startswith('The loss became ') and 'at epoch 1 of 2, batch 1 of' in msg and 'Exception occured' not in msg
    assert 'the run is already in fp32' in msg.lower() and 'already clipped by value at ±0.5' in msg
    assert 'clip them' not in msg and '--precision fp32' not in msg
    assert not out.exists()  # failed before writing anything: no empty folder
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=8, seed=0, device='cpu')
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, clip_value=None, lr=1e-3, cbs=[PoisonFirstBatch()])
    with pytest.raises(NonFiniteLossError) as info: learn.fit(1)
    assert 'gradients are not clipped: clip them (`--clip 0.5`)' in str(info.value) and 'it was 0.001' in str(info.value)


# 10. a log file gets plain lines: a header, one row per epoch, the summary

def test_output_to_a_file_is_one_plain_line_per_epoch(logged_run):
    _, text = logged_run
    assert '\r' not in text and 'Warning' not in text and 'Epoch 1/2' not in text
    lines = text.splitlines()
    assert len(lines) == 4, text
    assert lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'dice', 'iou', 'time']
    assert [l.split()[0] for l in lines[1:3]] == ['0', '1'] and all(len(l.split()) == 6 for l in lines[1:3])
    assert lines[3].startswith('trained 2 epochs in ')


# 11. no FutureWarning about torch.jit.script, and only that warning is silenced

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


# 12. small things: messages, plural, and best.pth without the optimizer state

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


# Durability: temp file, fsync of the file and its folder, os.replace; a failed write leaves the old file

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
