#!/usr/bin/env bash
# The GPU run of issue 21, as ONE script with a hard time limit: on a fresh GPU machine (H100/H200) with no network,
# from the repository root,
#
#   bash tools/gpu_check.sh                # results in $OUT (default outputs/gpu_check), at most BUDGET s (default 420)
#   SMOKE=1 bash tools/gpu_check.sh        # the same steps on this CPU with the tiny encoder, in under ~3 minutes
#
# What it needs there: python3 with PyTorch (CUDA), timm, numpy, pandas, matplotlib, scipy, scikit-learn, pillow, rich,
# pyyaml, and the wheels of what the image lacks (fastai and its small dependencies; accelerate, torchmetrics,
# lightning-utilities and captum where missing), made beforehand with `make gpu-wheels` into .whl/, which travels with
# the working tree (the device tool's `carry: [".whl"]` when it is gitignored). Nothing is downloaded.
#
# Every step runs under `timeout`, capped by its own limit and by the time left of BUDGET; a step that does not fit is
# skipped and said so, a failing one is logged and the next goes on. The steps, most important first:
#   1. `ds2net bench` at the paper's configuration (PVTv2-B2, 352², batch 8): the authors' step against the library's
#      default (fp32 on CUDA) and bf16; then bf16 channels-last, bf16 torch.compile (channels-last too), fp32 channels-last.
#      Images/s for training and inference, peak memory, first-step (compile) time; the library steps with FusedAdam.
#   2. The Dice check of tests/test_train.py on the GPU: the same short run in fp32 and bf16 ends within 0.01 Dice.
#   3. A few minutes of training of the paper's configuration on synthetic colonoscopy (bf16, multi-scale 0.75/1/1.25).
#   4. Figures of that GPU-trained network: detail and semantic masks per stage (stage_maps), attribution maps.
#   5. A small trained model for the tutorials' `gpu` cells: DS2Net pvt_v2_b0, its weights in fp16 (no optimizer state).
# It writes to $OUT at most 8 files, one folder deep, each under 16 MiB:
#   gpu_check.log       everything printed
#   results.json        every benchmark, the table, ratios to the authors' step, achieved TFLOP/s against the chip's bf16
#                       peak (one step ~ 3 x 21.2 GFLOP x batch), the Dice check, the training summary, what was skipped
#   bench.png           step times and inference images/s of the variants
#   train_log.csv, weights.png       the training's log and its side-output weight trajectories
#   stage_maps.png, attribution.png  figures of the GPU-trained network (the library's figure style)
#   ds2net_pvt_v2_b0_fp16.pth        the small model (a ds2net checkpoint: model_from_checkpoint loads it)
set -uo pipefail
SMOKE=${SMOKE:-0}
OUT=${OUT:-outputs/gpu_check$([ "$SMOKE" = 1 ] && echo _smoke)}
mkdir -p "$OUT"
rm -f "$OUT"/{results.json,bench.png,train_log.csv,weights.png,stage_maps.png,attribution.png,ds2net_*_fp16.pth}
: > "$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
# the device image's python3; for SMOKE=1 on a developer's machine, the project's .venv when there is one
if [ "$SMOKE" = 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 PYTHONWARNINGS=ignore MPLBACKEND=Agg
WORK=$(mktemp -d /tmp/ds2net-gpu.XXXX)
SITE=$WORK/site
START=$(date +%s)
if [ "$SMOKE" = 1 ]; then BUDGET=${BUDGET:-170}; else BUDGET=${BUDGET:-420}; fi
DEADLINE=$((START + BUDGET))
STEPS_LOG=$WORK/steps.tsv; : > "$STEPS_LOG"
say() { echo "[$(( $(date +%s) - START )) s] $*"; }

# step NAME CAP MIN CMD...: CMD under `timeout`, at most CAP s and never past the deadline; skipped when under MIN s are left.
step() {
  local name=$1 cap=$2 min=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt "$min" ]; then say "$name: SKIPPED ($left s left, needs $min)"; printf '%s\tskipped\t0\n' "$name" >> "$STEPS_LOG"; return 0; fi
  local t=$(( cap < left ? cap : left )) t0=$(date +%s)
  say "$name (at most $t s): $*"
  timeout -k 10 "$t" "$@"; local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then say "$name: done in $took s"; printf '%s\tok\t%s\n' "$name" "$took" >> "$STEPS_LOG"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then say "$name: STOPPED at its limit ($t s)"; printf '%s\ttimeout\t%s\n' "$name" "$took" >> "$STEPS_LOG"
  else say "$name: FAILED (exit $rc)"; printf '%s\tfailed(%s)\t%s\n' "$name" "$rc" "$took" >> "$STEPS_LOG"; fi
  return 0
}

# 0. What the machine lacks, from the carried wheels (no index, no network); ds2net itself from this checkout.
NEEDED='fastai fastcore fasttransform plum fastprogress accelerate torchmetrics captum'
missing=$($PY -c "
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $NEEDED)
if [ -n "$missing" ] || [ "${FORCE_WHEELS:-0}" = 1 ]; then
  say "missing here: ${missing:-none (FORCE_WHEELS=1)}"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || say "wheels: pip FAILED"
  else say "no .whl/ folder: run 'make gpu-wheels' where pip works, and carry .whl"; fi
fi
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
# fastprogress imports fasthtml (with a web server's dependencies) for its notebook bars only; in a console an empty
# module is enough, and it is made only where the real one is missing.
if ! $PY -c 'import fasthtml.common' 2>/dev/null; then
  mkdir -p "$SITE/fasthtml"; : > "$SITE/fasthtml/__init__.py"; : > "$SITE/fasthtml/common.py"
fi
$PY - <<'EOF' || { say "ds2net cannot be imported here: stopping"; exit 1; }
import os, torch, timm, fastai, ds2net.bench
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'fastai', fastai.__version__)
print('cpu', ds2net.bench.cpu_info()['cpu_model'], '| threads', torch.get_num_threads())
if os.environ.get('SMOKE') != '1':
    assert torch.cuda.is_available(), 'no CUDA device'
    print('device', torch.cuda.get_device_name(0), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
say "set up"

# the `ds2net` command without installing the package (it is on PYTHONPATH)
DS2NET=($PY -c 'import sys; from ds2net.cli import main; sys.exit(main(sys.argv[1:]))')
if [ "$SMOKE" = 1 ]; then
  DEV=cpu; CFG=(--encoder resnet10t --size 64 --bs 2); STEPS=(--steps 2 --warmup 1); CWARM=1; EPOCHS=2; NSYN=24
  SMALL=resnet10t; SMALL_SIZE=64; SMALL_EPOCHS=1; DICE_EPOCHS=2; WORKERS=0,2; CAP_E=60; CAP_B=45; CAP_C=50; CAP_T=40; CAP_F=30
else
  DEV=cuda; CFG=(--encoder pvt_v2_b2 --size 352 --bs 8); STEPS=(--steps 20 --warmup 5); CWARM=8; EPOCHS=12; NSYN=320
  SMALL=pvt_v2_b0; SMALL_SIZE=352; SMALL_EPOCHS=10; DICE_EPOCHS=6; WORKERS=0,4; CAP_E=180; CAP_B=90; CAP_C=150; CAP_T=150; CAP_F=60
fi
bench() {  # name, cap, extra flags: one `ds2net bench` process (torch.compile's variants, each on its own)
  local name=$1 cap=$2; shift 2
  step "bench_$name" "$cap" 20 "${DS2NET[@]}" bench --device $DEV "${CFG[@]}" "${STEPS[@]}" "$@" --json "$WORK/bench_$name.json"
}

# 1. The benchmarks without compile, in one process that makes the synthetic images once (making them takes longer than
#    timing the steps on a GPU); each variant writes its JSON as soon as it is measured. Only the first two also time
#    the authors' step; the first also times the DataLoader.
step bench_eager "$CAP_E" 30 $PY - "$WORK" "$DEV" "${CFG[@]}" "${STEPS[@]}" --workers "$WORKERS" <<'EOF'
import argparse, functools, sys
import ds2net.data.loaders as loaders
from ds2net.bench import run_bench
loaders.make_synthetic = functools.lru_cache(loaders.make_synthetic)  # the same arguments give the same images
work, dev = sys.argv[1], sys.argv[2]
p = argparse.ArgumentParser()
for f in ('--encoder', '--size', '--bs', '--steps', '--warmup', '--workers'): p.add_argument(f)
a = p.parse_args(sys.argv[3:])
cfg = dict(device=dev, encoder=a.encoder, size=int(a.size), bs=int(a.bs), steps=int(a.steps), warmup=int(a.warmup))
variants = [('fp32', dict(precision='fp32', workers=tuple(int(w) for w in a.workers.split(',')))),
            ('bf16', dict(precision='bf16', workers=())),
            ('bf16_cl', dict(precision='bf16', channels_last=True, authors=False, workers=())),
            ('fp32_cl', dict(precision='fp32', channels_last=True, authors=False, workers=()))]
for name, kw in variants:
    try:
        r = run_bench(**cfg, **kw, json=f'{work}/bench_{name}.json')
        print(f"bench {name}: library step {1000 * r['library']['step_s']:.1f} ms" +
              (f", authors' {1000 * r['authors']['step_s']:.1f} ms, train_speedup {r['train_speedup']:.2f}" if 'authors' in r else ''))
    except Exception as e: print(f'bench {name} FAILED: {type(e).__name__}: {e}')
EOF

# 2. bf16 reaches fp32's Dice on the GPU too (the check of tests/test_train.py, same configuration).
step dice_bf16_vs_fp32 "$CAP_B" 25 $PY - "$WORK/dice.json" "$DEV" "$DICE_EPOCHS" <<'EOF'
import json, sys, tempfile
from ds2net.train import train
out, dev, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
dice = {}
with tempfile.TemporaryDirectory() as d:
    for precision in ('fp32', 'bf16'):
        s = train('synthetic:polyp', f'{d}/{precision}', encoder='resnet10t', size=64, bs=8, epochs=epochs, lr=3e-3,
                  n_synthetic=96, difficulty=0.2, device=dev, precision=precision)
        dice[precision] = s['best_dice']
res = dict(dice, epochs=epochs, difference=abs(dice['bf16'] - dice['fp32']), holds=abs(dice['bf16'] - dice['fp32']) <= 0.01)
json.dump(res, open(out, 'w'), indent=1); print('Dice check:', res)
EOF

# 3. A few minutes of training of the paper's configuration (the log and best.pth survive a stop at the limit).
step train_paper "$CAP_T" 40 "${DS2NET[@]}" train --data synthetic:polyp "${CFG[@]}" --epochs $EPOCHS \
    --multiscale 0.75,1,1.25 --precision bf16 --n-synthetic $NSYN --device $DEV --out "$WORK/train"
[ -f "$WORK/train/log.csv" ] && cp "$WORK/train/log.csv" "$OUT/train_log.csv"  # its summary.json goes into results.json
[ -f "$WORK/train/weights.png" ] && cp "$WORK/train/weights.png" "$OUT/weights.png"

# 4. Figures of the GPU-trained network, on held-out synthetic images (another seed than the training set's).
step figures "$CAP_F" 20 $PY - "$WORK/train" "$OUT" "$DEV" <<'EOF'
import sys, torch
from pathlib import Path
import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
from ds2net.checkpoint import model_from_checkpoint
from ds2net.data import segmentation_dls
from ds2net.stage_maps import stage_maps, show_stage_maps
run, out, dev = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ckpt = next((run/n for n in ('best.pth', 'last.pth') if (run/n).is_file()), None)
if ckpt is None: sys.exit('no checkpoint from the training step')
model, cfg = model_from_checkpoint(ckpt)
model = model.to(dev)
dls = segmentation_dls('synthetic:polyp', size=cfg['size'], bs=4, n=8, valid_pct=0.5, seed=7, device=dev)
x, y = (t.as_subclass(torch.Tensor) for t in dls.valid.one_batch())
maps = stage_maps(model, x, y, mean=cfg['mean'], std=cfg['std'])
fig = show_stage_maps(maps, 0); fig.suptitle(f'{ckpt.name} of the GPU run ({cfg["encoder"]}, {cfg["size"]} px)')
fig.savefig(out/'stage_maps.png', dpi=80); plt.close('all'); print('stage_maps.png from', ckpt)
try: from ds2net.attribution import attribute, show_attributions
except ImportError as e: sys.exit(f'no attribution figure: {e}')
attrs = {m: attribute(model, x[:2], method=m, **({'n_steps': 16, 'internal_batch_size': 8} if m == 'integrated_gradients' else {}))
         for m in ('integrated_gradients', 'saliency', 'gradcam', 'occlusion')}
fig = show_attributions(stage_maps(model, x[:2], y[:2], mean=cfg['mean'], std=cfg['std']), attrs)
fig.savefig(out/'attribution.png', dpi=80); print('attribution.png')
EOF

# 5. torch.compile (bf16, with channels-last and without), each in its own process (a compiler crash stops only it).
bench bf16_compile "$CAP_C" --precision bf16 --compile --no-authors --workers '' --warmup $CWARM
[ "$SMOKE" = 1 ] || bench bf16_cl_compile "$CAP_C" --precision bf16 --channels-last --compile --no-authors --workers '' --warmup $CWARM

# 6. The small model for the tutorials' `gpu` cells: weights in fp16, no optimizer state.
step small_model "$CAP_T" 40 "${DS2NET[@]}" train --data synthetic:polyp --encoder $SMALL --size $SMALL_SIZE --bs 8 \
    --epochs $SMALL_EPOCHS --precision bf16 --n-synthetic $NSYN --device $DEV --out "$WORK/small"
ls "$WORK"/small/*.pth >/dev/null 2>&1 && step small_fp16 30 5 $PY - "$WORK/small" "$OUT/ds2net_${SMALL}_fp16.pth" <<'EOF'
import sys, torch
from pathlib import Path
from ds2net.checkpoint import read_checkpoint, model_from_checkpoint
from ds2net.files import atomic_write
run, dest = Path(sys.argv[1]), Path(sys.argv[2])
src = next(run/n for n in ('best.pth', 'last.pth') if (run/n).is_file())
ckpt = read_checkpoint(src)
small = {k: v for k, v in ckpt.items() if k in ('format', 'config', 'epoch', 'best_dice', 'log')}
small['model'] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt['model'].items()}
small['config'] = {**ckpt['config'], 'weights_dtype': 'float16', 'trained_on': 'gpu_check.sh'}
atomic_write(dest, lambda f: torch.save(small, f))
model, cfg = model_from_checkpoint(dest)  # loads as any checkpoint (fp16 weights into the fp32 network)
print(f'{dest.name}: {dest.stat().st_size / 2**20:.1f} MiB from {src.name} ({cfg["encoder"]}, {cfg["size"]} px)')
EOF

# 7. One JSON and one figure of everything measured (always runs: a few seconds).
$PY - "$WORK" "$OUT" "$START" <<'EOF'
import glob, json, os, sys, time
work, out, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
runs = []
for f in sorted(glob.glob(f'{work}/bench_*.json'), key=os.path.getmtime):
    r = json.load(open(f)); r['name'] = os.path.basename(f)[6:-5]; runs.append(r)
base = next((r for r in runs if 'authors' in r), None)
gpu = runs[0]['machine'].get('gpu') if runs else None
BF16_PEAK_TFLOPS = {'H200': 989.4, 'H100 SXM': 989.4, 'H100 80GB HBM3': 989.4, 'H100 PCIe': 756.0, 'H100 NVL': 835.0,
                    'A100': 312.0, 'L40S': 362.1, 'L4': 121.0}  # dense bf16 tensor-core peaks of the vendors' data sheets
peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if gpu and k in gpu), None)
table = []
for r in runs:
    l, bs = r['library'], r['config']['bs']
    row = dict(name=r['name'], precision=l['precision'], channels_last=l['channels_last'], compile=l['compile'],
               step_ms=1000 * l['step_s'], train_images_per_s=l['images_per_s'], infer_images_per_s=l['infer_images_per_s'],
               peak_mem_mb=l['peak_mem_mb'], first_step_s=l['first_step_s'], valid_dice=l.get('valid_dice'),
               train_tflops=3 * 21.2e9 * bs / l['step_s'] / 1e12)  # the paper configuration's FLOP count (PVTv2-B2, 352²)
    if peak: row['train_fraction_of_bf16_peak'] = row['train_tflops'] / peak
    if base:
        a = base['authors']
        row.update(train_speedup=a['step_s'] / l['step_s'], infer_speedup=l['infer_images_per_s'] / a['infer_images_per_s'])
    table.append(row)
steps = [dict(zip(('step', 'status', 'seconds'), l.rstrip('\n').split('\t'))) for l in open(f'{work}/steps.tsv')]
res = dict(smoke=os.environ.get('SMOKE') == '1', gpu=gpu, bf16_peak_tflops=peak, table=table, runs=runs,
           authors=base['authors'] if base else None, steps=steps, seconds=time.time() - start,
           goals=dict(train_speedup=2.5, infer_speedup=3.0))
for name, f in (('dice_check', 'dice.json'), ('training', 'train/summary.json'), ('small_model', 'small/summary.json')):
    if os.path.isfile(f'{work}/{f}'): res[name] = json.load(open(f'{work}/{f}'))
if table:
    best = min(table, key=lambda r: r['step_ms'])
    res['fastest'] = best['name']
json.dump(res, open(f'{out}/results.json', 'w'), indent=1)
print(f"{'variant':16} {'step ms':>8} {'img/s':>7} {'infer/s':>8} {'peak MiB':>8} {'1st s':>6} {'TFLOP/s':>8} {'train x':>7} {'infer x':>7}")
if base: print(f"{'authors (fp32)':16} {1000*base['authors']['step_s']:8.1f} {base['authors']['images_per_s']:7.1f} "
               f"{base['authors']['infer_images_per_s']:8.1f} {base['authors']['peak_mem_mb']:8.0f}")
for r in table:
    print(f"{r['name']:16} {r['step_ms']:8.1f} {r['train_images_per_s']:7.1f} {r['infer_images_per_s']:8.1f} {r['peak_mem_mb']:8.0f} "
          f"{r['first_step_s']:6.1f} {r['train_tflops']:8.2f} {r.get('train_speedup', float('nan')):7.2f} {r.get('infer_speedup', float('nan')):7.2f}")
if peak: print(f'bf16 peak of the {gpu}: {peak} TFLOP/s')
if 'dice_check' in res: print('Dice check (bf16 vs fp32):', res['dice_check'])
for s in steps: print(f"  {s['step']:18} {s['status']:12} {s['seconds']} s")
try:
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    names = (["authors'"] if base else []) + [r['name'] for r in table]
    ms = ([1000 * base['authors']['step_s']] if base else []) + [r['step_ms'] for r in table]
    ips = ([base['authors']['infer_images_per_s']] if base else []) + [r['infer_images_per_s'] for r in table]
    fig, axs = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 1.6), constrained_layout=True)
    axs[0].barh(names, ms, color='#0072B2'); axs[0].set_xlabel('training step, ms (median)'); axs[0].invert_yaxis()
    axs[1].barh(names, ips, color='#E69F00'); axs[1].set_xlabel('inference, images/s'); axs[1].invert_yaxis()
    cfg = runs[0]['config'] if runs else {}
    fig.suptitle(f"ds2net bench, {cfg.get('encoder')}, {cfg.get('size')}², batch {cfg.get('bs')}, {gpu or runs[0]['machine'].get('cpu_model') if runs else '?'}")
    fig.savefig(f'{out}/bench.png', dpi=90)
except Exception as e: print('no figure:', e)
EOF
rm -rf "$WORK"
say "done; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
