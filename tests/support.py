"""Helpers that several test files use (fixtures are in conftest.py): small masks and files, a tiny learner, a callback that
poisons one batch, the command line in a subprocess, and ways to compare folders and logs."""
import csv, hashlib, json, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from fastai.callback.core import Callback
from fastai.torch_core import set_seed

from ds2net.model import TINY_ENCODER

EASY = dict(encoder=TINY_ENCODER, size=64, bs=8, lr=3e-3, n_synthetic=96, difficulty=0.2, device='cpu', precision='fp32')
CLI = [sys.executable, '-c', 'import sys; from ds2net.cli import main; sys.exit(main())']  # `ds2net` of this environment


def blob(shape, center, radius):
    "A disc of `radius` at `center` in a boolean (H, W) mask."
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - center[0])**2 + (xx - center[1])**2 < radius**2


def write_png(path, a): Image.fromarray(a).save(path)


def md5(p): return hashlib.md5(Path(p).read_bytes()).hexdigest()
def tree(folder): return {str(p.relative_to(folder)): md5(p) for p in sorted(Path(folder).rglob('*')) if p.is_file()}
def strict_json(text): return json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} is not valid JSON'))
def log_epochs(run): return [int(r[0]) for r in list(csv.reader(open(Path(run) / 'log.csv')))[1:]]


def train_args(data, out, *extra):
    "`ds2net train` on the tiny encoder at 64×64 on the CPU."
    return ['train', '--data', str(data), '--encoder', TINY_ENCODER, '--size', '64', '--bs', '4', '--device', 'cpu',
            '--out', str(out), *extra]


def tiny_learner(dls, **kwargs):
    "A seeded `ds2net_learner` on the tiny encoder at lr 1e-3."
    from ds2net.learner import ds2net_learner
    set_seed(0, reproducible=True)
    return ds2net_learner(dls, encoder=TINY_ENCODER, lr=1e-3, **kwargs)


class PoisonAt(Callback):
    "Make the predictions NaN (or `value`) at one training batch, after copying every parameter as it is before that batch."
    order = -6
    def __init__(self, epoch, batch, value=float('nan')): self.at, self.value, self.before = (epoch, batch), value, None
    def before_batch(self):
        if self.training and (self.epoch, self.iter) == self.at:
            self.before = {n: p.detach().clone() for n, p in self.learn.model.named_parameters()}
    def after_pred(self):
        if self.training and (self.epoch, self.iter) == self.at: self.learn.pred = tuple(p * self.value for p in self.pred)
