"""A committed output can never be stale: every code cell's outputs were produced by the cell's current source.

`tools/run_notebook.py` executes a notebook in place (`make run-nb NB=nbs/X.ipynb`) and stamps each executed cell with
the hash of its source (cell metadata `ds2net.source_sha256`, kept by `nbdev_clean` through settings.ini's
`allowed_cell_metadata_keys`). A cell whose code changed afterwards, or that was never run by the tool, is stale. One
test case per committed notebook of nbs/ and nbs/tutorials/, failing with the notebook, each stale cell and the
command that re-executes it; then the check itself, against a notebook changed on purpose and one executed here."""
import copy, importlib.util, json, shutil
from configparser import ConfigParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted([*(ROOT/'nbs').glob('*.ipynb'), *(ROOT/'nbs'/'tutorials').glob('*.ipynb')])

def _load_tool():
    spec = importlib.util.spec_from_file_location('ds2net_run_notebook', ROOT/'tools'/'run_notebook.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

rn = _load_tool()
FLAGS = rn.test_flags()  # the cells `nbdev_test` skips (`#| slow`, `#| gpu`) keep their committed outputs

def stale(path:Path)->list: return rn.stale_cells(json.loads(path.read_text(encoding='utf-8')), FLAGS)

def rerun_command(path:Path)->str: return f'make run-nb NB={path.relative_to(ROOT)}'

def report(path:Path, cells:list)->str:
    lines = [f'{path.relative_to(ROOT)}: {len(cells)} stale cell(s), outputs not produced by the current code:']
    lines += [f'  cell {i} ({first[:60]!r}): {why}' for i, first, why in cells]
    lines.append(f'  re-execute it in place with: {rerun_command(path)}   (then commit the notebook)')
    return '\n'.join(lines)

def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 10, f'found only {[str(p) for p in NOTEBOOKS]} under {ROOT/"nbs"}'
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini', encoding='utf-8')
    kept = cfg['DEFAULT'].get('allowed_cell_metadata_keys', '').replace(',', ' ').split()
    assert rn.STAMP in kept, f"settings.ini must keep the stamp (allowed_cell_metadata_keys = {rn.STAMP}), else nbdev_clean strips it: {kept}"

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[str(p.relative_to(ROOT/'nbs')) for p in NOTEBOOKS])
def test_no_stale_outputs(nb):
    cells = stale(nb)
    assert not cells, report(nb, cells)

# --- the check itself ------------------------------------------------------------------------------------------------

def _fresh_notebook()->Path:
    "A committed notebook with no stale cell and at least one executed, stamped code cell that has outputs."
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text(encoding='utf-8'))
        ran = [c for c in nb['cells'] if not rn.skipped(c, FLAGS) and c.get('outputs')]
        if ran and not rn.stale_cells(nb, FLAGS): return p
    pytest.fail('no committed notebook is fully fresh (see test_no_stale_outputs); re-execute one with '
                f'{rerun_command(NOTEBOOKS[0])} so that the check can be tested on a real notebook')

def test_a_changed_code_cell_is_reported(tmp_path, capsys):
    src = _fresh_notebook()
    nb_path = tmp_path/src.name; shutil.copy(src, nb_path)
    assert stale(nb_path) == [], f'an untouched copy of {src.relative_to(ROOT)} should have no stale cell'
    assert rn.main(['--check', str(nb_path)]) == 0
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    i = next(k for k, c in enumerate(nb['cells']) if not rn.skipped(c, FLAGS) and c.get('outputs'))
    src_lines = nb['cells'][i]['source']
    nb['cells'][i]['source'] = (src_lines if isinstance(src_lines, list) else [src_lines]) + ['\nx_added_after_execution = 1']
    nb_path.write_text(json.dumps(nb, indent=1), encoding='utf-8')
    found = stale(nb_path)
    assert [(k, why) for k, _, why in found] == [(i, 'its code changed after it was executed')], found
    capsys.readouterr()
    assert rn.main(['--check', str(nb_path)]) == 1
    out = capsys.readouterr().out
    assert f'{nb_path}: cell {i} ' in out and 'its code changed after it was executed' in out, out

def _cell(kind, src, **kw):
    c = {'cell_type': kind, 'metadata': {}, 'source': src}
    if kind == 'code': c.update(outputs=[], execution_count=None)
    c.update(kw); return c

def test_unstamped_and_skipped_cells():
    "A cell never run by the tool is stale; a skipped (`#| slow`, `#| eval: false`) cell is stale only if it shows outputs of other code."
    slow_src = '#| slow\nprint(2)'
    out = [{'output_type': 'stream', 'name': 'stdout', 'text': ['2\n']}]
    nb = {'cells': [_cell('markdown', '# title'),
                    _cell('code', 'print(1)', outputs=out),                                        # 1: never stamped
                    _cell('code', slow_src),                                                       # 2: skipped, no outputs: fine
                    _cell('code', slow_src, outputs=out, metadata={rn.STAMP: {rn.SOURCE_KEY: rn.source_hash(slow_src)}}),  # 3: fine
                    _cell('code', slow_src, outputs=out, metadata={rn.STAMP: {rn.SOURCE_KEY: rn.source_hash('#| slow\nprint(3)')}}),
                    _cell('code', '#| eval: false\nimport os', outputs=out)],                      # 5: outputs of no stamped code
          'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    assert 'slow' in FLAGS, f"settings.ini's tst_flags should list slow: {FLAGS}"
    assert [(i, why) for i, _, why in rn.stale_cells(nb, FLAGS)] == [
        (1, 'it was never executed by tools/run_notebook.py'),
        (4, 'its committed outputs come from another version of its code'),
        (5, 'its committed outputs come from another version of its code')]

def test_executing_stamps_and_clean_keeps_the_stamp(tmp_path):
    "tools/run_notebook.py executes in place, stamps each executed cell, and nbdev_clean (run by it) keeps the stamp."
    nb = {'cells': [_cell('markdown', '# a tiny notebook'), _cell('code', 'x = 6 * 7\nprint(x)'),
                    _cell('code', '#| slow\nraise RuntimeError("a slow cell is skipped")'), _cell('code', 'x + 1')],
          'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
          'nbformat': 4, 'nbformat_minor': 5}
    for k, c in enumerate(nb['cells']): c['id'] = f'cell{k}'
    path = tmp_path/'tiny.ipynb'; path.write_text(json.dumps(nb), encoding='utf-8')
    assert [i for i, _, _ in stale(path)] == [1, 3]  # not executed yet
    rn.execute(path, FLAGS, timeout=120)
    done = json.loads(path.read_text(encoding='utf-8'))
    cells = done['cells']
    assert ''.join(cells[1]['outputs'][0]['text']) == '42\n', cells[1]['outputs']
    assert cells[3]['outputs'][0]['data']['text/plain'] in ('43', ['43']), cells[3]['outputs']
    assert cells[1]['metadata'] == {rn.STAMP: {rn.SOURCE_KEY: rn.source_hash('x = 6 * 7\nprint(x)')}}, cells[1]['metadata']
    assert cells[2]['outputs'] == [] and rn.STAMP not in cells[2]['metadata'], cells[2]
    assert stale(path) == []
    changed = copy.deepcopy(done); changed['cells'][3]['source'] = 'x + 2'
    assert [(i, why) for i, _, why in rn.stale_cells(changed, FLAGS)] == [(3, 'its code changed after it was executed')]
