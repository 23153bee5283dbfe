"""Every tutorial in a real JupyterLab, in headless Chromium: what a student does and sees.

One JupyterLab server for the module runs from the project's environment on 127.0.0.1 (a free port, a token,
`--allow-root` so that it also runs as root), on copies of nbs/tutorials/ (the notebooks and the files they read by
relative path, such as the ablation CSVs) in a temporary folder, so that the lab's autosave never touches `nbs/`.
Its settings are its own: notebooks attach every cell to the page (`windowingMode: none`), no news are fetched, and
the app is exposed as `window.jupyterapp` so that the test can run the lab's own commands (Run All Cells).

In each copy the cells `nbdev_test` skips (flags `tst_flags` of settings.ini, `#| gpu` and `#| slow`, and
`#| eval: false`) are turned into raw cells, so Run All runs what `make nbtest` runs; a GPU training or the
ablation's hour of training does not belong in a CPU test. Tutorial 07 loads the shared running example from the
user's cache (DS2NET_CACHE, else ~/.cache/ds2net); if it is missing, the tutorial trains it there first (about 3 min).

For each tutorial the test opens it, runs all cells, waits until every cell has run, and checks, in the lab's
notebook model and on the page: no error output, no stderr stream and no 'Warning' in any output, and every image
output loaded and visible (natural and drawn size nonzero), as many as the committed notebook has. The quick start
also gets its explorer moved: its image slider changes its figure. The kernel is shut down after each tutorial;
screenshots and the run times (jupyterlab_times.json) go to test-artifacts/. The server and its kernels are stopped by PID.
"""
import configparser, json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT/'nbs/tutorials'
NOTEBOOKS = sorted(TUTORIALS.glob('[0-9]*.ipynb'))
QUICK_START = '01_quick_start.ipynb'
RUN_TIMEOUT_S = float(os.environ.get('DS2NET_LAB_TIMEOUT', 900))  # per tutorial; the slowest takes about 2 min on 2 idle cores
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/gif', 'image/svg+xml')


def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _descendants(pid:int)->list:
    "PIDs of every process below `pid` (the kernels the server started), read from /proc."
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []): out.append(c); todo.append(c)
    return out


def _write_settings(folder:Path):
    "User settings for this lab only: every cell attached to the page, no news or update checks."
    settings = {'@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none'},
                '@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false',
                                                                                   'checkForUpdates': False}}
    for name, value in settings.items():
        path = folder/name; path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(value))


def _skip_flags()->set:
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())


def _skipped_by_nbdev_test(cell:dict, flags:set)->bool:
    "Whether `nbdev_test` leaves this code cell out: one of `flags` among its directives, or `#| eval: false`."
    from nbdev.process import extract_directives
    from fastcore.basics import AttrDict
    source = cell['source'] if isinstance(cell['source'], str) else ''.join(cell['source'])
    if 'nbdev_export'+'(' in source: return True
    directives = extract_directives(AttrDict(cell_type='code', source=source), remove=False)
    return directives.get('eval:', [''])[0].lower() == 'false' or bool(flags & directives.keys())


def _n_images(outputs:list)->int:
    return sum(any(m in o.get('data', {}) for m in IMAGE_MIMES) for o in outputs)


def lab_copy(notebook:Path, dest:Path)->dict:
    """Copy `notebook` to `dest` with the cells nbdev_test skips made raw cells (outputs gone); returns what the test
    expects of it: the number of code cells left, the images their committed outputs have, and the cells made raw."""
    nb = json.loads(notebook.read_text())
    flags, raw, n_code, n_images = _skip_flags(), [], 0, 0
    for i, cell in enumerate(nb['cells']):
        if cell['cell_type'] != 'code': continue
        if _skipped_by_nbdev_test(cell, flags):
            raw.append(i)
            nb['cells'][i] = {'cell_type': 'raw', 'id': cell.get('id', f'raw{i}'), 'metadata': {}, 'source': cell['source']}
        else: n_code += 1; n_images += _n_images(cell.get('outputs', []))
    dest.write_text(json.dumps(nb, indent=1))
    return dict(n_code=n_code, n_images=n_images, raw_cells=raw)


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "One JupyterLab server on a copy of nbs/tutorials/ for all the tutorials; yields (base url, token, work folder)."
    root = tmp_path_factory.mktemp('lab')
    work = root/'work'
    shutil.copytree(TUTORIALS, work, ignore=shutil.ignore_patterns('.ipynb_checkpoints', '__pycache__', '*.ipynb'))
    _write_settings(root/'settings')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTERLAB_SETTINGS_DIR': str(root/'settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(root/'workspaces'), 'JUPYTER_RUNTIME_DIR': str(root/'runtime'),
           'JUPYTER_CONFIG_DIR': str(root/'config'), 'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
           'HF_HUB_OFFLINE': '1'}
    log = open(root/'lab.log', 'w')
    server = subprocess.Popen([sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--allow-root', '--ip=127.0.0.1',
                               f'--port={port}', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work}',
                               '--ServerApp.open_browser=False', '--LabApp.news_url=', '--ServerApp.port_retries=0',
                               '--LabApp.expose_app_in_browser=True'],
                              cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}/'
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f'{url}api/status?token={token}', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f'JupyterLab did not start: {(root/"lab.log").read_text()[-3000:]}')
            time.sleep(0.5)
        yield url, token, work
    finally:
        pids = _descendants(server.pid)
        server.send_signal(signal.SIGTERM)
        try: server.wait(20)
        except subprocess.TimeoutExpired: server.kill(); server.wait()
        for pid in pids + _descendants(server.pid):
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        log.close()


@pytest.fixture(scope='module')
def lab_times(artifacts_dir):
    "Seconds each tutorial took from Run All to its last cell, written to test-artifacts/jupyterlab_times.json."
    times = {}
    yield times
    (artifacts_dir/'jupyterlab_times.json').write_text(json.dumps(times, indent=1))


def _shutdown_kernels(url:str, token:str):
    "Delete every session of the server (which shuts its kernel down), through the REST API."
    headers = {'Authorization': f'token {token}'}
    with urllib.request.urlopen(urllib.request.Request(f'{url}api/sessions', headers=headers), timeout=10) as r:
        sessions = json.load(r)
    for s in sessions:
        req = urllib.request.Request(f'{url}api/sessions/{s["id"]}', headers=headers, method='DELETE')
        urllib.request.urlopen(req, timeout=30).close()


PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt'))
                      .map(p => p.textContent.trim())"""

IMAGES_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img')).map(img => {
    img.scrollIntoView(); const r = img.getBoundingClientRect();
    return {rendered: !!img.closest('.jp-RenderedImage'), complete: img.complete, natural: img.naturalWidth,
            naturalHeight: img.naturalHeight, width: r.width, height: r.height,
            visible: getComputedStyle(img).visibility !== 'hidden' && getComputedStyle(img).display !== 'none'}; })"""

KERNEL_READY_JS = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.connectionStatus === 'connected' && k.status === 'idle'; }"""

STARTED_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt'))
                      .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""

ERRORS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
                   .map(o => o.textContent).filter(t => /Traceback \\(most recent call last\\)|^\\w+Error: /m.test(t))
                   .map(t => t.slice(0, 800))"""

# the outputs of each code cell as the lab's notebook model holds them (nbformat JSON)
OUTPUTS_JS = """() => window.jupyterapp.shell.currentWidget.content.widgets
                   .filter(w => w.model.type === 'code').map(w => w.model.outputs.toJSON())"""

# what the page shows as stderr, or shows with a warning's name in it
WARNINGS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
                   .filter(o => o.matches('[data-mime-type="application/vnd.jupyter.stderr"]') ||
                                /\\w*Warning\\b/.test(o.textContent))
                   .map(o => o.textContent.slice(0, 800))"""


def _wait_all_run(page, n_cells:int, timeout:float)->list:
    "Poll the cells' prompts until each shows its execution count ([12]:), not [ ]: or [*]:; returns the prompts."
    deadline, prompts = time.time() + timeout, []
    while time.time() < deadline:
        prompts = page.evaluate(PROMPTS_JS)
        if len(prompts) == n_cells and all(re.fullmatch(r'\[\d+\]:', p) for p in prompts): return prompts
        if page.evaluate(ERRORS_JS) and not any('*' in p for p in prompts): return prompts  # stopped at an error
        page.wait_for_timeout(1000)
    raise AssertionError(f'cells still not run after {timeout:.0f} s: prompts {prompts}')


def _text(output:dict)->str:
    "The text of one nbformat output: a stream's text, a result's text/plain and text/html, an error's traceback."
    def join(v): return ''.join(v) if isinstance(v, list) else str(v)
    if output.get('output_type') == 'stream': return join(output.get('text', ''))
    if output.get('output_type') == 'error': return f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get('data', {})
    return '\n'.join(join(data[m]) for m in ('text/plain', 'text/html', 'text/markdown') if m in data)


def problems(outputs:list)->dict:
    "Per code cell (numbered from 0), its error outputs and its warnings (a stderr stream, or 'Warning' in any text)."
    errors, warnings = [], []
    for i, cell in enumerate(outputs):
        for o in cell:
            text = _text(o)
            if o.get('output_type') == 'error': errors.append((i, text[:800]))
            elif (o.get('output_type') == 'stream' and o.get('name') == 'stderr') or re.search(r'\w*Warning\b', text):
                warnings.append((i, text[:800]))
    return dict(errors=errors, warnings=warnings)


def _check_explorer(page, artifacts_dir):
    "The quick start's explorer: its widgets are on the page, and moving the image slider redraws the figure."
    explorer = page.locator('.jp-OutputArea-output .widget-vbox').last
    explorer.scroll_into_view_if_needed()
    slider = explorer.locator('.widget-hslider', has=page.locator('.widget-label', has_text='image'))
    assert slider.count() == 1 and explorer.locator('.widget-dropdown select').count() == 1
    figure = explorer.locator('img.widget-image')
    before = figure.get_attribute('src')
    assert figure.evaluate('img => img.naturalWidth') > 0
    readout = slider.locator('.widget-readout')
    assert readout.text_content().strip() == '0'
    handle = slider.locator('.noUi-handle')
    handle.focus()
    page.keyboard.press('ArrowRight')  # image 0 -> image 1
    page.wait_for_function("([el, src]) => el.getAttribute('src') !== src && el.naturalWidth > 0",
                           arg=[figure.element_handle(), before], timeout=60_000)
    assert readout.text_content().strip() == '1'
    explorer.screenshot(path=str(artifacts_dir/'jupyterlab_explorer_image1.png'))


def test_problems_reads_errors_and_warnings_from_outputs():
    "The checker itself, on outputs of known kinds: a stderr stream and a warning in a result count, progress HTML does not."
    outputs = [[{'output_type': 'stream', 'name': 'stdout', 'text': ['epoch 0 loss 0.5\n']}],
               [{'output_type': 'stream', 'name': 'stderr', 'text': ['\n']}],
               [{'output_type': 'display_data', 'data': {'text/plain': ['<Figure>'], 'image/png': 'iVBOR'}}],
               [{'output_type': 'execute_result', 'data': {'text/plain': ["UserWarning: 'x' is deprecated"]}}],
               [{'output_type': 'error', 'ename': 'ValueError', 'evalue': 'bad size', 'traceback': []}],
               [{'output_type': 'display_data', 'data': {'text/html': ['<progress value="3" max="3"></progress>']}}]]
    assert problems(outputs) == dict(errors=[(4, 'ValueError: bad size')],
                                     warnings=[(1, '\n'), (3, "UserWarning: 'x' is deprecated")])
    assert _n_images([o for cell in outputs for o in cell]) == 1


def test_lab_copy_makes_the_cells_nbdev_test_skips_raw(tmp_path):
    "A notebook with a `#| gpu`, a `#|slow` and an `#| eval: false` cell: three raw cells, one code cell left."
    cells = [{'cell_type': 'markdown', 'id': 'm', 'metadata': {}, 'source': '# T'},
             {'cell_type': 'code', 'id': 'a', 'metadata': {}, 'execution_count': 1, 'source': 'x = 1',
              'outputs': [{'output_type': 'display_data', 'data': {'image/png': 'iVBOR'}, 'metadata': {}}]},
             {'cell_type': 'code', 'id': 'b', 'metadata': {}, 'execution_count': 2, 'source': '#| gpu\ntrain()', 'outputs': []},
             {'cell_type': 'code', 'id': 'c', 'metadata': {}, 'execution_count': 3, 'source': ['#|slow\n', 'ablate()'],
              'outputs': [{'output_type': 'display_data', 'data': {'image/png': 'iVBOR'}, 'metadata': {}}]},
             {'cell_type': 'code', 'id': 'd', 'metadata': {}, 'execution_count': 4, 'source': '#| eval: false\n1/0', 'outputs': []}]
    src = tmp_path/'t.ipynb'
    src.write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    assert lab_copy(src, tmp_path/'copy.ipynb') == dict(n_code=1, n_images=1, raw_cells=[2, 3, 4])
    copy = json.loads((tmp_path/'copy.ipynb').read_text())['cells']
    assert [c['cell_type'] for c in copy] == ['markdown', 'code', 'raw', 'raw', 'raw']
    assert [c['id'] for c in copy] == ['m', 'a', 'b', 'c', 'd'] and copy[3]['source'] == ['#|slow\n', 'ablate()']


@pytest.mark.browser
@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_in_jupyterlab_without_errors_or_warnings(lab, page, artifacts_dir, lab_times, notebook):
    url, token, work = lab
    expected = lab_copy(notebook, work/notebook.name)
    page.set_default_timeout(60_000)
    try:
        page.goto(f'{url}lab/tree/{notebook.name}?reset&token={token}')
        page.locator('.jp-Notebook .jp-CodeCell').first.wait_for()
        page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for()
        page.wait_for_function(KERNEL_READY_JS, timeout=120_000)  # the notebook's kernel is connected and idle
        page.locator('.jp-Notebook').first.click()
        t0 = time.time()
        # Run > Run All Cells, through the lab's command registry (the command the menu item runs); not awaited,
        # since its promise settles only when the last cell has run
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        page.wait_for_function(STARTED_JS, timeout=60_000)
        prompts = _wait_all_run(page, expected['n_code'], RUN_TIMEOUT_S)
        lab_times[notebook.stem] = round(time.time() - t0, 1)
        page.screenshot(path=str(artifacts_dir/f'jupyterlab_{notebook.stem}.png'), full_page=True)

        found = problems(page.evaluate(OUTPUTS_JS))
        errors = found['errors'] + page.evaluate(ERRORS_JS)
        assert not errors, f'{notebook.name}: error output (code cell number, text): {errors}'
        assert len(prompts) == expected['n_code'] and \
            sorted(int(p[1:-2]) for p in prompts) == list(range(1, expected['n_code'] + 1)), prompts
        warnings = found['warnings'] + page.evaluate(WARNINGS_JS)
        assert not warnings, f'{notebook.name}: warning or stderr output (code cell number, text): {warnings}'
        print(f'{notebook.name} ran in JupyterLab in {lab_times[notebook.stem]:.0f} s')

        images = [im for im in page.evaluate(IMAGES_JS) if im['rendered']]  # image outputs, not the widgets' own images
        assert len(images) == expected['n_images'], \
            f"{notebook.name}: {len(images)} figures on the page, the committed notebook has {expected['n_images']}"
        for k, im in enumerate(images):
            assert im['complete'] and im['natural'] > 0 and im['naturalHeight'] > 0 and im['width'] > 0 \
                and im['height'] > 0 and im['visible'], f'{notebook.name}: figure {k} not visible: {im}'
        if notebook.name == QUICK_START: _check_explorer(page, artifacts_dir)
    finally:
        _shutdown_kernels(url, token)
