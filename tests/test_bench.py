"`ds2net bench`: a tiny run through the command line writes a JSON with every figure; no timing is asserted."
import json, math

import torch

from ds2net.bench import authors_structure_loss, authors_uncertainty_weights
from ds2net.cli import main
from ds2net.losses import DeepSupervisionLoss
from ds2net.model import TINY_ENCODER


def test_authors_loss_equals_the_library_loss():
    torch.manual_seed(0)
    outs = [torch.randn(2, 1, 64, 64) for _ in range(6)]
    y = (torch.rand(2, 1, 64, 64) > 0.5).float()
    w = authors_uncertainty_weights(outs)
    assert abs(w.max() - 1) < 1e-12 and (w >= math.exp(-1) - 1e-9).all()
    ref = sum(float(wi) * authors_structure_loss(p, y) for wi, p in zip(w, outs))
    assert torch.allclose(ref, DeepSupervisionLoss()(outs, y), atol=1e-4)


def test_bench_tiny_run_writes_sane_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert main(['bench', '--device', 'cpu', '--encoder', TINY_ENCODER, '--size', '64', '--bs', '2', '--steps', '3',
                 '--warmup', '1', '--workers', '0', '--json', str(out)]) == 0
    assert 'train_speedup' in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res['config']['encoder'] == TINY_ENCODER and res['config']['size'] == 64
    assert res['config']['device'] == 'cpu' and res['config']['precision'] in ('fp32', 'bf16')
    for side in ('library', 'authors'):
        r = res[side]
        assert r['n_steps'] == 3
        assert 0 < r['step_s_min'] <= r['step_s'] <= r['step_s_max']
        assert math.isclose(r['images_per_s'], 2 / r['step_s'])
        assert r['infer_images_per_s'] > 0 and math.isclose(r['infer_images_per_s'], 2 / r['infer_s'])
        assert r['peak_mem_mb'] >= 0
    assert res['authors']['precision'] == 'fp32' and res['library']['precision'] == res['config']['precision']
    assert math.isclose(res['train_speedup'], res['authors']['step_s'] / res['library']['step_s'])
    assert math.isclose(res['train_speedup_best'], res['authors']['step_s_min'] / res['library']['step_s_min'])
    assert math.isclose(res['infer_speedup'], res['library']['infer_images_per_s'] / res['authors']['infer_images_per_s'])
    assert 0 <= res['library']['valid_dice'] <= 1
    assert res['dataloader']['workers_0_images_per_s'] > 0


def test_bench_refuses_fp16_on_the_cpu(capsys):
    assert main(['bench', '--device', 'cpu', '--encoder', TINY_ENCODER, '--precision', 'fp16']) == 1
    assert 'fp16 needs a CUDA GPU' in capsys.readouterr().err
