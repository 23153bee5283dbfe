"`ds2net bench`: a tiny run through the command line writes a JSON with every figure; no timing is asserted."
import json, math

import pytest
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
    printed = capsys.readouterr().out
    assert 'train_speedup' in printed and '; inference images/s on the CPU: PyTorch fp32 ' in printed
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
    backends = res['inference_backends']  # issue 18: the three inference backends side by side, in the same run
    rows = backends['images_per_s']
    assert list(rows) == ['PyTorch fp32', 'PyTorch bf16 autocast', 'onnxruntime fp32'] and backends['onnx_mb'] > 0
    for name, row in rows.items():
        assert row['images_per_s'] > 0 and math.isclose(row['vs_fp32'], row['images_per_s'] / rows['PyTorch fp32']['images_per_s'])
    assert rows['PyTorch fp32']['max_abs_diff_vs_fp32'] == 0 and rows['onnxruntime fp32']['max_abs_diff_vs_fp32'] < 1e-4
    assert 0 < rows['PyTorch bf16 autocast']['max_abs_diff_vs_fp32'] < 0.1  # bf16 keeps 8 bits of mantissa


def test_bench_refuses_fp16_on_the_cpu(capsys):
    assert main(['bench', '--device', 'cpu', '--encoder', TINY_ENCODER, '--precision', 'fp16']) == 1
    assert 'fp16 needs a CUDA GPU' in capsys.readouterr().err


def _nothing_built(monkeypatch):
    "Make building a network or a DataLoader fail loudly: an argument check must come before both."
    import ds2net.bench as bench
    def built(*a, **k): raise AssertionError('built something before checking the arguments')
    for name in ('library_phase', 'authors_phase', 'dataloader_throughput', 'segmentation_dls', 'DS2Net'):
        monkeypatch.setattr(bench, name, built)


@pytest.mark.parametrize('flags, message', [
    (['--bs', '0'], "--bs 0: the batch size must be a whole number of at least 1, e.g. 2"),
    (['--bs', '-1'], "--bs -1: the batch size must be a whole number of at least 1, e.g. 2"),
    (['--workers=-1'], "--workers -1: give the numbers of DataLoader worker processes to time, each a whole number, 0 or "
                       "more, e.g. --workers 0,2; none to skip"),
    (['--warmup', '-1'], "--warmup -1: the untimed steps before the timed ones are a whole number, 0 or more, e.g. 3"),
    (['--steps', '0'], "--steps 0: time at least 1 step (a whole number; 20 or more for a median worth reading)"),
    (['--size', '16'], "--size 16: DS2Net needs images of at least 32×32 pixels (four stride-2 levels); give a whole number "
                       "of 32 or more, e.g. 352 (the paper) or 64"),
    (['--encoder', 'no_such_net'], "--encoder no_such_net: timm has no model of that name; see `timm.list_models()` (e.g. "
                                   "pvt_v2_b2, the paper's, or resnet10t for a quick run)"),
])
def test_bench_checks_every_flag_before_building_anything(flags, message, monkeypatch, capsys):
    "Issue 16 item 13: each bad value is refused up front, naming its flag (no ZeroDivisionError, no AssertionError after 28 s)."
    _nothing_built(monkeypatch)
    assert main(['bench', '--device', 'cpu', '--encoder', TINY_ENCODER, *flags]) == 1
    assert capsys.readouterr().err == f'ds2net bench: error: {message}\n'


def test_run_bench_names_its_python_parameters(monkeypatch):
    from ds2net.bench import run_bench
    from ds2net.errors import ParameterError
    _nothing_built(monkeypatch)
    cases = [(dict(bs=2.5), 'bs', "bs=2.5: the batch size must be a whole number of at least 1, e.g. 2"),
             (dict(workers=3), 'workers', "workers=3: give the numbers of DataLoader worker processes to time, each a whole "
              "number, 0 or more, e.g. workers=(0, 2); none to skip"),
             (dict(compile='yes'), 'compile', "compile='yes': give True or False"),
             (dict(overwrite=1), 'overwrite', "overwrite=1: give True or False"),
             (dict(backends='no'), 'backends', "backends='no': give True or False"),
             (dict(device='gpu'), 'device', "device='gpu': use 'cpu', 'cuda' (or 'cuda:1'), or None for CUDA when present"),
             (dict(precision='fp8'), 'precision', "precision='fp8': use one of fp32, bf16, fp16, or None for the device's default")]
    for kw, param, message in cases:
        with pytest.raises(ParameterError) as e: run_bench(**{'device': 'cpu', 'encoder': TINY_ENCODER, **kw})
        assert (e.value.param, str(e.value)) == (param, message)


def test_run_bench_never_writes_its_json_over_a_checkpoint(tmp_path, monkeypatch):
    "Issue 16 item 2: json= goes through the output guard before the first step; an existing .json only with overwrite=True."
    from ds2net.bench import run_bench, check_bench_json, write_bench_json
    from ds2net.errors import ParameterError
    _nothing_built(monkeypatch)
    victim = tmp_path / 'best.pth'; victim.write_bytes(b'60 MB of weights')
    old = tmp_path / 'cpu.json'; old.write_text('{"old": 1}\n')
    for path, message in [
            (victim, f"json={str(victim)!r}: the benchmark report is written as .json; give a file name ending in .json"),
            (old, f"json={str(old)!r} already exists: ds2net never replaces a file unless asked; pass overwrite=True to "
                  "replace it, or choose another json"),
            (tmp_path, f"json={str(tmp_path)!r} is a folder: give the name of a file for the benchmark report, e.g. "
                       f"{str(tmp_path / 'cpu.json')}")]:
        with pytest.raises(ParameterError) as e: run_bench('cpu', encoder=TINY_ENCODER, json=path)
        assert (e.value.param, str(e.value)) == ('json', message)
    link = tmp_path / 'link.json'; link.symlink_to(victim)
    with pytest.raises(ParameterError, match='is a symbolic link'): check_bench_json(link, overwrite=True)
    assert victim.read_bytes() == b'60 MB of weights' and old.read_text() == '{"old": 1}\n'
    assert check_bench_json(old, overwrite=True) == old.resolve()
    write_bench_json({'train_speedup': 2.5}, tmp_path / 'new' / 'cpu.json')  # its folder is made
    assert json.loads((tmp_path / 'new' / 'cpu.json').read_text()) == {'train_speedup': 2.5}
    with pytest.raises(ParameterError, match='already exists'): write_bench_json({}, tmp_path / 'new' / 'cpu.json')
    write_bench_json({'train_speedup': 3.0}, old, overwrite=True)
    assert json.loads(old.read_text()) == {'train_speedup': 3.0}


def test_cli_bench_json_never_overwrites_a_checkpoint(tmp_path, monkeypatch, capsys):
    "`ds2net bench --json victim.pth` is refused before anything is built; the checkpoint is untouched."
    _nothing_built(monkeypatch)
    victim = tmp_path / 'best.pth'; victim.write_bytes(b'weights')
    assert main(['bench', '--device', 'cpu', '--encoder', TINY_ENCODER, '--json', str(victim)]) == 1
    assert capsys.readouterr().err == (f"ds2net bench: error: --json {victim}: the benchmark report is written as .json; "
                                       "give a file name ending in .json\n")
    assert victim.read_bytes() == b'weights'


def test_bench_json_records_the_cpu_and_its_instruction_sets(tmp_path):
    "Issue 21: the model name and AMX/AVX-512 flags as /proc/cpuinfo gives them, and the torch and oneDNN versions."
    from ds2net.bench import cpu_info, _machine, ISA_FLAGS
    info = tmp_path / 'cpuinfo'
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                    "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_info(info) == dict(cpu_model='Intel(R) Xeon(R) Platinum 8480+', isa={f: True for f in ISA_FLAGS})
    info.write_text("model name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n")
    assert cpu_info(info)['isa'] == dict(amx_bf16=False, amx_tile=False, avx512_bf16=True, avx512_vnni=True, avx512f=True, avx2=True)
    m = _machine(torch.device('cpu'))
    assert m['torch'] == torch.__version__ and m['onednn'] in torch.__config__.show()
    try: real = open('/proc/cpuinfo').read()
    except OSError: return
    flags = next(l for l in real.splitlines() if l.startswith('flags')).split(':', 1)[1].split()
    assert m['isa'] == {f: f in flags for f in ISA_FLAGS}
    assert m['cpu_model'] == next(l for l in real.splitlines() if l.startswith('model name')).split(':', 1)[1].strip()
