"""Shared test set-up. Browser tests: pytest-playwright's fixtures (`page`, `context`, `browser`) driving Debian's
Chromium, plus helpers to serve a folder on 127.0.0.1 and to catch any request that leaves this machine.

A test that needs the browser is marked `@pytest.mark.browser`. Without Chromium it is skipped with the command
that installs it; with DS2NET_REQUIRE_BROWSER=1 (set by .ci/run) it fails instead, so CI cannot pass by skipping.
"""
import functools, http.server, os, shutil, socket, threading
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
