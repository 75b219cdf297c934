"""`bash scripts/docs.sh` builds the site: a page per notebook in the notebooks' order, an API entry per public exported
symbol whose source link lands on its `def`, and a page for each module docstring's `Docs:` link."""
import ast, importlib, inspect, os, posixpath, re, subprocess, sys, tomllib
from pathlib import Path

import nbformat, pytest

from helpers import ROOT
NBS = ROOT/"nbs"

def expected_pages():
    "Pages in the order a reader meets them, worked out here from the file names: index, numbered, then analysis/."
    top = sorted(p.name for p in NBS.glob("*.ipynb") if p.name != "index.ipynb")
    sub = sorted(p.relative_to(NBS).as_posix() for p in NBS.glob("*/*.ipynb")
                 if not p.parent.name.startswith(("_", ".")))
    def page(rel): return re.sub(r"(^|/)\d+[a-zA-Z0-9]*_", r"\1", rel.lower()).removesuffix(".ipynb") + ".html"
    return ["index.html"] + [page(n) for n in top + sub]

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    res = subprocess.run(["bash", "scripts/docs.sh", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "has no entry" not in res.stderr, res.stderr
    return out

def test_a_page_per_notebook_in_order(site):
    pages = expected_pages()
    for p in pages: assert (site/p).is_file() and (site/(p + ".md")).is_file(), p
    for p in ("index.html", "config.html", "analysis/parameters.html"):
        nav = re.search(r'<nav class="docs-nav".*?</nav>', (site/p).read_text(), re.S).group(0)
        hrefs = [posixpath.normpath(posixpath.join(posixpath.dirname(p), h))
                 for h in re.findall(r'<a href="([^"]+)"', nav)]
        assert hrefs == pages + ["api.html"], (p, hrefs)
    text = (site/"config.html").read_text()
    assert "#| export" not in text and "#| hide" not in text and "default_exp" not in text
    assert 'href="checks.html"' in text and 'class="docs-next" href="tiny.html"' in text

def _entry(html, anchor):
    "The HTML of the API entry `anchor`, up to the next entry."
    i = html.index(f'<div class="api-entry" id="{anchor}">')
    j = html.find('<div class="api-entry"', i + 10)
    return html[i:j if j > 0 else None]

def _text(h): return re.sub(r"<[^>]+>", "", h).replace("&gt;", ">").replace("&lt;", "<").replace("&#39;", "'")

@pytest.mark.parametrize("module", ["checks", "lora"])
def test_every_public_symbol_has_an_entry_with_a_source_link_to_its_def(site, module):
    syms = importlib.import_module("qlora_nb._modidx").d["syms"][f"qlora_nb.{module}"]
    mod, n = importlib.import_module(f"qlora_nb.{module}"), 0
    for q, (target, src) in syms.items():
        name = q.split(".", 2)[2]
        if any(p.startswith("_") and not p.startswith("__") for p in name.split(".")): continue
        page, anchor = target.split("#")
        html = (site/page).read_text()
        entry = _entry(html, anchor) if f'id="{anchor}"' in html and "api-entry" in html else ""
        assert entry, f"{q}: no entry #{anchor} in {page}"
        line = int(re.search(rf'href="https://github.com/qlora-nb/qlora_nb/blob/main/{src}#L(\d+)"', entry).group(1))
        src_line = (ROOT/src).read_text().splitlines()[line - 1]
        assert re.match(rf"\s*(async\s+)?(def|class)\s+{re.escape(name.split('.')[-1])}\b", src_line), (q, src_line)
        obj = mod
        for part in name.split("."): obj = getattr(obj, part)
        sig = _text(re.search(r'<div class="api-sig">(.*?)</div>\s*</div>', entry, re.S).group(1))
        try: params = inspect.signature(obj).parameters
        except ValueError: params = []  # an exception class with no __init__ of its own: `ConfigError(...)`
        for p in params: assert p in sig, (q, p, sig)
        n += 1
    assert n >= 5

def test_docs_links_name_built_pages(site):
    base = tomllib.loads((ROOT/"pyproject.toml").read_text())["project"]["urls"]["Documentation"].rstrip("/")
    links = {}
    for py in sorted((ROOT/"qlora_nb").glob("*.py")):
        doc = ast.get_docstring(ast.parse(py.read_text())) or ""
        if m := re.search(r"^Docs: (\S+)$", doc, re.M): links[py.stem] = m.group(1)
    assert len(links) >= 20, links
    for mod, url in links.items():
        assert url.startswith(base + "/"), (mod, url)
        page = url[len(base) + 1:]
        assert (site/page).is_file() and (site/page.removesuffix(".md")).is_file(), (mod, url)
        modidx = importlib.import_module("qlora_nb._modidx").d["syms"].get(f"qlora_nb.{mod}", {})
        assert all(t.split("#")[0] == page.removesuffix(".md") for t, _ in modidx.values()), (mod, url)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="  # 1x1 pixel

def test_outputs_are_rendered_and_hidden_cells_dropped(tmp_path):
    "A notebook with committed outputs: its text/html shows, a widget's view falls back to text, `#| hide` is gone."
    sys.path.insert(0, str(ROOT/"scripts"))
    import docs
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# checks\n> a summary"),
        nbformat.v4.new_code_cell("#| default_exp checks"),
        nbformat.v4.new_code_cell("#| hide\nfrom fastcore.test import *"),
        nbformat.v4.new_code_cell("#| export\ndef say(msg: str): pass"),
        nbformat.v4.new_code_cell("show()", outputs=[
            nbformat.v4.new_output("display_data", {"text/html": "<b>a table</b>", "text/plain": "plain"}),
            nbformat.v4.new_output("display_data", {"application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                                                    "text/plain": "IntSlider(value=3)"}),
            nbformat.v4.new_output("display_data", {"image/png": PNG, "text/plain": "<Figure>"})])])
    path = tmp_path/"00_checks.ipynb"
    nbformat.write(nb, path)
    s = docs.Site(tmp_path/"out")
    nbk, cells, md, images, module = s.cells(path, "checks.html")
    assert module == "checks" and [c.cell_type for c in cells] == ["markdown", "code", "raw", "code"]
    assert cells[1].source == "def say(msg: str): pass" and 'id="say"' in cells[2].source
    html, _ = s.html.from_notebook_node(nbformat.from_dict({**nbk, "cells": cells}),
                                        resources=dict(docs=dict(css="", nav="", pager="", header=""), metadata={}))
    assert "<b>a table</b>" in html and "IntSlider(value=3)" in html and "fastcore.test" not in html
    assert f"data:image/png;base64,{PNG}" in html and "widget-view" not in html
