"""The quick-start tutorial and its explorer in a real JupyterLab, in headless Chromium: what a student does and sees.

JupyterLab runs from the project's environment on 127.0.0.1 (a free port, a token, `--allow-root` so that it
also runs as root), on a copy of the notebook in a temporary folder (so the lab's autosave never touches `nbs/`),
with its own settings: notebooks attach every cell to the page (`windowingMode: none`), no news are fetched, and
the app is exposed as `window.jupyterapp` so that the test can run the lab's own commands (Run All Cells).
The test opens the notebook, runs all cells, waits until every cell has run, and checks: no error output, every
image output loaded and visible, the explorer on the page, and moving its image slider changes its figure.
Screenshots go to test-artifacts/. The server and its kernels are stopped by PID.
"""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT/'nbs/tutorials/01_quick_start.ipynb'
RUN_TIMEOUT_S = float(os.environ.get('DS2NET_LAB_TIMEOUT', 540))  # the quick start takes about 2 min on 2 idle cores

pytestmark = pytest.mark.browser


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


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a copy of the quick-start notebook; yields (base url, token, work folder)."
    work = tmp_path/'work'; work.mkdir()
    shutil.copy(NOTEBOOK, work/NOTEBOOK.name)
    _write_settings(tmp_path/'settings')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTERLAB_SETTINGS_DIR': str(tmp_path/'settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'workspaces'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'),
           'JUPYTER_CONFIG_DIR': str(tmp_path/'config'), 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    log = open(tmp_path/'lab.log', 'w')
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
                raise RuntimeError(f'JupyterLab did not start: {(tmp_path/"lab.log").read_text()[-3000:]}')
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


PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt'))
                      .map(p => p.textContent.trim())"""

IMAGES_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img')).map(img => {
    img.scrollIntoView(); const r = img.getBoundingClientRect();
    return {complete: img.complete, natural: img.naturalWidth, width: r.width, height: r.height,
            visible: getComputedStyle(img).visibility !== 'hidden' && getComputedStyle(img).display !== 'none'}; })"""

KERNEL_READY_JS = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.connectionStatus === 'connected' && k.status === 'idle'; }"""

STARTED_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt'))
                      .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""

ERRORS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
                   .map(o => o.textContent).filter(t => /Traceback \\(most recent call last\\)|^\\w+Error: /m.test(t))
                   .map(t => t.slice(0, 800))"""


def _wait_all_run(page, n_cells:int, timeout:float)->list:
    "Poll the cells' prompts until each shows its execution count ([12]:), not [ ]: or [*]:; returns the prompts."
    deadline, prompts = time.time() + timeout, []
    while time.time() < deadline:
        prompts = page.evaluate(PROMPTS_JS)
        if len(prompts) == n_cells and all(re.fullmatch(r'\[\d+\]:', p) for p in prompts): return prompts
        if page.evaluate(ERRORS_JS) and not any('*' in p for p in prompts): return prompts  # stopped at an error
        page.wait_for_timeout(1000)
    raise AssertionError(f'cells still not run after {timeout:.0f} s: prompts {prompts}')


def test_quick_start_runs_in_jupyterlab_and_its_explorer_responds(lab, page, artifacts_dir):
    url, token, work = lab
    n_code = sum(c['cell_type'] == 'code' for c in json.loads(NOTEBOOK.read_text())['cells'])
    page.set_default_timeout(60_000)
    page.goto(f'{url}lab/tree/{NOTEBOOK.name}?reset&token={token}')
    page.locator('.jp-Notebook .jp-CodeCell').first.wait_for()
    page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for()
    page.wait_for_function(KERNEL_READY_JS, timeout=120_000)  # the notebook's kernel is connected and idle
    page.locator('.jp-Notebook').first.click()
    t0 = time.time()
    # Run > Run All Cells, through the lab's command registry (the command the menu item runs); not awaited,
    # since its promise settles only when the last cell has run
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    page.wait_for_function(STARTED_JS, timeout=60_000)
    prompts = _wait_all_run(page, n_code, RUN_TIMEOUT_S)
    page.screenshot(path=str(artifacts_dir/'jupyterlab_quick_start.png'), full_page=True)

    errors = page.evaluate(ERRORS_JS)
    assert not errors, f'error output in the notebook: {errors}'
    assert len(prompts) == n_code and sorted(int(p[1:-2]) for p in prompts) == list(range(1, n_code + 1)), prompts
    print(f'quick start ran in JupyterLab in {time.time() - t0:.0f} s')

    images = page.evaluate(IMAGES_JS)
    assert len(images) >= 4, f'expected the batch, prediction, stage-map and explorer figures, found {len(images)} images'
    for k, im in enumerate(images):
        assert im['complete'] and im['natural'] > 0 and im['width'] > 0 and im['height'] > 0 and im['visible'], (k, im)

    # the explorer: its widgets are on the page, and moving the image slider redraws the figure
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
