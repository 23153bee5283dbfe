"""The documentation site, as a reader meets it: built with `tools/docs.py` (what `make docs` runs) into a
temporary folder, served on 127.0.0.1 and visited page by page in headless Chromium."""
import os, subprocess, sys, time
from pathlib import Path
from urllib.parse import urljoin, urlsplit, unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = ROOT/'.venv-docs'/'bin'/'mkdocs'

def build_site(site:Path, work:Path)->str:
    "Build the site as `make docs` does; returns the build's summary line."
    if not MKDOCS.exists():
        pytest.fail(f'{MKDOCS} is missing: `make docs-env` creates the docs toolchain (`make test` does it first)', pytrace=False)
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), 'build', '--site', str(site), '--work', str(work)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f'the site build failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}'
    return r.stdout.strip().splitlines()[-1]

@pytest.fixture(scope='module')
def site(tmp_path_factory, docs_work):
    "The site, built into a temporary folder (or DS2NET_DOCS_SITE, a site already built, e.g. `_site`)."
    if os.environ.get('DS2NET_DOCS_SITE'): return Path(os.environ['DS2NET_DOCS_SITE']).resolve()
    folder = tmp_path_factory.mktemp('site')/'site'
    t = time.time()
    summary = build_site(folder, docs_work)
    print(f'\n{summary} (built in {time.time() - t:.0f} s)')
    return folder

def site_pages(site:Path)->list:
    "Every page of the site, as paths relative to its root ('404.html' is only shown for missing pages)."
    return sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html') if p.name != '404.html')

# What a page reports: its anchors, its links, and its images that did not load.
_PAGE_FACTS = """async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; setTimeout(r, 5000); })));
  return {
    ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => (i.currentSrc || i.src).slice(0, 120)),
  };
}"""

@pytest.mark.browser
def test_every_page_renders_offline_with_working_links(site, serve_folder, page, context, offsite_requests,
                                                       console_errors, artifacts_dir):
    server = serve_folder(site)
    pages = site_pages(site)
    # the site holds the home page, every tutorial, every module chapter and one reference page per module
    nbs = ROOT/'nbs'
    tutorials = sorted((nbs/'tutorials').glob('[!_.]*.ipynb'))
    modules = sorted(p for p in (ROOT/'ds2net').rglob('*.py') if not p.name.startswith('_'))
    assert 'index.html' in pages and 'api/index.html' in pages
    assert len([p for p in pages if p.startswith('tutorials/')]) == len(tutorials), pages
    assert len([p for p in pages if p.startswith('api/')]) == len(modules) + 1, pages

    facts, problems, n_images = {}, [], 0
    for rel in pages:
        console_errors.clear()
        resp = page.goto(server.url + rel, wait_until='load')
        if resp is None or resp.status != 200: problems.append(f'{rel}: HTTP {resp and resp.status}')
        f = page.evaluate(_PAGE_FACTS)
        facts[rel] = f; n_images += f['images']
        problems += [f'{rel}: image did not load: {b}' for b in f['broken']]
        problems += [f'{rel}: {e}' for e in console_errors]
        if rel == 'index.html': page.screenshot(path=str(artifacts_dir/'docs-home.png'), full_page=False)
    tutorial_pages = [p for p in pages if p.startswith('tutorials/')]
    if tutorial_pages:
        page.goto(server.url + tutorial_pages[-1], wait_until='load')
        page.screenshot(path=str(artifacts_dir/'docs-tutorial.png'), full_page=False)

    # every link into the site reaches a page, and its anchor is on that page
    n_links = 0
    for rel, f in facts.items():
        for href in f['links']:
            parts = urlsplit(href)
            if not href.startswith(server.url): continue
            target = unquote(parts.path[len(urlsplit(server.url).path):]) or 'index.html'
            if target.endswith('/'): target += 'index.html'
            if target.startswith('search/') or target.endswith(('.xml', '.gz')): continue
            n_links += 1
            if target not in facts:
                if not (site/target).is_file(): problems.append(f'{rel}: broken link {href}')
                continue
            if parts.fragment and unquote(parts.fragment) not in facts[target]['ids']:
                problems.append(f'{rel}: link to a missing anchor {href}')
    assert not offsite_requests, f'requests left localhost: {sorted(set(offsite_requests))}'
    assert not problems, f'{len(problems)} problem(s):\n' + '\n'.join(problems[:60])
    print(f'{len(pages)} pages, {n_images} images, {n_links} internal links checked')
    assert n_images > 20

@pytest.mark.browser
def test_search_finds_the_dem_reference(site, serve_folder, page, offsite_requests, console_errors):
    server = serve_folder(site)
    page.goto(server.url + 'index.html', wait_until='load')
    box = page.locator('input.md-search__input')
    box.click()
    results = page.locator('.md-search-result__item a')
    for _ in range(30):              # the index loads in a web worker: type again until it answers
        box.fill(''); box.type('DEM', delay=50)
        page.wait_for_timeout(500)
        if results.count(): break
    hrefs = [results.nth(i).get_attribute('href') for i in range(results.count())]
    dem = [i for i, h in enumerate(hrefs) if urlsplit(h).path.endswith('api/blocks.html') and urlsplit(h).fragment == 'dem']
    assert dem, f'no search result leads to the DEM reference (api/blocks.html#dem): {hrefs}'
    page.goto(hrefs[dem[0]], wait_until='load')        # (it may sit under "more on this page": follow its link)
    assert page.locator('h2#dem').is_visible()
    assert not offsite_requests and not console_errors, (offsite_requests, console_errors)

@pytest.mark.browser
def test_formulas_are_typeset_offline(site, serve_folder, page, offsite_requests, console_errors, artifacts_dir):
    "The losses chapter's formulas come out as MathJax's typeset math, from the site's own copy of MathJax."
    assert (site/'assets'/'mathjax'/'MathJax.js').is_file()
    server = serve_folder(site)
    page.goto(server.url + 'losses.html', wait_until='load')
    typeset = page.locator('.MathJax, .MathJax_CHTML, .MathJax_SVG')  # one per formula, inline or displayed (HTML-CSS, CommonHTML, SVG)
    for _ in range(50):                      # MathJax typesets after the load event
        if typeset.count(): break
        page.wait_for_timeout(200)
    page.wait_for_timeout(500)
    assert typeset.count() >= 10, f'{typeset.count()} typeset formulas on losses.html'
    text = page.locator('article').inner_text()
    assert '$$' not in text and '\\frac' not in text, 'raw TeX is visible on losses.html'
    page.locator('.MathJax_Display').first.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir/'docs-formula.png'), full_page=False)
    # MathJax 2's HTML-CSS output probes web-font support by loading a font from about:blank, which Chromium logs as an
    # error; that probe, and nothing else, is allowed here
    probe = [e for e in console_errors if 'about:blank' in e]
    assert not offsite_requests and console_errors == probe, (offsite_requests, console_errors)
