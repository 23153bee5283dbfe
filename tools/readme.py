"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which this project does not install).

`python tools/readme.py` writes it; `python tools/readme.py --check` exits 1 when README.md is stale.
Markdown cells are copied; code cells become ```python blocks, followed by their text output;
cells marked `#|hide` or `#| echo: false` are left out (and so are figures, with their text), and nbdev's `#|` directives are stripped."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
src, dest = root/'nbs'/'index.ipynb', root/'README.md'

def _directives(lines): return [l for l in lines if l.lstrip().startswith('#|')]

def cell_to_md(cell):
    lines = ''.join(cell['source']).splitlines()
    if cell['cell_type'] == 'markdown': return '\n'.join(lines)
    if any(d.replace(' ', '') in ('#|hide', '#|export', '#|exporti', '#|echo:false') for d in _directives(lines)): return None
    code = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip()
    if not code: return None
    parts = [f'```python\n{code}\n```']
    text = ''.join(''.join(o.get('text', '')) if o.get('output_type') == 'stream'
                   else '' if 'image/png' in o.get('data', {})  # a figure's "<Figure size ...>" text is not output
                   else ''.join(o.get('data', {}).get('text/plain', '')) for o in cell.get('outputs', []))
    if text.strip(): parts.append(f'```\n{text.rstrip()}\n```')
    return '\n\n'.join(parts)

def render():
    cells = json.loads(src.read_text(encoding='utf-8'))['cells']
    body = '\n\n'.join(md for md in map(cell_to_md, cells) if md)
    return f'<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, then run `make readme`. -->\n\n{body}\n'

if __name__ == '__main__':
    text = render()
    if '--check' in sys.argv:
        if not dest.exists() or dest.read_text(encoding='utf-8') != text:
            sys.exit('README.md is out of step with nbs/index.ipynb: run `make readme` and commit it')
        print('README.md is current')
    else: dest.write_text(text, encoding='utf-8'); print(f'wrote {dest}')
