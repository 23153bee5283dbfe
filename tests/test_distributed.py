"Distributed training through fastai's DistributedTrainer: two processes on the CPU (gloo), launched by torchrun."
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest, torch

WORKER = textwrap.dedent('''
    import os, sys, torch
    from fastai.callback.core import Callback
    from ds2net.train import train
    from ds2net.model import TINY_ENCODER
    out = sys.argv[1]
    class Keep(Callback):
        order = 1000  # after fastai's DistributedTrainer has unwrapped the model
        def after_fit(self):
            torch.save(dict(state={k: v.detach().clone() for k, v in self.learn.model.state_dict().items()},
                            values=[float(v) for v in self.learn.recorder.values[-1]],
                            n_valid_batches=len(self.learn.dls.valid)), f"{out}/rank{os.environ['RANK']}.pt")
    summary = train('synthetic:polyp', f'{out}/run', encoder=TINY_ENCODER, size=64, bs=4, epochs=1, lr=3e-3,
                    n_synthetic=29, valid_pct=0.3, device='cpu', precision='fp32', extra_cbs=[Keep()])
    print('RANK', os.environ['RANK'], 'SUMMARY', summary)
''')


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    (tmp / 'worker.py').write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(tmp / 'worker.py'), str(tmp)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r.stdout


def test_both_ranks_end_with_identical_weights(two_ranks):
    tmp, _ = two_ranks
    r0, r1 = (torch.load(tmp / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert r0['state'].keys() == r1['state'].keys()
    for k in r0['state']: assert torch.equal(r0['state'][k], r1['state'][k]), k
    assert r0['values'] == r1['values']  # the same metrics on both ranks (gathered), and the same losses logged


def test_rank0_alone_writes_the_run(two_ranks):
    tmp, stdout = two_ranks
    run = tmp / 'run'
    assert {p.name for p in run.iterdir()} >= {'best.pth', 'last.pth', 'log.csv', 'summary.json'}
    assert "'world_size': 2" in stdout and "'rank': 1" in stdout
    assert len((run / 'log.csv').read_text().splitlines()) == 2  # header and one epoch, written once


def test_distributed_dice_is_the_dice_of_the_whole_validation_set(two_ranks):
    from ds2net.data import segmentation_dls
    from ds2net.learner import ds2net_learner
    from ds2net.model import TINY_ENCODER
    tmp, _ = two_ranks
    r0 = torch.load(tmp / 'rank0.pt', weights_only=True)
    dls = segmentation_dls('synthetic:polyp', size=64, bs=4, n=29, valid_pct=0.3, seed=42, device='cpu')
    n_valid = len(dls.valid_ds)
    assert n_valid % 2 == 1  # an odd set: DistributedDL pads it with a repeat, which must not count
    learn = ds2net_learner(dls, encoder=TINY_ENCODER)
    learn.model.load_state_dict(r0['state'])
    valid_loss, dice, iou = learn.validate()
    names = ['train_loss', 'valid_loss', 'dice', 'iou', 'time']
    got = dict(zip(names[1:4], r0['values'][1:4]))
    assert got['dice'] == pytest.approx(dice, abs=1e-6) and got['iou'] == pytest.approx(iou, abs=1e-6)
