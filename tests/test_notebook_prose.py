"""The notebooks are the chapters a student reads: their prose may not point at documents the reader does not have.

A chapter cites the paper (Huang et al., "DS2Net...", arXiv 2508.04131) or explains in place; it never says "spec
section 2", "the issue asks..." or "the issue's target". One test case per notebook, markdown cells only (code and
its output may name whatever they need), failing with the notebook, the cell and each offending sentence."""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb')
                   if not any(part.startswith(('.', '_')) for part in p.relative_to(ROOT/'nbs').parts))
FORBIDDEN = re.compile(r'\b(spec|specs|specification|issue|issues)\b', re.IGNORECASE)

def sentences(text:str)->list:
    "The sentences of a markdown text, whitespace collapsed (a blank line or a list item also ends one)."
    parts = re.split(r'\n\s*\n|\n\s*[-*]\s+|(?<=[.!?:])\s+(?=[A-Z`*(\[])', text)
    return [' '.join(p.split()) for p in parts if p.strip()]

def offending_sentences(nb:Path)->list:
    "`(cell number, sentence)` for every markdown sentence of `nb` that mentions a spec or an issue."
    found = []
    for i, cell in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
        if cell['cell_type'] != 'markdown': continue
        text = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        found += [(i, s) for s in sentences(text) if FORBIDDEN.search(s)]
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
