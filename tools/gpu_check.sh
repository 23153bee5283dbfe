#!/usr/bin/env bash
# GPU check for issue 9: on a fresh GPU machine (H100 or better) with no network, from the repository root:
#
#   bash tools/gpu_check.sh            # results in $OUT (default outputs/gpu_check)
#
# What it needs there: python3 with PyTorch (CUDA), timm, numpy, pandas, matplotlib, scipy, scikit-learn, pillow, rich,
# pyyaml (the device image has them), and the wheels of what it lacks, made here beforehand with `make gpu-wheels`
# into the gitignored .whl/ folder, which must travel with the working tree (the device tool's `carry: [".whl"]`).
# Nothing is downloaded. It runs in about 6 minutes on an H100 and writes to $OUT, at most 8 files, one folder deep:
#   gpu_check.log    everything printed
#   bench.json       the benchmarks: a list of `ds2net bench` results (paper configuration, PVTv2-B2, 352², batch 8)
#   bench.png        their step times and images per second
#   train_log.csv, train_summary.json, weights.png   a few minutes of training of the paper configuration
# It was written without a GPU at hand (issue 9's session had none): it has not been run yet.
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0
WORK=$(mktemp -d /tmp/ds2net-gpu.XXXX)
SITE=$WORK/site
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START )) s] $*"; }

# 1. What the machine lacks, from the carried wheels (no index, no network); ds2net itself from this checkout.
if ! $PY -c 'import fastai, fastcore, fasttransform, plum, fastprogress' 2>/dev/null || [ "${FORCE_WHEELS:-0}" = 1 ]; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ folder: run 'make gpu-wheels' where pip works, and carry .whl"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
# fastprogress imports fasthtml (with a web server's dependencies) for its notebook bars only; in a console an empty
# module is enough, and it is made only where the real one is missing.
if ! $PY -c 'import fasthtml.common' 2>/dev/null; then
  mkdir -p "$SITE/fasthtml"; : > "$SITE/fasthtml/__init__.py"; : > "$SITE/fasthtml/common.py"
fi
$PY - <<'EOF' || exit 1
import torch, timm, fastai, ds2net.bench
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'fastai', fastai.__version__)
import os
if os.environ.get('SMOKE') == '1': raise SystemExit(0)
assert torch.cuda.is_available(), 'no CUDA device'
print('device', torch.cuda.get_device_name(0), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
say "set up"

# 2. The benchmarks at the paper's configuration: the authors' step against the library's, in fp32 and bf16, with and
#    without channels-last and torch.compile. Each writes one JSON; the first also times the authors' step and the
#    DataLoader (0 and 4 workers). A failing variant is logged and the others go on.
# the `ds2net` command without installing the package (it is on PYTHONPATH)
DS2NET='import sys; from ds2net.cli import main; sys.exit(main(sys.argv[1:]))'
# SMOKE=1 runs the same steps on the CPU with the tiny encoder in a minute or two: a check of this script without a GPU
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; CFG="--encoder resnet10t --size 64 --bs 2"; STEPS="--steps 2 --warmup 1"; EPOCHS=1; NSYN=24
else
  DEV=cuda; CFG="--encoder pvt_v2_b2 --size 352 --bs 8"; STEPS="--steps 30 --warmup 5"; EPOCHS=6; NSYN=400
fi
run_bench() {  # name, extra flags
  local name=$1; shift
  say "bench $name: $*"
  timeout 300 $PY -c "$DS2NET" bench --device $DEV $CFG $STEPS "$@" --json "$WORK/bench_$name.json" \
    || say "bench $name FAILED (exit $?)"
}
run_bench fp32            --precision fp32 --workers 0,4
run_bench bf16            --precision bf16 --workers ''
run_bench bf16_cl         --precision bf16 --channels-last --workers ''
run_bench fp32_cl         --precision fp32 --channels-last --no-authors --workers ''
run_bench bf16_compile    --precision bf16 --compile --no-authors --workers '' --warmup 8
run_bench bf16_cl_compile --precision bf16 --channels-last --compile --no-authors --workers '' --warmup 8

# 3. A few minutes of training of the paper configuration on synthetic colonoscopy (bf16, multi-scale as the authors).
say "training"
timeout 240 $PY -c "$DS2NET" train --data synthetic:polyp $CFG --epochs $EPOCHS \
    --multiscale 0.75,1,1.25 --precision bf16 --n-synthetic $NSYN --workers 4 --device $DEV --out "$WORK/train" \
  || say "training FAILED or stopped (exit $?)"
for f in log.csv summary.json; do [ -f "$WORK/train/$f" ] && cp "$WORK/train/$f" "$OUT/train_$f"; done
[ -f "$WORK/train/weights.png" ] && cp "$WORK/train/weights.png" "$OUT/weights.png"

# 4. One JSON and one figure of the benchmarks.
$PY - "$WORK" "$OUT" <<'EOF'
import json, sys, glob, os
work, out = sys.argv[1], sys.argv[2]
runs = []
for f in sorted(glob.glob(f'{work}/bench_*.json')):
    r = json.load(open(f)); r['name'] = os.path.basename(f)[6:-5]; runs.append(r)
json.dump(runs, open(f'{out}/bench.json', 'w'), indent=1)
print(f"{'variant':18} {'lib step ms':>11} {'img/s':>7} {'infer img/s':>11} {'peak MiB':>9} {'1st step s':>10} | authors ms  speedup  infer_x")
for r in runs:
    l, a = r['library'], r.get('authors')
    line = f"{r['name']:18} {1000*l['step_s']:11.1f} {l['images_per_s']:7.1f} {l['infer_images_per_s']:11.1f} {l['peak_mem_mb']:9.0f} {l['first_step_s']:10.1f}"
    if a: line += f" | {1000*a['step_s']:9.1f} {r['train_speedup']:8.2f} {r['infer_speedup']:8.2f}"
    print(line)
base = next((r for r in runs if 'authors' in r), None)
for r in runs:
    if 'dataloader' in r: print('dataloader (images/s):', r['dataloader'])
try:
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    names = (["authors'"] if base else []) + [r['name'] for r in runs]
    steps = ([1000 * base['authors']['step_s']] if base else []) + [1000 * r['library']['step_s'] for r in runs]
    ips = ([base['authors']['infer_images_per_s']] if base else []) + [r['library']['infer_images_per_s'] for r in runs]
    fig, axs = plt.subplots(1, 2, figsize=(12, 4))
    axs[0].barh(names, steps); axs[0].set_xlabel('training step, ms (batch 8, 352², median)')
    axs[1].barh(names, ips); axs[1].set_xlabel('inference, images/s')
    gpu = runs[0]['machine'].get('gpu', '?') if runs else '?'
    fig.suptitle(f'ds2net bench, PVTv2-B2, {gpu}'); fig.tight_layout(); fig.savefig(f'{out}/bench.png', dpi=90)
except Exception as e: print('no figure:', e)
EOF
say "done; results in $OUT"
