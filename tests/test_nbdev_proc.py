"""nbdev's doc processing (what `nbdev_proc_nbs` and `nbdev_docs` run before Quarto) over every notebook.

It re-runs each cell that holds an import, alone with the export cells: a cell that mixes an import with code
needing variables from cells it does not run (`import io; learn = Learner(dls, ...)`) fails there and not in
`nbdev_test`. Move such imports into the notebook's import cell. tools/docs.py runs the processing exactly as
nbdev does (`nbdev.serve_drv.main` with `FilterDefaults`, in worker processes), without Quarto."""
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def test_every_notebook_survives_nbdev_doc_processing(docs_work):
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), 'process', '--work', str(docs_work)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    failed = [l for l in r.stdout.splitlines() if l.startswith('FAILED')]
    assert r.returncode == 0, ('nbdev could not process these notebooks (an import cell needs variables from cells '
                               'it does not run? move its imports into the import cell):\n' + r.stdout[-6000:] + r.stderr[-3000:])
    assert not failed
    processed = sorted(p.relative_to(docs_work/'proc').as_posix() for p in (docs_work/'proc').rglob('*.ipynb'))
    expected = sorted(p.relative_to(ROOT/'nbs').as_posix() for p in (ROOT/'nbs').rglob('*.ipynb')
                      if not any(part.startswith(('_', '.')) for part in p.relative_to(ROOT/'nbs').parts))
    assert processed == expected

def _docs_build():
    import importlib.util
    spec = importlib.util.spec_from_file_location('ds2net_docs_build', ROOT/'tools'/'docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def test_the_class_of_error_is_caught(tmp_path, monkeypatch):
    "A notebook whose import cell needs a variable from a cell nbdev does not run fails processing, and says where."
    import json
    monkeypatch.chdir(ROOT)
    cell = lambda src: {'cell_type': 'code', 'execution_count': None, 'id': f'c{abs(hash(src)) % 10**6}', 'metadata': {}, 'outputs': [], 'source': src}
    def notebook(cells):
        p = tmp_path/f'nb{len(list(tmp_path.glob("*.ipynb")))}.ipynb'
        p.write_text(json.dumps({'cells': [{'cell_type': 'markdown', 'id': 'm0', 'metadata': {}, 'source': '# A chapter\n\n> summary'}] + cells,
                                 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
                                 'nbformat': 4, 'nbformat_minor': 5}))
        return p
    build = _docs_build()
    bad = notebook([cell('#| export\ndef f(x): return x'), cell('data = [1, 2]'), cell('import math\nmath.prod(data)')])
    err, _ = build._proc_one((str(bad), str(tmp_path/'out-bad.ipynb')))
    assert err and "NameError: name 'data' is not defined" in err and 'import math' in err
    good = notebook([cell('#| export\ndef f(x): return x'), cell('import math'), cell('data = [1, 2]\nmath.prod(data)')])
    err, _ = build._proc_one((str(good), str(tmp_path/'out-good.ipynb')))
    assert err is None and (tmp_path/'out-good.ipynb').exists()
