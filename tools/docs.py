"""Build the documentation site from the notebooks, offline and without Quarto (see nbs/15_docs.ipynb).

    .venv/bin/python tools/docs.py build [--site _site] [--work .docs-build]   # what `make docs` runs
    .venv/bin/python tools/docs.py process [--work DIR]                        # step 1 alone (the nbdev test)

1. **process**: nbdev's own notebook processing (`FilterDefaults`, run as `nbdev_proc_nbs` runs it, in worker
   processes) over every notebook that nbdev globs in nbs/, with no Quarto install and no pip install.
   Outputs are the committed ones: nothing is re-executed except the cells nbdev itself runs for `show_doc`.
2. **convert**: nbdev's output is Quarto-flavoured; rewrite it for MkDocs (`#|` directives, `show_doc` cells
   turned into Markdown, Pandoc attributes on links, front matter into a title, absolute links made relative,
   widget outputs dropped), and write an API reference page per module.
3. **mkdocs**: MkDocs Material + mkdocs-jupyter, from `.venv-docs` (`make docs-env`), config docs/mkdocs.yml.

This script runs in `.venv` (it needs nbdev and the package); only step 3 runs in `.venv-docs`.
"""
import argparse, hashlib, inspect, json, os, posixpath, re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT/'docs'
MKDOCS = ROOT/'.venv-docs'/'bin'/'mkdocs'
WIDGET_MIMES = ('application/vnd.jupyter.widget-view+json', 'application/vnd.jupyter.widget-state+json')
SCRIPT_MIMES = ('application/javascript', 'text/javascript', 'application/vnd.holoviews_load.v0+json')

# ------------------------------------------------------------------ 1. nbdev's processing

def notebooks():
    "Every notebook nbdev documents (nbs/ and its sub-folders, skipping names that start with `_` or `.`), as paths."
    from nbdev.doclinks import nbglob
    from nbdev.config import get_config
    nbs = get_config().nbs_path
    return nbs, sorted(Path(p) for p in nbglob(nbs))

def _cache_key(nb:Path)->str:
    "Processing output depends on the notebook, the package (show_doc) and nbdev: hash all three."
    import nbdev
    h = hashlib.sha256(nb.read_bytes())
    for p in sorted((ROOT/'ds2net').rglob('*.py')): h.update(p.read_bytes())
    h.update(nbdev.__version__.encode() + (ROOT/'settings.ini').read_bytes())
    return h.hexdigest()

def _proc_one(job):
    "Worker: nbdev's `serve_drv.main` (what `nbdev_proc_nbs` runs per notebook); returns (error text or None, mixed cells)."
    src, dst = job
    import warnings
    from nbdev.processors import FilterDefaults
    import nbdev.serve_drv
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter('always')
            nbdev.serve_drv.main((Path(src), Path(dst), FilterDefaults))
        mixed = [str(w.message).split('---')[1].strip() for w in ws if 'containing imports and other code' in str(w.message)]
        return None, mixed
    except BaseException as e:
        os.environ.pop('IN_TEST', None)
        cause = e.__cause__ or e
        return f'{type(e).__name__}: {e}\n  caused by {type(cause).__name__}: {cause}', []

def process(work:Path, n_workers:int=2, quiet=False, verbose=False)->dict:
    "Run nbdev's processing over every notebook into work/proc; returns {notebook: error text or None}."
    nbs, nb_paths = notebooks()
    proc = work/'proc'; proc.mkdir(parents=True, exist_ok=True)
    keys_file = proc/'.keys.json'
    keys = json.loads(keys_file.read_text()) if keys_file.exists() else {}
    jobs, new_keys = [], {}
    for nb in nb_paths:
        rel = nb.relative_to(nbs).as_posix(); dst = proc/rel
        new_keys[rel] = _cache_key(nb)
        if keys.get(rel) != new_keys[rel] or not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True); jobs.append((str(nb), str(dst)))
    results = {}
    if jobs:
        t = time.time()
        n = max(1, min(n_workers, len(jobs)))
        groups = [jobs[i::n] for i in range(n)]      # one worker process per group: torch and fastai load once each
        procs = []
        for i, g in enumerate(groups):
            jf = work/f'jobs-{i}.json'; jf.write_text(json.dumps(g))
            procs.append((jf, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), '_worker', '--work', str(jf)], cwd=ROOT)))
        outs = {}
        for jf, p in procs:
            p.wait()
            rf = jf.with_suffix('.out.json')
            got = json.loads(rf.read_text()) if rf.exists() else {}
            for src, dst in json.loads(jf.read_text()):
                outs[src] = got.get(src, (f'the worker process died (exit {p.returncode})', []))
            jf.unlink(); rf.unlink(missing_ok=True)
        for src, dst in jobs:
            err, mixed = outs[src]
            rel = Path(src).relative_to(nbs).as_posix()
            results[rel] = err
            if err: new_keys.pop(rel, None); Path(dst).unlink(missing_ok=True)
            for m in mixed:
                if verbose: print(f'note: {rel} has a cell that mixes imports and other code:\n    ' + m.replace('\n', '\n    '))
        if not quiet: print(f'processed {len(jobs)} notebook(s) with nbdev in {time.time() - t:.1f} s')
    keys_file.write_text(json.dumps({k: v for k, v in new_keys.items()}, indent=1))
    for nb in nb_paths: results.setdefault(nb.relative_to(nbs).as_posix(), None)
    return results

# ------------------------------------------------------------------ 2. conversion for MkDocs

_re_directive = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_re_pandoc_attr = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*\}')    # [source](url){target="_blank" ...}
_re_hr_first = re.compile(r'\A\s*---\s*\n')
_re_source_first = re.compile(r'\A\s*(\[source\]\([^)\s]*\))\s*\n+(#+ [^\n]*\n)')

def show_doc_markdown(md:str)->str:
    "nbdev's show_doc Markdown, for MkDocs: no leading rule, and the source link under the heading (Quarto floats it right)."
    md = _re_pandoc_attr.sub(r'\1', _re_hr_first.sub('', md))
    return _re_source_first.sub(lambda m: f'{m.group(2)}\n<small>{m.group(1)}</small>\n', md)

def page_name(rel:str, frontmatter:dict)->str:
    "Where a notebook's page lives: Quarto's output-file, else nbdev's rule (number prefix dropped), as .ipynb."
    from nbdev.doclinks import _nbpath2html
    p = Path(rel)
    out = frontmatter.get('output-file')
    html = p.with_name(out) if out else _nbpath2html(p)
    return html.with_suffix('.ipynb').as_posix()

def _site_prefix(cfg)->str: return cfg.doc_host.rstrip('/') + '/' + cfg.doc_baseurl.strip('/') + '/'

def relative_links(md:str, page:str, prefix:str, resolve=None)->str:
    """Links absolute to the configured site (`https://host/baseurl/x.html#a`) made relative to `page` (e.g.
    `tutorials/y.html`). `resolve(path, fragment)` may redirect a target (to its API reference entry) or return
    None to drop the link and keep its text (nbdev links every known name, private ones too, whether or not
    the page documents it)."""
    here = posixpath.dirname(page)
    def target(url):
        path, _, frag = url[len(prefix):].partition('#')
        path = path or 'index.html'
        if resolve: 
            path_frag = resolve(path, frag)
            if path_frag is None: return None
            path, frag = path_frag
        return posixpath.relpath(path, here or '.') + ('#' + frag if frag else '')
    def sub_md(m):
        t = target(m.group(2))
        return m.group(1) if t is None else f'[{m.group(1)}]({t})'
    md = re.sub(r'\[([^\]\n]*)\]\((' + re.escape(prefix) + r'[^)\s]*)\)', sub_md, md)
    def sub_bare(m):
        t = target(m.group(0))
        return m.group(0) if t is None else t
    return re.sub(re.escape(prefix) + r'[^)\s"\'>]*', sub_bare, md)

def clean_markdown(md:str, page:str, prefix:str, resolve=None)->str:
    md = _re_pandoc_attr.sub(r'\1', md)
    return relative_links(md, page, prefix, resolve)

def _src(cell): s = cell.get('source', ''); return ''.join(s) if isinstance(s, list) else s

def _split_directives(src:str):
    "Quarto/nbdev `#|` lines at the top of a code cell, and the code after them."
    lines, d = src.splitlines(), {}
    while lines and _re_directive.match(lines[0]):
        k, v = _re_directive.match(lines.pop(0)).groups(); d[k] = v
    return d, '\n'.join(lines)

_re_warning = re.compile(r'^\S.*:\d+: \w*Warning: ', re.M)

def _clean_outputs(outputs):
    "Drop widget views (keeping a static image if the output carries one), script outputs and Python warnings on stderr."
    res = []
    for o in outputs:
        if o.get('output_type') == 'stream' and o.get('name') == 'stderr' and _re_warning.search(''.join(o.get('text', ''))):
            continue      # e.g. torch's FutureWarning while fastai is imported: noise for a reader
        data = o.get('data')
        if data is not None:
            has_widget = any(m in data for m in WIDGET_MIMES)
            data = {k: v for k, v in data.items() if k not in WIDGET_MIMES + SCRIPT_MIMES}
            if has_widget: data = {k: v for k, v in data.items() if k.startswith('image/')}   # a static picture or nothing
            if not data: continue
            o = {**o, 'data': data}
        res.append(o)
    return res

def _md_cell(text): return {'cell_type': 'markdown', 'metadata': {}, 'source': text}

def convert_notebook(nb:dict, rel:str, page:str, cfg, resolve=None)->dict:
    "nbdev's processed notebook -> a notebook mkdocs-jupyter renders as intended."
    prefix = _site_prefix(cfg)
    cells, out = nb['cells'], []
    fm = {}
    if cells and cells[0]['cell_type'] == 'raw' and _src(cells[0]).strip().startswith('---'):
        import yaml
        fm = yaml.safe_load(_src(cells[0]).strip().strip('-')) or {}
        cells = cells[1:]
    title = fm.get('title') or Path(page).stem.replace('_', ' ').capitalize()
    src_url = f"{cfg.git_url}/blob/{cfg.branch}/{cfg.nbs_path.name}/{rel}"
    head = f'# {title}\n\n' + (f"> {fm['description']}\n\n" if fm.get('description') else '') + \
           f'<small>Source: [`{cfg.nbs_path.name}/{rel}`]({src_url})</small>'
    out.append(_md_cell(head))
    for c in cells:
        src = _src(c)
        if c['cell_type'] == 'markdown':
            if 'THIS FILE WAS AUTOGENERATED' in src and src.strip().startswith('<!--'): continue
            if src.strip(): out.append({**c, 'source': clean_markdown(src, page, prefix, resolve)})
            continue
        if c['cell_type'] != 'code': continue
        d, code = _split_directives(src)
        outputs = _clean_outputs(c.get('outputs', []))
        if d.get('echo') == 'false' or d.get('output') == 'asis':
            mds = [''.join(o['data']['text/markdown']) for o in outputs if 'text/markdown' in o.get('data', {})]
            if mds:       # show_doc: its Markdown becomes the page's own, so headings reach the TOC and anchors
                for m in mds: out.append(_md_cell(clean_markdown(show_doc_markdown(m), page, prefix, resolve)))
                continue
            if d.get('echo') == 'false':
                if outputs: out.append({**c, 'source': '', 'outputs': outputs, 'metadata': {'tags': ['remove_input']}})
                continue
        if not code.strip() and not outputs: continue
        for o in outputs:
            if 'text/markdown' in o.get('data', {}):
                o['data']['text/markdown'] = clean_markdown(''.join(o['data']['text/markdown']), page, prefix, resolve)
        out.append({**c, 'source': code, 'outputs': outputs, 'metadata': {k: v for k, v in c.get('metadata', {}).items() if k == 'tags'}})
    meta = {k: v for k, v in nb.get('metadata', {}).items() if k in ('kernelspec', 'language_info')}
    return {'cells': out, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}, title

# ------------------------------------------------------------------ API reference pages

def _anchor(name): return name.lower()

def _doc_anchors(nb:dict)->set:
    "The anchors of the names a processed notebook documents: the headings of its show_doc outputs."
    res = set()
    for c in nb['cells']:
        for o in c.get('outputs', []):
            md = o.get('data', {}).get('text/markdown')
            if md: res |= {_anchor(h) for h in re.findall(r'^#+\s+(\S+)\s*$', ''.join(md), re.M)}
    return {a for a in res if re.fullmatch(r'[\w-]+', a)}   # nbconvert's heading ids drop dots: `Class.method` has none

def _ref_entry(obj, name:str, chapter_link:str|None, level:int=2)->str:
    "One exported name: heading (nbdev's anchor), source link, signature with docments, docstring, parameter table."
    from fastcore.docments import MarkdownRenderer, DocmentTbl
    from nbdev.doclinks import NbdevLookup
    h = '#' * level
    parts = [f'{h} {name} {{#{_anchor(name)}}}']
    links = []
    if chapter_link: links.append(f'[explained in its chapter]({chapter_link})')
    try: src = NbdevLookup().code(obj)
    except Exception: src = None
    if src: links.append(f'[source]({src})')
    if links: parts.append('<small>' + ' · '.join(links) + '</small>')
    if callable(obj):
        try: parts.append(MarkdownRenderer(obj, name=name)._repr_markdown_())
        except Exception: parts.append(f'```python\n{name}\n```')
        try:
            tbl = DocmentTbl(obj)._repr_markdown_()
            if tbl: parts.append(tbl)
        except Exception: pass
    else:
        parts.append(f'```python\n{name} = {obj!r}\n```')
    return '\n\n'.join(parts)

def _methods(cls):
    "Public methods a class defines itself (not inherited), in source order."
    return [(k, v) for k, v in vars(cls).items() if not k.startswith('_') and (inspect.isfunction(v) or isinstance(v, property))]

def reference_pages(cfg, chapters:dict)->tuple:
    """({page path: markdown}, {(chapter page, anchor): reference page#anchor}, number of entries): one API
    reference page per module, plus an index. `chapters` maps each chapter page to the anchors it documents."""
    import importlib, pkgutil
    from nbdev.doclinks import NbdevLookup
    import ds2net
    modidx = importlib.import_module('ds2net._modidx').d['syms']
    pages, rows, index = {}, [], {}
    mods = sorted(m.name for m in pkgutil.walk_packages(ds2net.__path__, 'ds2net.') if not m.name.split('.')[-1].startswith('_'))
    for modname in mods:
        mod = importlib.import_module(modname)
        names = list(getattr(mod, '__all__', []))
        own = [n for n in names if hasattr(mod, n)]
        if modname == 'ds2net.data': continue          # the package only re-exports its three modules
        short = modname.split('.', 1)[1]
        page = f'api/{short}.md'
        nb_src = (modidx.get(modname) or {})
        body = [f'# {modname}', '']
        doc = (mod.__doc__ or '').strip()
        if doc: body += [f'> {doc}', '']
        chapter = next((v[0].split('#')[0] for v in nb_src.values()), None)
        if chapter: body += [f'The chapter [{chapter.removesuffix(".html")}](../{chapter}) explains this module with examples and figures. '
                             f'Source: [`{modname.replace(".", "/")}.py`]({cfg.git_url}/blob/{cfg.branch}/{modname.replace(".", "/")}.py).', '']
        n_entries = 0
        def add(obj, name, level):
            loc = nb_src.get(f'{modname}.{name}')
            link = None
            if loc:
                cpage, _, anchor = loc[0].partition('#')
                if cpage in chapters: link = f'../{cpage}' + (f'#{anchor}' if anchor in chapters[cpage] else '')
                index[(cpage, _anchor(name))] = f'{page[:-3]}.html#{_anchor(name)}'
            body.append(_ref_entry(obj, name, link, level))
        for n in own:
            obj = getattr(mod, n)
            add(obj, n, 2); n_entries += 1
            if inspect.isclass(obj):
                for mn, mv in _methods(obj): add(getattr(obj, mn), f'{n}.{mn}', 3); n_entries += 1
        pages[page] = '\n\n'.join(body) + '\n'
        rows.append((modname, page, doc, len(own), n_entries))
    idx = ['# API reference', '',
           'Every name each module exports (`__all__`), with its signature, the table of its parameters (from the',
           'comments beside them: fastcore\'s docments) and its docstring. Each entry links to the chapter that explains',
           'it and to its source.', '', '| module | names | what it is |', '|---|---|---|']
    idx += [f'| [`{m}`]({Path(p).name}) | {k} | {d} |' for m, p, d, k, _ in rows]
    pages['api/index.md'] = '\n'.join(idx) + '\n'
    return pages, index, sum(r[4] for r in rows)

# ------------------------------------------------------------------ 3. the site

def _nav_title(t): return str(t).replace('"', "'")

def write_pages(work:Path)->tuple:
    "Convert every processed notebook into work/pages, add the reference pages and docs/ pages; returns (nav, counts)."
    import yaml
    from nbdev.config import get_config
    cfg = get_config()
    nbs, nb_paths = notebooks()
    pages = work/'pages'
    if pages.exists(): shutil.rmtree(pages)
    pages.mkdir(parents=True)
    loaded = []
    for nb in nb_paths:            # pass 1: page names, and the names each page documents (its show_doc headings)
        rel = nb.relative_to(nbs).as_posix()
        pnb = json.loads((work/'proc'/rel).read_text(encoding='utf-8'))
        fm = {}
        if pnb['cells'] and pnb['cells'][0]['cell_type'] == 'raw': fm = yaml.safe_load(_src(pnb['cells'][0]).strip().strip('-')) or {}
        loaded.append((rel, page_name(rel, fm), pnb))
    chapters = {page.replace('.ipynb', '.html'): _doc_anchors(pnb) for _, page, pnb in loaded}
    ref, ref_index, n_ref = reference_pages(cfg, chapters)
    for p, md in ref.items():
        (pages/p).parent.mkdir(parents=True, exist_ok=True); (pages/p).write_text(md, encoding='utf-8')
    def resolve(path, frag):
        "A link into the site: kept if its page documents the name, else sent to the API reference, else dropped."
        if not frag or path not in chapters or frag in chapters[path]: return path, frag
        if (path, frag) in ref_index: return tuple(ref_index[(path, frag)].split('#', 1))
        return None
    entries = []
    for rel, page, pnb in loaded:  # pass 2: convert
        conv, title = convert_notebook(pnb, rel, page.replace('.ipynb', '.html'), cfg, resolve)
        (pages/page).parent.mkdir(parents=True, exist_ok=True)
        (pages/page).write_text(json.dumps(conv, indent=1, ensure_ascii=False), encoding='utf-8')
        entries.append((rel, page, title))
    for p in sorted((DOCS/'pages').rglob('*')) if (DOCS/'pages').exists() else []:
        if p.is_file(): d = pages/p.relative_to(DOCS/'pages'); d.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(p, d)
    copy_mathjax(pages/'assets'/'mathjax')
    home = [p for r, p, t in entries if r == 'index.ipynb']
    tutorials = [{_nav_title(t): p} for r, p, t in entries if r.startswith('tutorials/')]
    chapters_nav = [{_nav_title(t): p} for r, p, t in entries if '/' not in r and r != 'index.ipynb']
    others = [{_nav_title(t): p} for r, p, t in entries if '/' in r and not r.startswith('tutorials/')]
    nav = [{'Home': home[0]}] if home else []
    if tutorials: nav.append({'Tutorials': tutorials})
    nav.append({'Chapters': chapters_nav + others})
    api_nav = [{'Overview': 'api/index.md'}] + [{p.removeprefix('api/').removesuffix('.md'): p} for p in ref if p != 'api/index.md']
    nav.append({'API reference': api_nav})
    return nav, dict(notebooks=len(entries), reference_pages=len(ref) - 1, reference_entries=n_ref)

def mathjax_folder(venv:Path=MKDOCS.parent.parent)->Path:
    "MathJax 2.7's files in the docs toolchain (docs/requirements-nodeps.txt: jupyter-server-mathjax, used for its files only)."
    found = sorted(venv.glob('lib/python*/site-packages/jupyter_server_mathjax/static/MathJax.js'))
    if not found: sys.exit(f'MathJax is missing from {venv}: run `make docs-env` (docs/requirements-nodeps.txt installs it)')
    return found[-1].parent

def copy_mathjax(dest:Path):
    "Put MathJax in the site (assets/mathjax/), so that formulas render with no request to a CDN (docs/hooks.py links it)."
    if not (dest/'MathJax.js').is_file(): shutil.copytree(mathjax_folder(), dest, dirs_exist_ok=True)

def mkdocs_config(work:Path, site:Path, nav)->Path:
    "A config that inherits docs/mkdocs.yml and adds the paths and the navigation of this build."
    import yaml
    from nbdev.config import get_config
    c = get_config()
    cfg = {'INHERIT': str(DOCS/'mkdocs.yml'), 'docs_dir': str(work/'pages'), 'site_dir': str(site),
           'site_name': c.title, 'site_description': c.description, 'hooks': [str(DOCS/'hooks.py')], 'nav': nav,
           'extra': {'social': [{'icon': 'fontawesome/brands/github', 'link': c.git_url, 'name': f'{c.lib_name} on GitHub'}]}}
    p = work/'mkdocs.yml'
    p.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding='utf-8')
    return p

def build(site:Path, work:Path, mkdocs:Path=MKDOCS, n_workers:int=2, keep_going=False):
    t0 = time.time()
    if not Path(mkdocs).exists(): sys.exit(f'{mkdocs} is missing: run `make docs-env` (or `make docs`), which creates .venv-docs')
    errors = {k: v for k, v in process(work, n_workers).items() if v}
    if errors:
        msg = 'nbdev could not process these notebooks:\n' + '\n'.join(f'- {k}: {v}' for k, v in errors.items())
        if not keep_going: sys.exit(msg + '\n(--keep-going renders them unprocessed, without their API docs)')
        print(msg, file=sys.stderr)
        nbs, _ = notebooks()
        for k in errors: shutil.copy2(nbs/k, work/'proc'/k)
    t1 = time.time()
    nav, counts = write_pages(work)
    conf = mkdocs_config(work, site, nav)
    t2 = time.time()
    env = {**os.environ, 'PYTHONHASHSEED': '0', 'NO_MKDOCS_2_WARNING': '1'}
    r = subprocess.run([str(mkdocs), 'build', '--clean', '-q', '-f', str(conf)], cwd=work, env=env)
    if r.returncode: sys.exit(f'mkdocs build failed (exit {r.returncode})')
    t3 = time.time()
    print(f"site in {site}: {counts['notebooks']} notebook pages, {counts['reference_pages']} API reference pages "
          f"({counts['reference_entries']} entries); nbdev {t1 - t0:.1f} s, conversion {t2 - t1:.1f} s, mkdocs {t3 - t2:.1f} s")
    return counts

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('cmd', choices=['build', 'process', '_worker'])
    ap.add_argument('--site', default=str(ROOT/'_site'), help='output folder of the site')
    ap.add_argument('--work', default=str(ROOT/'.docs-build'), help='folder for the processed notebooks (a cache)')
    ap.add_argument('--mkdocs', default=str(MKDOCS))
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--keep-going', action='store_true', help='render notebooks nbdev cannot process unprocessed, instead of failing')
    ap.add_argument('--verbose', action='store_true', help='also list cells that mix imports with other code')
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    work = Path(a.work).resolve()
    if a.cmd == '_worker':        # internal: process the notebooks listed in the JSON file --work names
        res = {src: _proc_one((src, dst)) for src, dst in json.loads(work.read_text())}
        work.with_suffix('.out.json').write_text(json.dumps(res)); return
    if a.cmd == 'process':
        errors = {k: v for k, v in process(work, a.workers, verbose=a.verbose).items() if v}
        for k, v in errors.items(): print(f'FAILED {k}: {v}')
        sys.exit(1 if errors else 0)
    build(Path(a.site).resolve(), work, Path(a.mkdocs), a.workers, a.keep_going)

if __name__ == '__main__': main()
