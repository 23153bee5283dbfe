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
