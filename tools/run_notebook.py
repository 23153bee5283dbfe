"""Execute notebooks in place, as a reader's JupyterLab would, and stamp each executed code cell with the hash of its
source, so that `tests/test_notebook_outputs.py` can tell a committed output that its cell's current code did not
produce.

    .venv/bin/python tools/run_notebook.py nbs/12_stage_maps.ipynb nbs/tutorials/01_quick_start.ipynb
    make run-nb NB=nbs/12_stage_maps.ipynb          # the same, through make
    .venv/bin/python tools/run_notebook.py --check nbs/*.ipynb   # only report cells whose outputs are stale

Cells flagged with one of settings.ini's `tst_flags` (`#| slow`, `#| gpu`) and `#| eval: false` cells are skipped, as
`nbdev_test` skips them; they keep their committed outputs and stamps (`--flags slow` runs the slow ones too). Each
notebook runs in its own folder with a fresh kernel; the first error stops it and nothing is written. The notebook is
then cleaned with `nbdev_clean`, which keeps the stamp (settings.ini: `allowed_cell_metadata_keys = ds2net`).
"""
import argparse, hashlib, subprocess, sys, time
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = 'ds2net'          # the cell-metadata key nbdev_clean keeps
SOURCE_KEY = 'source_sha256'


def source_hash(source)->str:
    "The hash that stamps a cell: sha256 of its source text, the first 16 hex digits."
    text = ''.join(source) if isinstance(source, list) else source
    return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def test_flags()->set:
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini', encoding='utf-8')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())


def directives(source:str)->dict:
    "nbdev's `#| name args` lines at the top of a cell, as {name: [args]}."
    out = {}
    for line in source.splitlines():
        s = line.strip()
        if not s: continue
        if not s.startswith('#|'): break
        name, *args = s[2:].split()
        out[name.rstrip(':')] = args
    return out


def skipped(cell, flags:set)->bool:
    "Whether `nbdev_test` (and so this tool) leaves `cell` unexecuted."
    if cell['cell_type'] != 'code': return True
    src = ''.join(cell['source'])
    if 'nbdev_export' + '(' in src: return True
    d = directives(src)
    if [a.lower() for a in d.get('eval', [])][:1] == ['false']: return True
    return bool(flags & d.keys())


def stale_cells(nb:dict, flags:set)->list:
    """`(index, first line, why)` of each code cell whose committed state its current source did not produce: a cell
    that runs has no stamp or another source's stamp; a skipped cell has outputs stamped for another source."""
    out = []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        stamp = (c.get('metadata', {}).get(STAMP) or {}).get(SOURCE_KEY)
        first = next((l for l in src.splitlines() if l.strip() and not l.startswith('#|')), src.splitlines()[0] if src else '')
        if skipped(c, flags):
            if c.get('outputs') and stamp != source_hash(src):
                out.append((i, first, 'its committed outputs come from another version of its code'))
        elif stamp is None: out.append((i, first, 'it was never executed by tools/run_notebook.py'))
        elif stamp != source_hash(src): out.append((i, first, 'its code changed after it was executed'))
    return out


def execute(path:Path, flags:set, timeout:int=1800)->float:
    "Run `path` in place (skipping flagged cells), stamp executed cells, write it, clean it; returns seconds."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', allow_errors=False,
                            resources={'metadata': {'path': str(path.parent)}})
    t0 = time.time()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if skipped(cell, flags): continue
            client.execute_cell(cell, i)
            cell.metadata[STAMP] = {SOURCE_KEY: source_hash(cell.source)}
    seconds = time.time() - t0
    nbformat.write(nb, path)
    subprocess.run([str(ROOT/'.venv/bin/nbdev_clean'), '--fname', str(path)], check=True, cwd=ROOT)
    return seconds


def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('notebooks', nargs='+', type=Path)
    p.add_argument('--check', action='store_true', help='report stale cells and exit 1 if any; execute nothing')
    p.add_argument('--flags', default='', help='test flags to run anyway, e.g. "slow"')
    p.add_argument('--timeout', type=int, default=1800, help='seconds per cell')
    a = p.parse_args(argv)
    flags = test_flags() - set(a.flags.split())
    bad = 0
    for path in a.notebooks:
        if a.check:
            import json
            for i, first, why in stale_cells(json.loads(path.read_text()), flags):
                print(f'{path}: cell {i} ({first[:60]!r}): {why}'); bad += 1
            continue
        print(f'{path}: executing ...', flush=True)
        print(f'{path}: {execute(path, flags, a.timeout):.0f} s', flush=True)
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
