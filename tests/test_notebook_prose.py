"""The notebooks are the chapters a student reads: their prose may not point at documents the reader does not have.

A chapter cites the paper (Huang et al., "DS2Net...", arXiv 2508.04131) or explains in place; it never says "spec
section 2", "the issue asks..." or "the issue's target". One test case per notebook, markdown cells only (code and
its output may name whatever they need), failing with the notebook, the cell and each offending sentence.

The same holds for the wrong citation ("Zhu et al.") and for sentences about the sessions or machines the book was
written on: the reader has their own. And every chapter and tutorial (not the overview, index.ipynb) ends as
fastbook's and d2l's chapters do: a `## Summary`, then `## Exercises` with 3 to 5 numbered exercises, nothing after."""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb')
                   if not any(part.startswith(('.', '_')) for part in p.relative_to(ROOT/'nbs').parts))
FORBIDDEN = re.compile(r'\b(spec|specs|specification|issue|issues)\b', re.IGNORECASE)
WRONG_CITATION = re.compile(r'\bZhu et al\b')
ENVIRONMENT = re.compile(r'\b(previous|earlier|last|this|another) session\b|\bmachines? this project\b|'
                         r'\bquoted in the docs\b', re.IGNORECASE)
CHAPTERS = [p for p in NOTEBOOKS if p.name != 'index.ipynb']

def sentences(text:str)->list:
    "The sentences of a markdown text, whitespace collapsed (a blank line or a list item also ends one)."
    parts = re.split(r'\n\s*\n|\n\s*[-*]\s+|(?<=[.!?:])\s+(?=[A-Z`*(\[])', text)
    return [' '.join(p.split()) for p in parts if p.strip()]

def offending_sentences(nb:Path, pattern=FORBIDDEN)->list:
    "`(cell number, sentence)` for every markdown sentence of `nb` that matches `pattern` (by default: a spec or an issue)."
    found = []
    for i, cell in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
        if cell['cell_type'] != 'markdown': continue
        text = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        found += [(i, s) for s in sentences(text) if pattern.search(s)]
    return found

def test_the_check_finds_what_it_should(tmp_path):
    "The check flags 'spec'/'issue' words in markdown, whatever their case, and ignores code cells and longer words."
    cell = lambda kind, src: {'cell_type': kind, 'metadata': {}, 'source': src, **({'outputs': [], 'execution_count': None} if kind == 'code' else {})}
    nb = tmp_path/'x.ipynb'
    nb.write_text(json.dumps({'cells': [
        cell('markdown', 'Defaults follow the recipe (spec section 5). The paper says so.'),
        cell('markdown', ['The Issue asks for 20 s.\n', 'Specific heat and special cases are fine; so is tissue.']),
        cell('code', '# the spec says\nx = 1'),
    ], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    assert offending_sentences(nb) == [(0, 'Defaults follow the recipe (spec section 5).'), (1, 'The Issue asks for 20 s.')]

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.relative_to(ROOT/'nbs').as_posix() for p in NOTEBOOKS])
def test_prose_cites_the_paper_not_a_spec_or_an_issue(nb):
    found = offending_sentences(nb)
    assert not found, (f"{nb.relative_to(ROOT)} refers readers to a spec or an issue they do not have; cite the paper "
                       f"(Huang et al., arXiv 2508.04131) or explain in place:\n"
                       + '\n'.join(f"  markdown cell {i}: {s}" for i, s in found))

def test_the_citation_and_environment_checks_find_what_they_should(tmp_path):
    nb = tmp_path/'x.ipynb'
    nb.write_text(json.dumps({'cells': [{'cell_type': 'markdown', 'metadata': {}, 'source':
        'As Zhu et al. show, it works. Huang et al. (arXiv 2508.04131) report it. In the previous session it took 3 s. '
        'A JupyterLab session is fine. On the machines this project runs on it is fast.'}],
        'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    assert offending_sentences(nb, WRONG_CITATION) == [(0, 'As Zhu et al. show, it works.')]
    assert offending_sentences(nb, ENVIRONMENT) == [(0, 'In the previous session it took 3 s.'),
                                                    (0, 'On the machines this project runs on it is fast.')]

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.relative_to(ROOT/'nbs').as_posix() for p in NOTEBOOKS])
def test_prose_cites_huang_and_speaks_to_the_reader(nb):
    found = [('cites "Zhu et al."; the paper is Huang et al., arXiv 2508.04131', c, s) for c, s in offending_sentences(nb, WRONG_CITATION)]
    found += [('speaks of where the book was written, not to the reader', c, s) for c, s in offending_sentences(nb, ENVIRONMENT)]
    assert not found, f"{nb.relative_to(ROOT)}:\n" + '\n'.join(f"  markdown cell {c} {why}: {s}" for why, c, s in found)

def ending_problems(nb:Path)->list:
    "What is wrong with the end of `nb`: [] when it ends with a Summary, then Exercises numbered 1 to 3..5, all markdown."
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    text = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    starts = [i for i, c in enumerate(cells) if c['cell_type'] == 'markdown' and re.match(r'## Summary\b', text(c))]
    if not starts: return ['no markdown cell starts with "## Summary"']
    tail = cells[starts[-1]:]
    problems = [f'cell {starts[-1] + k} after the summary is {c["cell_type"]}, not markdown'
                for k, c in enumerate(tail) if c['cell_type'] != 'markdown']
    rest = '\n'.join(text(c) for c in tail)
    exercises = re.split(r'^## Exercises\b.*$', rest, maxsplit=1, flags=re.M)
    if len(exercises) < 2: return problems + ['no "## Exercises" heading after the summary']
    numbers = [int(n) for n in re.findall(r'^(\d+)\. ', exercises[1], re.M)]
    if numbers != list(range(1, len(numbers) + 1)) or not 3 <= len(numbers) <= 5:
        problems.append(f'the exercises are numbered {numbers}, not 1 to 3, 4 or 5')
    return problems

def test_the_ending_check_finds_what_it_should(tmp_path):
    md = lambda src: {'cell_type': 'markdown', 'metadata': {}, 'source': src}
    code = {'cell_type': 'code', 'metadata': {}, 'source': 'x = 1', 'outputs': [], 'execution_count': None}
    def check(*cells):
        nb = tmp_path/'x.ipynb'
        nb.write_text(json.dumps({'cells': list(cells), 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
        return ending_problems(nb)
    good = ('## Summary\n\n- one\n', '## Exercises\n\n1. a\n2. b\n   more of b\n3. c\n')
    assert check(code, md(good[0]), md(good[1])) == []
    assert check(code, md(good[0] + '\n' + good[1])) == []                       # one cell holding both
    assert check(code, md(good[1])) == ['no markdown cell starts with "## Summary"']
    assert check(md(good[0]), code, md(good[1])) == ['cell 1 after the summary is code, not markdown']
    assert check(md(good[0])) == ['no "## Exercises" heading after the summary']
    assert check(md(good[0]), md('## Exercises\n\n1. a\n2. b\n')) == ['the exercises are numbered [1, 2], not 1 to 3, 4 or 5']
    assert check(md(good[0]), md('## Exercises\n\n1. a\n3. b\n4. c\n')) == ['the exercises are numbered [1, 3, 4], not 1 to 3, 4 or 5']

@pytest.mark.parametrize('nb', CHAPTERS, ids=[p.relative_to(ROOT/'nbs').as_posix() for p in CHAPTERS])
def test_every_chapter_ends_with_a_summary_and_exercises(nb):
    problems = ending_problems(nb)
    assert not problems, f"{nb.relative_to(ROOT)} does not end with a summary and 3-5 exercises:\n  " + '\n  '.join(problems)
