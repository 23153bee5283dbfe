"""The training run: one configuration checked once, interruptions and the log, the non-finite stop's advice, bf16 on the
CPU, and a process left as it was found."""
import os, signal
import pytest, torch
from fastai.callback.core import Callback

from ds2net.errors import ParameterError
from ds2net.callbacks import NonFiniteLossError
from ds2net.checkpoint import CheckpointCallback, read_checkpoint
from ds2net.data import segmentation_dls
from ds2net.learner import ds2net_learner
from ds2net.model import TINY_ENCODER
from ds2net.train import RunConfig, TrainingInterrupted, default, train
from support import PoisonAt, log_epochs

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
