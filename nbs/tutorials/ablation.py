"""The adaptive-supervision ablation in small, for `03_adaptive_supervision.ipynb`.

Trains DS2Net and a fastai `DynamicUnet` with side heads under four deep-supervision weightings
(`uncertainty`, `equal`, `exp`, `nnunet`), several seeds each, on hard synthetic colonoscopy images, and writes

- `ablation_results.csv`: one row per run (network, weighting, seed, validation Dice, held-out Dice, seconds),
- `ablation_weights.csv`: the mean weight of each side output per epoch of every run.

Run from the repository root: `.venv/bin/python nbs/tutorials/ablation.py` (tens of minutes on 2 CPU cores);
`--seeds 0 --epochs 2` for a quick look.
"""
import argparse, time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.vision.models.unet import DynamicUnet

from ds2net.data import segmentation_dls, make_synthetic
from ds2net.learner import ds2net_learner, attach_side_heads, predict_probabilities, data_config
from ds2net.metrics import SYNTHETIC_TEST_SEED
from ds2net.model import DS2Net, TINY_ENCODER

HERE = Path(__file__).parent
WEIGHTINGS = ('uncertainty', 'equal', 'exp', 'nnunet')
NETWORKS = ('DS2Net', 'DynamicUnet')


def build_network(name:str, size:int)->nn.Module:
    "DS2Net over the tiny encoder, or a fastai DynamicUnet over the same encoder's body with side heads on its UnetBlocks."
    if name == 'DS2Net': return DS2Net(TINY_ENCODER)
    body = nn.Sequential(*list(timm.create_model(TINY_ENCODER, pretrained=False).children())[:-2])
    return attach_side_heads(DynamicUnet(body, n_out=1, img_size=(size, size)), sample_size=(size, size))


def held_out_dice(model:nn.Module, config:dict, images, masks)->float:
    "Mean per-image Dice at probability 0.5 on held-out images (1 where both prediction and mask are empty)."
    probs = predict_probabilities(model, list(images), config, bs=16)
    scores = []
    for p, m in zip(probs, masks):
        pred, gt = p > 0.5, m > 0
        total = pred.sum() + gt.sum()
        scores.append(1.0 if total == 0 else 2 * (pred & gt).sum() / total)
    return float(np.mean(scores))


def run(network:str, weighting:str, seed:int, size:int, n:int, epochs:int, difficulty:float, lr:float, test, device='cpu'):
    set_seed(seed, reproducible=True)
    dls = segmentation_dls('synthetic:polyp', size=size, bs=8, n=n, seed=seed, difficulty=difficulty, device=device)
    learn = ds2net_learner(dls, model=build_network(network, size), weighting=weighting, lr=lr)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    seconds = time.time() - t0
    valid_dice = float(learn.recorder.values[-1][learn.recorder.metric_names.index('dice') - 1])
    test_dice = held_out_dice(learn.model, data_config(dls), *test)
    weights = learn.deep_supervision.epoch_weights
    return dict(network=network, weighting=weighting, seed=seed, valid_dice=valid_dice, test_dice=test_dice,
                seconds=round(seconds, 1)), weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--n', type=int, default=120, help='synthetic images per run (80% train, 20% validation)')
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--difficulty', type=float, default=0.8)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--out', default=str(HERE))
    args = p.parse_args(argv)
    images, masks = make_synthetic('polyp', 100, size=args.size, seed=SYNTHETIC_TEST_SEED, difficulty=args.difficulty)
    rows, weight_rows = [], []
    for seed in args.seeds:
        for network in NETWORKS:
            for weighting in WEIGHTINGS:
                row, weights = run(network, weighting, seed, args.size, args.n, args.epochs, args.difficulty, args.lr,
                                   (images, masks), args.device)
                rows.append(row)
                for epoch, w in enumerate(weights):
                    weight_rows.append(dict(network=network, weighting=weighting, seed=seed, epoch=epoch + 1,
                                            **{f'w{i + 1}': float(v) for i, v in enumerate(w)}))
                print(row, flush=True)
                write(rows, weight_rows, Path(args.out))  # after every run, so an interrupted sweep keeps what it did
    print(f"wrote {Path(args.out)/'ablation_results.csv'} and {Path(args.out)/'ablation_weights.csv'}")


def write(rows, weight_rows, out:Path):
    "Write both CSVs atomically (a temporary file, then a rename)."
    for name, data in (('ablation_results.csv', rows), ('ablation_weights.csv', weight_rows)):
        tmp = out/f'.{name}.tmp'
        pd.DataFrame(data).to_csv(tmp, index=False)
        tmp.replace(out/name)


if __name__ == '__main__': main()
