"""Does adaptive supervision help? The ablation behind `03_adaptive_supervision.ipynb`.

Trains DS2Net and a fastai `DynamicUnet` with side heads over the same `resnet10t` encoder, under each deep-supervision
weighting (`uncertainty`, `equal`, `exp`, `nnunet`), with the same seeds for every weighting (a seed fixes the images,
the split and the initial weights, so runs of one seed differ only in their weighting). Each network has its own
regime, chosen so that its held-out Dice has stopped rising by the last epoch: DS2Net 96 images of 64x64 for 20 epochs,
the DynamicUnet (five times as many parameters) 64 images of 32x32 for 12 epochs. It writes, into `--out` (default:
next to this file),

- `ablation_results.csv`: one row per run (network, weighting, seed, image size, number of images, epochs, validation
  and held-out Dice of the last epoch, the range of the held-out Dice over the last five epochs, seconds of training),
- `ablation_weights.csv`: per run and epoch, the validation and held-out Dice and the mean weight of each side output.

Both files are rewritten after every run, and runs already in `ablation_results.csv` are skipped, so the sweep can be
stopped and started again (`--minutes 9` stops starting new runs after nine minutes).

Run from the repository root: `.venv/bin/python nbs/tutorials/ablation.py` (about an hour on 2 CPU cores; on shared
cores, two processes side by side are faster: `OMP_NUM_THREADS=1 ... --networks DS2Net --threads 1 --out A` and the
same with `--networks DynamicUnet --out B`, then concatenate the CSVs);
`--seeds 0 --networks DS2Net --weightings equal --epochs 2 --out /tmp/x` for a quick look;
`--weightings nnunet` adds nnU-Net's weights to the same files.
"""
import argparse, time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fastai.vision.core import imagenet_stats
from fastai.vision.models.unet import DynamicUnet

from ds2net.data import segmentation_dls, make_synthetic
from ds2net.evaluate import SYNTHETIC_TEST_SEED
from ds2net.inference import prepare_images
from ds2net.learner import ds2net_learner
from ds2net.scores import per_image_scores
from ds2net.side_heads import attach_side_heads
from ds2net.train import set_precision
from ds2net.model import DS2Net, TINY_ENCODER, fuse_side_outputs

HERE = Path(__file__).parent
WEIGHTINGS = ('uncertainty', 'equal', 'exp', 'nnunet')
NETWORKS = ('DS2Net', 'DynamicUnet')
RESULTS, CURVES = 'ablation_results.csv', 'ablation_weights.csv'
KEY = ['network', 'weighting', 'seed']


def build_network(name:str, size:int)->nn.Module:
    "DS2Net over the tiny encoder, or a fastai DynamicUnet over the same encoder's body with a side head on each UnetBlock."
    if name == 'DS2Net': return DS2Net(TINY_ENCODER)
    body = nn.Sequential(*list(timm.create_model(TINY_ENCODER, pretrained=False).children())[:-2])
    return attach_side_heads(DynamicUnet(body, n_out=1, img_size=(size, size)), sample_size=(size, size))


@torch.no_grad()
def held_out_dice(model:nn.Module, size:int, images, masks, bs:int=25)->float:
    "Mean per-image Dice at probability 0.5 of the fused prediction (the sum of all outputs' logits) on held-out images."
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(images), bs):
        x = prepare_images(list(images[i:i + bs]), size, *imagenet_stats)
        scores.append(per_image_scores(fuse_side_outputs(model(x)), torch.as_tensor(masks[i:i + bs]))[0])
    model.train(was_training)
    return float(torch.cat(scores).mean())


class HeldOutDice(Callback):
    "After every epoch, the held-out Dice of the model (kept in `values`)."
    order = 70  # after the recorder has logged the epoch
    def __init__(self, size, images, masks, verbose=False):
        self.size, self.images, self.masks, self.verbose, self.values = size, images, masks, verbose, []
    def after_epoch(self):
        self.values.append(held_out_dice(self.learn.model, self.size, self.images, self.masks))
        if self.verbose: print(f'  epoch {len(self.values)}: held-out Dice {self.values[-1]:.3f}', flush=True)


def per_network(values:list, network:str):
    "The value of a two-valued option (DS2Net, DynamicUnet) for `network`; a single value serves both."
    return values[NETWORKS.index(network)] if len(values) > 1 else values[0]


def run(network:str, weighting:str, seed:int, args, test)->tuple:
    "Train one network with one weighting from one seed; returns its row of results and its rows per epoch."
    size, n = per_network(args.size, network), per_network(args.n, network)
    set_seed(seed, reproducible=True)
    dls = segmentation_dls('synthetic:polyp', size=size, bs=args.bs, n=n, seed=seed, difficulty=args.difficulty,
                           device='cpu')
    tracker = HeldOutDice(size, *test[size], verbose=args.verbose)
    learn = ds2net_learner(dls, model=build_network(network, size), weighting=weighting, lr=args.lr, cbs=[tracker])
    set_precision(learn, args.precision)
    t0 = time.time()
    epochs = per_network(args.epochs, network)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, args.lr)
    seconds = time.time() - t0
    dice_col = learn.recorder.metric_names.index('dice') - 1  # values have no 'epoch' column
    valid = [float(v[dice_col]) for v in learn.recorder.values]
    last5 = tracker.values[-5:]
    row = dict(network=network, weighting=weighting, seed=seed, size=size, n=n, epochs=epochs, valid_dice=valid[-1],
               test_dice=tracker.values[-1], test_dice_range_last5=max(last5) - min(last5), seconds=round(seconds, 1))
    per_epoch = [dict(network=network, weighting=weighting, seed=seed, epoch=e + 1, valid_dice=valid[e], test_dice=tracker.values[e],
                      **{f'w{i + 1}': float(w) for i, w in enumerate(ws)})
                 for e, ws in enumerate(learn.deep_supervision.epoch_weights)]
    return row, per_epoch


def read(out:Path, name:str)->pd.DataFrame:
    path = out/name
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def write(df:pd.DataFrame, out:Path, name:str):
    "Write a CSV atomically (a temporary file, then a rename), so an interrupted sweep never leaves half a file."
    tmp = out/f'.{name}.tmp'
    df.to_csv(tmp, index=False)
    tmp.replace(out/name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    p.add_argument('--networks', nargs='+', default=list(NETWORKS), choices=NETWORKS)
    p.add_argument('--weightings', nargs='+', default=['uncertainty', 'equal', 'exp'], choices=WEIGHTINGS)
    p.add_argument('--size', type=int, nargs='+', default=[64, 32], metavar='PIXELS',
                   help='image side for DS2Net and for the DynamicUnet (one value: both)')
    p.add_argument('--n', type=int, nargs='+', default=[96, 64], metavar='N',
                   help='synthetic images per run (80%% train, 20%% validation), for DS2Net and for the DynamicUnet')
    p.add_argument('--epochs', type=int, nargs='+', default=[20, 12], metavar='EPOCHS',
                   help='epochs of fit_one_cycle for DS2Net and for the DynamicUnet (each until its held-out Dice is flat)')
    p.add_argument('--bs', type=int, default=8)
    p.add_argument('--difficulty', type=float, default=0.5)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                   help='fp32, or bf16 autocast (the loss in fp32): on a CPU without bf16 instructions bf16 is many times slower')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (1 per process when the cores are shared)')
    p.add_argument('--n-test', type=int, default=60, help='held-out images (seed SYNTHETIC_TEST_SEED)')
    p.add_argument('--minutes', type=float, default=None, help='start no new run after this many minutes')
    p.add_argument('--out', default=str(HERE))
    p.add_argument('--verbose', action='store_true', help="print each epoch's held-out Dice")
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    test = {size: make_synthetic('polyp', args.n_test, size=size, seed=SYNTHETIC_TEST_SEED, difficulty=args.difficulty)
            for size in set(args.size)}
    results, curves = read(out, RESULTS), read(out, CURVES)
    done = set(map(tuple, results[KEY].values.tolist())) if len(results) else set()
    if len(curves):  # epochs of a run that was stopped before its result was written are dropped (it runs again)
        curves = curves[[k in done for k in map(tuple, curves[KEY].values.tolist())]]
    start = time.time()
    for seed in args.seeds:
        for network in args.networks:
            for weighting in args.weightings:
                if (network, weighting, seed) in done: continue
                if args.minutes is not None and time.time() - start > 60 * args.minutes:
                    print(f'stopped after {args.minutes:g} minutes; run again to continue'); return
                row, epochs = run(network, weighting, seed, args, test)
                results = pd.concat([results, pd.DataFrame([row])], ignore_index=True)
                curves = pd.concat([curves, pd.DataFrame(epochs)], ignore_index=True)
                write(curves, out, CURVES); write(results, out, RESULTS)  # the results last: a run counts once both are there
                print(row, flush=True)
    print(f"all runs done: {out/RESULTS}, {out/CURVES}")


if __name__ == '__main__': main()
