"""Time ds2net.metrics on 100 predictions of 352x352 (the issue asks for <= 20 s on 2 cores).

    .venv/bin/python tests/bench_metrics.py

Not collected by pytest (only test_*.py are). Times two paths: arrays in memory (`evaluate_set`), and PNG folders
(`evaluate_folders`: reading, resizing to the masks' size, evaluating), with masks at 352x352 and at a larger size.
"""
import os, sys, tempfile, time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's ds2net, installed or not
from ds2net.metrics import evaluate_set
from ds2net.evaluate import evaluate_folders


def cases(n=100, size=352, seed=0):
    "Elliptic lesions of random place and size, and blurred, shifted, noisy probability maps that find them."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    preds, gts = [], []
    for _ in range(n):
        cy, cx = rng.integers(90, size - 90, 2); ry, rx = rng.integers(20, 85, 2); dy, dx = rng.integers(-10, 11, 2)
        gts.append(((yy - cy) / ry)**2 + ((xx - cx) / rx)**2 < 1)
        d = np.sqrt(((yy - cy - dy) / ry)**2 + ((xx - cx - dx) / rx)**2) - 1
        preds.append(np.clip(1 / (1 + np.exp(d * 12)) + rng.normal(0, 0.02, (size, size)), 0, 1))
    return preds, gts


def timed(f, *args, **kw):
    t0 = time.perf_counter(); out = f(*args, **kw)
    return time.perf_counter() - t0, out


if __name__ == '__main__':
    preds, gts = cases()
    print(f"cpus available: {len(os.sched_getaffinity(0))}")
    t, res = timed(evaluate_set, preds, gts)
    print(f"evaluate_set, {res['n']} pairs of 352x352 float64 arrays: {t:.2f} s ({1000 * t / res['n']:.1f} ms/pair)")
    with tempfile.TemporaryDirectory() as d:
        for gt_size in (352, 576):
            pdir, gdir = Path(d) / f'pred{gt_size}', Path(d) / f'gt{gt_size}'
            pdir.mkdir(); gdir.mkdir()
            for i, (p, g) in enumerate(zip(preds, gts)):
                Image.fromarray(np.round(p * 255).astype(np.uint8)).save(pdir / f'{i:03d}.png')
                m = Image.fromarray(g.astype(np.uint8) * 255)
                if gt_size != 352: m = m.resize((gt_size, gt_size), Image.NEAREST)
                m.save(gdir / f'{i:03d}.png')
            t, res = timed(evaluate_folders, pdir, gdir)
            print(f"evaluate_folders, {res['n']} PNG predictions of 352x352, masks {gt_size}x{gt_size}: {t:.2f} s")
    print(" ".join(f"{k}={v:.3f}" for k, v in res.items() if k != 'n'))
