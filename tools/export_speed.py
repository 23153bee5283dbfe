"""Inference speed of one DS2Net on the CPU: PyTorch fp32, PyTorch bf16 autocast and onnxruntime fp32, side by side.

    python tools/export_speed.py                      # the paper's configuration: pvt_v2_b2, 352 x 352, 4 images
    python tools/export_speed.py --encoder resnet10t --size 256 --images 8 --threads 2

Random weights (nothing is downloaded): speed does not depend on them. Run it alone on the machine (on a shared
one, under its CPU lock), since other work changes the numbers. Prints a Markdown table, and JSON with --json."""
import argparse, json, os, sys, warnings

os.environ.setdefault('HF_HUB_OFFLINE', '1')
warnings.filterwarnings('ignore')

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--encoder', default='pvt_v2_b2')
    p.add_argument('--size', type=int, default=352)
    p.add_argument('--images', type=int, default=4, help='images per forward pass (default 4)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per backend; the median is reported (default 5)')
    p.add_argument('--threads', type=int, default=None, help="threads for every backend (default: torch's)")
    p.add_argument('--json', default=None, help='also write the table to this JSON file')
    a = p.parse_args(argv)
    from ds2net.export import inference_speed
    table = inference_speed(a.encoder, a.size, a.images, a.repeats, threads=a.threads)
    print(f"# {table.index.name}; export {table.attrs['export_seconds']:.1f} s, ONNX {table.attrs['onnx_mb']:.1f} MiB\n")
    print('| backend | images/s | × fp32 | max abs diff vs fp32 |\n|---|---|---|---|')
    for name, r in table.iterrows():
        print(f"| {name} | {r['images_per_s']:.2f} | {r['vs_fp32']:.2f} | {r['max_abs_diff_vs_fp32']:.1e} |")
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(config=table.index.name, **table.attrs, rows=table.reset_index(drop=False).to_dict('records')), f, indent=2, default=str)
    return 0

if __name__ == '__main__': sys.exit(main())
