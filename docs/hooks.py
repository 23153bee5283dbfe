"""MkDocs hooks of the ds2net site (docs/mkdocs.yml): keep every page offline.

mkdocs-jupyter's template (nbconvert's lab template) puts on each notebook page a MathJax `<script src>` and a
module script that imports mermaid from a CDN when a page has a mermaid diagram; jupyter-widgets' manager comes too
when a notebook carries widget state (tools/docs.py drops that state). MathJax is the site's own copy (the docs
toolchain installs it from PyPI and tools/docs.py copies it to assets/mathjax/): its placeholder URL becomes a path
relative to the page. Any other script from another host is removed (no ds2net notebook draws mermaid): a page
then requests nothing from any host but the one serving it.

mkdocs-jupyter also builds a notebook page's table of contents with its own slugs, which drop code spans
(`### Colonoscopy: `make_polyp`` -> `#colonoscopy`) where nbconvert's heading id keeps them
(`colonoscopy-make_polyp`): such a link is pointed at the heading it was made from.
"""
import re

_script = re.compile(r'<script\b([^>]*)>(.*?)</script>', re.S | re.I)
_src = re.compile(r'\bsrc\s*=\s*"([^"]*)"', re.I)
_offsite = re.compile(r'^(?:https?:)?//', re.I)
_imports_offsite = re.compile(r'''import\s*\(\s*["'](?:https?:)?//|\bimport\s[^;]*\bfrom\s*["'](?:https?:)?//''')

def _keep(m):
    attrs, body = m.group(1), m.group(2)
    src = _src.search(attrs)
    if src and (not src.group(1).strip() or _offsite.match(src.group(1))): return ''   # empty or off-site src
    if not src and _imports_offsite.search(body): return ''                          # module importing from a CDN
    return m.group(0)

_id = re.compile(r'\bid="([^"]+)"')
_local_href = re.compile(r'href="#([^"]+)"')

def _fix_toc(output):
    ids = _id.findall(output)
    known = set(ids)
    def fix(m):
        frag = m.group(1)
        if frag in known: return m.group(0)
        near = next((i for i in ids if i.startswith(frag + '-')), None)
        return f'href="#{near}"' if near else m.group(0)
    return _local_href.sub(fix, output)

MATHJAX_PLACEHOLDER = 'ds2net-mathjax:'  # docs/mkdocs.yml's custom_mathjax_url starts with it

# jupyter-server-mathjax ships MathJax with the STIX-Web fonts only: without this, HTML-CSS output asks for the TeX fonts
# (a 404 per page) before it falls back. Read by MathJax when it starts, so it goes before the MathJax script.
MATHJAX_FONTS = ('<script type="text/x-mathjax-config">MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], '
                 'preferredFont: null, webFont: "STIX-Web", imageFont: null}, SVG: {font: "STIX-Web"}});</script>\n')

def _local_mathjax(output, page):
    "Point the MathJax script at the site's own copy (assets/mathjax/, put there by tools/docs.py), relative to the page, with its fonts."
    up = '../' * page.url.count('/')
    tag = f'<script src="{MATHJAX_PLACEHOLDER}'
    return output.replace(tag, MATHJAX_FONTS + f'<script src="{up}assets/mathjax/')

def on_post_page(output, page, config):
    return _fix_toc(_script.sub(_keep, _local_mathjax(output, page)))
