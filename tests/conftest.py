"""Shared test set-up: the tiny data and trained runs several test files use (built once per session), and for browser
tests pytest-playwright's fixtures (`page`, `context`, `browser`) driving Debian's Chromium, plus helpers to serve a
folder on 127.0.0.1 and to catch any request that leaves this machine. Helper functions are in support.py.

A test that needs the browser is marked `@pytest.mark.browser`. Without Chromium it is skipped with the command
that installs it; with DS2NET_REQUIRE_BROWSER=1 (set by .ci/run) it fails instead, so CI cannot pass by skipping.
"""
import functools, http.server, os, shutil, socket, subprocess, threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get('DS2NET_CHROMIUM', '/usr/bin/chromium')
ARTIFACTS = ROOT/'test-artifacts'      # screenshots and other files a person may want to look at (gitignored)
REQUIRE_BROWSER = os.environ.get('DS2NET_REQUIRE_BROWSER', '') not in ('', '0', 'false', 'no')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
LOCAL_HOSTS = {'127.0.0.1', 'localhost', '::1', '[::1]'}

def pytest_configure(config):
    config.addinivalue_line('markers', 'browser: drives headless Chromium through Playwright '
                                       '(skipped without Chromium unless DS2NET_REQUIRE_BROWSER=1)')

def browser_missing()->str|None:
    "Why browser tests cannot run here, or None when they can."
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return (f'Chromium not found at {CHROMIUM}: install it with `apt-get update && apt-get install -y chromium` '
                f'(or point DS2NET_CHROMIUM at a Chromium binary)')
    try: import playwright, pytest_playwright  # noqa: F401
    except ImportError as e: return f'{e.name} is not installed: run `make install` (it is in dev_requirements)'
    return None

def pytest_runtest_setup(item):
    if item.get_closest_marker('browser') is None: return
    why = browser_missing()
    if why is None: return
    if REQUIRE_BROWSER: pytest.fail(f'browser test required (DS2NET_REQUIRE_BROWSER=1) but {why}', pytrace=False)
    pytest.skip(why)

# ------------------------------------------------------------------ pytest-playwright's fixtures, set up once

@pytest.fixture(scope='session')
def browser_type_launch_args(browser_type_launch_args):
    "Debian's Chromium, headless, with no traffic of its own (updates, sync, field trials)."
    return {**browser_type_launch_args, 'executable_path': CHROMIUM, 'headless': True, 'args': CHROMIUM_ARGS}

@pytest.fixture(scope='session')
def browser_context_args(browser_context_args):
    return {**browser_context_args, 'viewport': {'width': 1280, 'height': 900}}

@pytest.fixture(scope='session')
def artifacts_dir()->Path:
    "test-artifacts/ at the repository root: screenshots to look at after a run."
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

# ------------------------------------------------------------------ serving and watching the network

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

class FolderServer:
    "A folder served over HTTP on 127.0.0.1 at a free port, in a thread; `url` is its base, ending in '/'."
    def __init__(self, folder):
        self.folder = Path(folder)
        handler = functools.partial(_QuietHandler, directory=str(self.folder))
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', _free_port()), handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
    def close(self): self.httpd.shutdown(); self.httpd.server_close()

@pytest.fixture
def serve_folder():
    "Call it with a folder; returns a `FolderServer` (use `.url`), shut down after the test."
    servers = []
    def serve(folder):
        servers.append(FolderServer(folder)); return servers[-1]
    yield serve
    for s in servers: s.close()

def is_local(url:str)->bool:
    "True for requests that stay on this machine (loopback HTTP, data:, blob:, about: and the like)."
    parts = urlsplit(url)
    if parts.scheme not in ('http', 'https', 'ws', 'wss'): return True
    return (parts.hostname or '') in LOCAL_HOSTS

@pytest.fixture
def offsite_requests(context):
    """Every request the browser context tries to send to another host, blocked and recorded (a list of URLs).
    Assert it is empty at the end of the test."""
    seen = []
    def handle(route):
        url = route.request.url
        if is_local(url): route.continue_()
        else: seen.append(url); route.abort()
    context.route('**/*', handle)
    context.on('websocket', lambda ws: None if is_local(ws.url) else seen.append(ws.url))
    return seen

@pytest.fixture
def console_errors(page):
    "Console errors and uncaught exceptions of `page` (a list of strings, filled as the test runs)."
    errors = []
    page.on('console', lambda m: errors.append(f'console.{m.type}: {m.text} ({m.location.get("url", "")})')
            if m.type == 'error' else None)
    page.on('pageerror', lambda e: errors.append(f'uncaught: {e}'))
    return errors

# ------------------------------------------------------------------ the docs build's work folder

@pytest.fixture(scope='session')
def docs_work(tmp_path_factory)->Path:
    "One folder for nbdev's processed notebooks, shared by the nbdev-processing test and the site build (a cache)."
    return tmp_path_factory.mktemp('docs-work')


# ------------------------------------------------------------------ tiny data and trained runs, built once

@pytest.fixture(scope='module')
def model():
    "An untrained tiny DS2Net in eval mode (seed 0), built once per test module (stage maps, attribution)."
    import torch
    from ds2net.model import DS2Net, TINY_ENCODER
    torch.manual_seed(0)
    return DS2Net(TINY_ENCODER).eval()

@pytest.fixture(scope='module')
def batch():
    "Two random 64×64 images and a rectangle as the truth of each."
    import torch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.zeros(2, 64, 64); y[:, 20:44, 16:40] = 1
    return x, y

@pytest.fixture(scope='module')
def learn():
    "A ds2net Learner trained two epochs on 48 synthetic images at 64×64, once per test module (attribution, explorer)."
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401
    from fastai.torch_core import set_seed
    from ds2net.data import segmentation_dls
    from ds2net.learner import ds2net_learner
    from ds2net.model import TINY_ENCODER
    set_seed(0, reproducible=True)
    dls = segmentation_dls('synthetic:polyp', size=64, bs=8, n=48, seed=0, device='cpu')
    learn = ds2net_learner(dls, encoder=TINY_ENCODER, lr=3e-3)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-3)
    return learn

@pytest.fixture(scope='session')
def dls():
    "Synthetic colonoscopy DataLoaders on the CPU: 64×64, batches of 4, 16 images to train on and 4 to validate."
    from fastai.torch_core import set_seed
    from ds2net.data import segmentation_dls
    set_seed(0, reproducible=True)
    return segmentation_dls('synthetic:polyp', size=64, bs=4, n=20, seed=0, device='cpu')

@pytest.fixture(scope='session')
def paper():
    "The paper's network (PVTv2-B2, C = 32), untrained, in eval mode: built once (a few seconds)."
    import torch
    from ds2net.model import DS2Net
    torch.manual_seed(0)
    return DS2Net('pvt_v2_b2', channels=32).eval()

@pytest.fixture(scope='session')
def synthetic_folder(tmp_path_factory)->Path:
    "A synthetic data set in the images/masks layout (16 images of 64×64), as a user's folder."
    from ds2net.cli import main
    out = tmp_path_factory.mktemp('data') / 'base'
    assert main(['synth', '--n', '16', '--size', '64', '--seed', '3', '--out', str(out)]) == 0
    return out

@pytest.fixture(scope='session')
def logged_run(synthetic_folder, tmp_path_factory):
    "`ds2net train ... > log.txt 2>&1` with no --lr, 2 epochs, in a separate process whose output is a file: (run, log text)."
    from support import CLI, train_args
    root = tmp_path_factory.mktemp('logged')
    out, log = root / 'RUN', root / 'log.txt'
    with open(log, 'w') as f:
        proc = subprocess.run(CLI + train_args(synthetic_folder, out, '--epochs', '2'), stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    return out, text

@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
    "A tiny DS2Net trained for 6 epochs on easy synthetic polyps (`EASY`): (run folder, summary). It reaches ~0.8 Dice."
    from ds2net.train import train
    from support import EASY
    out = tmp_path_factory.mktemp('pinned') / 'run'
    return out, train('synthetic:polyp', out, epochs=6, **EASY)
