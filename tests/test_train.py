"""The training run: one configuration checked once, interruptions and the log, the non-finite stop's advice, bf16 on the
CPU, and a process left as it was found."""
import json, os, shutil, signal
import pytest, torch
from fastai.callback.core import Callback

from ds2net.errors import ParameterError
from ds2net.callbacks import NonFiniteLossError
from ds2net.checkpoint import CheckpointCallback, read_checkpoint
from ds2net.data import segmentation_dls
from ds2net.learner import ds2net_learner
from ds2net.model import TINY_ENCODER
from ds2net.train import RunConfig, TrainingInterrupted, default, train
from support import PoisonAt, log_epochs, md5, train_args

TINY = dict(encoder=TINY_ENCODER, size=64, bs=4, n_synthetic=16, device='cpu')


def test_bf16_reaches_the_dice_of_fp32_on_the_cpu(tmp_path):
    "The condition for bf16 being the CPU default: the same short run in bf16 ends within 0.01 validation Dice of fp32."
    from ds2net.train import train, default_precision
    dice = {}
    for precision in ('fp32', 'bf16'):
        s = train('synthetic:polyp', tmp_path / precision, encoder=TINY_ENCODER, size=64, bs=8, epochs=6, lr=3e-3,
                  n_synthetic=96, difficulty=0.2, device='cpu', precision=precision)
        assert s['precision'] == precision
        dice[precision] = s['best_dice']
    assert dice['fp32'] > 0.6, dice  # it learned something, so the comparison means something
    assert abs(dice['bf16'] - dice['fp32']) <= 0.01, dice
    assert default_precision('cpu') in ('bf16', 'fp32')  # bf16 where the CPU has native bf16 instructions


class SigtermAt(Callback):
    "Send this process SIGTERM at the end of one epoch, just before (offset -1) or just after (+1) the checkpoint."
    def __init__(self, epoch, offset): self.at, self.order = epoch, CheckpointCallback.order + offset
    def after_epoch(self):
        if self.epoch == self.at: os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize('offset,epochs_saved', [(-1, 1), (1, 2)])
def test_log_agrees_with_checkpoint_after_sigterm_at_epoch_end(tmp_path, offset, epochs_saved):
    out = tmp_path / 'run'
    with pytest.raises(TrainingInterrupted, match=r'continue with resume=True$'):
        train('synthetic:polyp', out, epochs=3, lr=1e-3, extra_cbs=[SigtermAt(1, offset)], **TINY)
    ckpt = read_checkpoint(out / 'last.pth')
    assert ckpt['epoch'] == epochs_saved and log_epochs(out) == list(range(epochs_saved))
    (out / 'last.pth.tmp').write_bytes(b'left by a killed process')  # durability: a stale temp file goes at start
    train('synthetic:polyp', out, epochs=3, lr=1e-3, resume=True, **TINY)
    assert log_epochs(out) == [0, 1, 2] and read_checkpoint(out / 'last.pth')['epoch'] == 3
    assert not (out / 'last.pth.tmp').exists()


def test_nonfinite_loss_message_is_true_to_the_run(tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError) as info:
        train('synthetic:polyp', out, epochs=2, lr=1e-3, precision='fp32', extra_cbs=[PoisonAt(0, 0, float('inf'))], **TINY)
    msg = str(info.value)
    assert msg.startswith('The loss became ') and 'at epoch 1 of 2, batch 1 of' in msg and 'Exception occured' not in msg
    assert 'the run is already in fp32' in msg.lower() and 'already clipped by value at ±0.5' in msg
    assert 'clip them' not in msg and "precision='fp32'" not in msg and '--precision fp32' not in msg
    assert not out.exists()  # failed before writing anything: no empty folder
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=8, seed=0, device='cpu')
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, clip_value=None, lr=1e-3, cbs=[PoisonAt(0, 0, float('inf'))])
    with pytest.raises(NonFiniteLossError) as info: learn.fit(1)
    # the library speaks Python (`clip_value=0.5`); the command line renders the same advice as `--clip 0.5` (test_cli)
    assert 'gradients are not clipped: clip them (`clip_value=0.5`)' in str(info.value) and 'it was 0.001' in str(info.value)
    assert '`lr`; it was 0.001' in str(info.value)


def test_one_run_configuration_checked_once_with_python_names():
    c = RunConfig('synthetic:polyp', 'runs/x', multiscale=[0.5, 1], weighting=[1, 1, 1, 1, 1, 1])
    assert (c.multiscale, c.weighting, c.to_dict()['multiscale'], c.to_dict()['out']) == ((0.5, 1), (1,) * 6, [0.5, 1], 'runs/x')
    assert default('size') == 352 and default('clip_value') == 0.5 and default('lr') is None
    for kwargs, param, message in [
            (dict(bs=0), 'bs', 'bs=0: the batch size must be a whole number of at least 1, e.g. 8'),
            (dict(lr=float('nan')), 'lr', 'lr=nan: the learning rate must be a positive number, e.g. 3e-3 (leave lr out for the default)'),
            (dict(clip_value=-1.0), 'clip_value', 'clip_value=-1.0: clip gradients at a positive value, e.g. 0.5 (clip_value=None turns clipping off)'),
            (dict(multiscale=(0, 1)), 'multiscale', 'multiscale=(0, 1): give positive scales, e.g. multiscale=(0.75, 1, 1.25)'),
            (dict(num_workers=-1), 'num_workers', 'num_workers=-1: the number of DataLoader worker processes must be 0 or more'),
            (dict(size=True), 'size', 'size=True: DS2Net needs images of at least 32×32 pixels')]:
        with pytest.raises(ParameterError) as e: RunConfig('synthetic:polyp', 'runs/x', **kwargs)
        assert e.value.param == param and str(e.value).startswith(message), str(e.value)
    with pytest.raises(TypeError): train('synthetic:polyp', 'runs/x', batch_size=4)  # no silent **kwargs: a typo is an error


def test_train_leaves_cudnn_flags_as_it_found_them(tmp_path):
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        train('synthetic:polyp', tmp_path / 'run', epochs=1, lr=1e-3, **TINY)
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        with pytest.raises(ParameterError): train('synthetic:polyp', tmp_path / 'run', epochs=1, **TINY)  # a refusal too
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    finally: torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    ckpt = read_checkpoint(tmp_path / 'run' / 'last.pth')
    run = ckpt['config']['run']  # the run's configuration, as it ran, travels in its checkpoints
    assert run['bs'] == 4 and run['lr'] == 1e-3 and run['data'] == 'synthetic:polyp' and run['precision'] in ('fp32', 'bf16')
    assert RunConfig(**run).size == 64


# ---------------------------------------------------------------- issue 16: what a run refuses, what it records, what it says

def test_encoders_of_one_input_size_and_huge_scales_are_refused_before_any_work(tmp_path, capsys):
    "Item 12: vit_tiny_patch16_224 at 64 px once failed in the first batch (AssertionError); --multiscale 1e9 overflowed."
    from ds2net.cli import main
    with pytest.raises(ParameterError) as e:
        train('synthetic:polyp', tmp_path / 'run', **{**TINY, 'encoder': 'vit_tiny_patch16_224'}, epochs=1)
    assert e.value.param == 'encoder' and str(e.value) == (
        "encoder='vit_tiny_patch16_224' takes images of 224×224 pixels only (timm marks it fixed_input_size), and this run "
        "gives it 64×64: choose an encoder that takes any size, e.g. pvt_v2_b2 (the paper's), convnext_tiny or resnet34 "
        "(resnet10t on a CPU)")
    with pytest.raises(ParameterError) as e:  # at its own size, but not at the scales of multi-scale training
        train('synthetic:polyp', tmp_path / 'run', **{**TINY, 'encoder': 'vit_tiny_patch16_224', 'size': 224},
              multiscale=(0.75, 1), epochs=1)
    assert "and this run gives it 160×160 (size=224 × a multiscale factor): choose an encoder" in str(e.value)
    assert not (tmp_path / 'run').exists()
    with pytest.raises(ParameterError) as e: RunConfig('synthetic:polyp', 'runs/x', multiscale=1e9)
    assert e.value.param == 'multiscale' and str(e.value) == (
        "multiscale=(1000000000.0,): a scale above 4 trains on images more than 4 times size=352 on a side; give scales "
        "above 0 and at most 4, e.g. multiscale=(0.75, 1, 1.25)")
    RunConfig('synthetic:polyp', 'runs/x', multiscale=(0.5, 4))  # the bound itself is fine
    assert main(train_args('synthetic:polyp', tmp_path / 'run', '--multiscale', '1e9')) == 1
    assert capsys.readouterr().err == ("ds2net train: error: --multiscale 1000000000.0: a scale above 4 trains on images "
                                       "more than 4 times --size 64 on a side; give scales above 0 and at most 4, e.g. "
                                       "--multiscale 0.75,1,1.25\n")
    assert main(train_args('synthetic:polyp', tmp_path / 'run', '--encoder', 'vit_tiny_patch16_224')) == 1
    assert capsys.readouterr().err.startswith("ds2net train: error: --encoder vit_tiny_patch16_224 takes images of 224×224 "
                                              "pixels only (timm marks it fixed_input_size), and this run gives it 64×64")
    assert not (tmp_path / 'run').exists()


def test_a_run_is_never_written_into_its_data_nor_around_it(tmp_path):
    "Item 6: `train --data D --out D/images --overwrite` once wrote the run into the images folder."
    from ds2net.data import write_synthetic
    data = write_synthetic('polyp', tmp_path / 'dsame', n=8, size=64)
    before = {p: md5(p) for p in sorted(data.rglob('*')) if p.is_file()}
    with pytest.raises(ParameterError) as e: train(str(data), data / 'images', overwrite=True, epochs=1, **TINY)
    assert e.value.param == 'out' and str(e.value) == (
        f"out={str(data / 'images')!r} is inside data={str(data)!r}, an input of this command: ds2net never writes into "
        "its inputs; choose another out")
    with pytest.raises(ParameterError) as e: train(str(data), tmp_path, overwrite=True, epochs=1, **TINY)
    assert str(e.value) == (f"out={str(tmp_path)!r} contains data={str(data)!r}, an input of this command: ds2net keeps "
                            "its outputs and inputs apart; choose another out")
    with pytest.raises(ParameterError) as e: train(str(data), data, resume=True, epochs=1, **TINY)
    assert str(e.value) == (f"out={str(data)!r} is data={str(data)!r} itself, an input of this command: ds2net never "
                            "writes over its inputs; choose another out")
    assert {p: md5(p) for p in sorted(data.rglob('*')) if p.is_file()} == before


@pytest.fixture(scope='module')
def one_epoch(tmp_path_factory):
    "A run of one epoch on 16 synthetic images, to copy and resume."
    out = tmp_path_factory.mktemp('one') / 'run'
    train('synthetic:polyp', out, epochs=1, lr=1e-3, **TINY)
    return out


def test_resume_refuses_other_data_or_settings_and_says_which(one_epoch, tmp_path):
    "Item 4: a resume on other data, another seed, split, size or weighting was accepted (and leaked the split)."
    run = shutil.copytree(one_epoch, tmp_path / 'run')
    recorded = read_checkpoint(run / 'last.pth')['config']['trained_on']
    assert recorded == dict(data='synthetic:polyp', seed=42, valid_pct=0.2, size=64, weighting='uncertainty', n_synthetic=16,
                            difficulty=0.5)
    assert read_checkpoint(run / 'best.pth')['config']['trained_on'] == recorded
    files = {p.name: md5(p) for p in run.iterdir()}
    last = run / 'last.pth'
    with pytest.raises(ParameterError) as e: train('synthetic:polyp', run, resume=True, epochs=2, seed=1, valid_pct=0.3, **TINY)
    assert e.value.param == 'resume' and str(e.value) == (
        f"resume=True: {last} was trained on other data or settings than this run asks for (seed was 42, now 1; valid_pct "
        "was 0.2, now 0.3). A resumed run goes on with the data, split and loss it started with: resume with seed=42 "
        "valid_pct=0.2, or train a new run in another out")
    with pytest.raises(ParameterError) as e:
        train('synthetic:ultrasound', run, resume=True, epochs=2, weighting='equal', **{**TINY, 'size': 96})
    assert str(e.value) == (
        f"resume=True: {last} was trained on other data or settings than this run asks for (data was 'synthetic:polyp', "
        "now 'synthetic:ultrasound'; size was 64, now 96; weighting was 'uncertainty', now 'equal'). A resumed run goes on "
        "with the data, split and loss it started with: resume with data='synthetic:polyp' size=64 weighting='uncertainty', "
        "or train a new run in another out")
    assert {p.name: md5(p) for p in run.iterdir()} == files  # refused before anything was written
    from ds2net.cli import main  # the command line names its flags
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(train_args('synthetic:polyp', run, '--resume', '--epochs', '2', '--seed', '1', '--n-synthetic', '16')) == 1
    assert err.getvalue() == (
        f"ds2net train: error: --resume: {last} was trained on other data or settings than this run asks for (--seed was "
        "42, now 1). A resumed run goes on with the data, split and loss it started with: resume with --seed 42, or train "
        "a new run in another --out\n")


def test_resume_of_a_checkpoint_without_the_record_still_works(one_epoch, tmp_path):
    "Item 4: a last.pth written before the record existed resumes as before, without a word about it."
    import warnings
    run = shutil.copytree(one_epoch, tmp_path / 'run')
    old = torch.load(run / 'last.pth', weights_only=True)
    del old['config']['trained_on']
    torch.save(old, run / 'last.pth')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning either
        warnings.filterwarnings('ignore', category=FutureWarning)  # torch.jit.script's, while fastai loads
        summary = train('synthetic:polyp', run, resume=True, epochs=2, **TINY)
    assert summary['start_epoch'] == 1 and read_checkpoint(run / 'last.pth')['config']['trained_on']['seed'] == 42


def test_resume_after_best_pth_was_removed_says_so_and_reports_what_is_there(one_epoch, tmp_path, capsys):
    "Item 10: after `rm best.pth`, a resume reported 'best validation Dice 0.1789' with no best.pth there."
    from ds2net.cli import main
    run = shutil.copytree(one_epoch, tmp_path / 'run')
    was = read_checkpoint(run / 'last.pth')['best']
    (run / 'best.pth').unlink()
    with pytest.warns(UserWarning) as record:
        assert main(train_args('synthetic:polyp', run, '--resume', '--epochs', '2', '--n-synthetic', '16')) == 0
    said = [str(w.message) for w in record if 'best.pth' in str(w.message)]
    assert said == [f"{run / 'best.pth'} is missing: the best epoch before this resume (validation dice {was:.4f}) is gone, "
                    "so best.pth will hold the best epoch from epoch 2 on"]
    best = read_checkpoint(run / 'best.pth')  # written again, from the epochs of this resume
    assert best['epoch'] == 2
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['best_dice'] == best['best']
    assert capsys.readouterr().out.strip().endswith(f"best validation Dice {best['best']:.4f}; checkpoints in {run}")
