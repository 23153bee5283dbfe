"Distributed training through fastai's DistributedTrainer: two processes on the CPU (gloo), launched by torchrun."
import json, os, subprocess, sys, textwrap
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


# ---------------------------------------------------------------- issue 16, item 1: launches that go wrong, and torchrun's exit

def train_cli(out, *extra):
    return ['train', '--data', 'synthetic:polyp', '--encoder', 'resnet10t', '--size', '64', '--bs', '4', '--device', 'cpu',
            '--n-synthetic', '32', '--out', str(out), *extra]


def clean_env(monkeypatch, **env):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'DS2NET_DIST_TIMEOUT'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items(): monkeypatch.setenv(name, value)


ONE_OR_MANY = ("To train in one process, unset {names} (`env -u {first} ds2net train ...`); to train in several, start "
               "them with torchrun (`torchrun --nproc_per_node 2 $(which ds2net) train ...`), which sets RANK, WORLD_SIZE, "
               "MASTER_ADDR and MASTER_PORT for each.")


def test_a_stray_rank_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    "`env RANK=1 ds2net train ...` once trained a whole run as a process that writes nothing, then raised KeyError."
    from ds2net.cli import main
    clean_env(monkeypatch, RANK='1')
    assert main(train_cli(tmp_path / 'x', '--epochs', '1')) == 1
    assert capsys.readouterr().err == (
        "ds2net train: error: RANK=1 is set in the environment but WORLD_SIZE is not, so this process cannot tell whether "
        "it is alone or one of a distributed run (as any process but 0 it would train and write nothing). "
        + ONE_OR_MANY.format(names='RANK', first='RANK') + '\n')
    assert not (tmp_path / 'x').exists()
    clean_env(monkeypatch, RANK='0', WORLD_SIZE='2')  # a launcher's environment half set: no address to meet at
    assert main(train_cli(tmp_path / 'x', '--epochs', '1')) == 1
    assert capsys.readouterr().err == (
        "ds2net train: error: RANK=0 and WORLD_SIZE=2 are set in the environment but MASTER_ADDR and MASTER_PORT are not: "
        "the processes of a distributed run meet at MASTER_ADDR:MASTER_PORT. "
        + ONE_OR_MANY.format(names='RANK and WORLD_SIZE', first='RANK') + '\n')
    clean_env(monkeypatch, RANK='2', WORLD_SIZE='2')
    assert main(train_cli(tmp_path / 'x', '--epochs', '1')) == 1
    assert capsys.readouterr().err == (
        "ds2net train: error: RANK=2 is set in the environment, and WORLD_SIZE=2 has processes 0 to 1 only. "
        + ONE_OR_MANY.format(names='RANK and WORLD_SIZE', first='RANK') + '\n')
    assert not (tmp_path / 'x').exists()


def test_a_process_alone_says_it_waits_for_its_peers_then_gives_up(tmp_path, monkeypatch, capsys):
    "`RANK=0 WORLD_SIZE=2 ds2net train ...` in one process once waited forever in silence."
    import socket
    from ds2net.cli import main
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    clean_env(monkeypatch, RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), DS2NET_DIST_TIMEOUT='4')
    assert main(train_cli(tmp_path / 'x', '--epochs', '1')) == 1
    err = capsys.readouterr().err
    waiting = (f"ds2net: process 0 of 2 is waiting for its peers at 127.0.0.1:{port} (up to 4 s; the environment variable "
               "DS2NET_DIST_TIMEOUT sets how long)\n")
    assert err == waiting + (
        f"ds2net train: error: Process 0 of a distributed run of WORLD_SIZE=2 waited 4 s for the others at 127.0.0.1:{port} "
        "and not all of them came. Start every process with torchrun (`torchrun --nproc_per_node 2 $(which ds2net) train "
        "...`), or unset RANK and WORLD_SIZE to train in one process; the environment variable DS2NET_DIST_TIMEOUT sets "
        "how long to wait.\n")
    assert not (tmp_path / 'x').exists() and not torch.distributed.is_initialized()
    clean_env(monkeypatch, DS2NET_DIST_TIMEOUT='soon')
    assert main(train_cli(tmp_path / 'x', '--epochs', '1')) == 1
    assert capsys.readouterr().err == ("ds2net train: error: DS2NET_DIST_TIMEOUT='soon': give the seconds a process waits "
                                       "for the others of a distributed run to join, a positive number (default 120)\n")


def test_torchrun_of_the_command_line_exits_0_and_rank_0_alone_reports(tmp_path):
    "`torchrun --nproc_per_node 2 ds2net train ... --epochs 2`: rank 1 once raised KeyError 'best_dice' and torchrun exited 1."
    ds2net = Path(sys.executable).parent / 'ds2net'
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(ds2net),
                        *train_cli(tmp_path / 'X', '--epochs', '2')], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reports = [line for line in r.stdout.splitlines() if line.startswith('trained ')]
    assert len(reports) == 1 and reports[0].startswith('trained 2 epochs in ') and f'checkpoints in {tmp_path / "X"}' in reports[0]
    assert 'Traceback' not in r.stderr and 'KeyError' not in r.stderr
    summary = json.loads((tmp_path / 'X' / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['epochs'] == 2 and summary['best_dice'] is not None
    assert len((tmp_path / 'X' / 'log.csv').read_text().splitlines()) == 3  # header and two epochs, written once
