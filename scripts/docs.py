"""Build the documentation site (`_docs/` by default) from the notebooks, as nbdev's site would show it.

nbdev renders its site with Quarto, and Quarto cannot be installed here: its Python package downloads the Quarto
binary while it installs. So each notebook is rendered with nbconvert's `HTMLExporter` (the exporter Jupyter itself
uses, maintained by the Jupyter project, already among the dev tools) through a small template that extends its `lab`
template with a sidebar and prev/next links. What nbdev's processors do is redone here on a copy of each notebook:
`#| hide` cells are dropped, directive lines are removed, each exported cell's source is shown folded open, and an API
entry follows each exported function or class (signature, docments table, docstring, link to the source line), as
`show_doc` would. The committed outputs are rendered as they are; no notebook is executed.

Each page is written twice: `config.html` and `config.html.md` (markdown, the alternate format nbdev's site
publishes and the `Docs:` link of each module docstring names). `api.html` lists every public exported symbol.

    python scripts/docs.py [--out _docs]        # or: bash scripts/docs.sh
"""
import argparse, ast, dataclasses, html, importlib, inspect, os, re, shutil, sys, tomllib, warnings
from pathlib import Path

import jinja2, mistune, nbformat
from nbconvert import HTMLExporter, MarkdownExporter
from nbconvert.exporters.templateexporter import TemplateExporter
from nbconvert.filters.highlight import Highlight2HTML
from nbconvert.filters.widgetsdatatypefilter import WidgetsDataTypeFilter
from nbdev.config import nbpath2html
from nbdev.doclinks import patch_name
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/"nbs"

# ---------------------------------------------------------------- the project: settings, notebooks, exported symbols

def settings():
    "Repository URL, branch and package folder from pyproject.toml, as nbdev reads them."
    proj = tomllib.loads((ROOT/"pyproject.toml").read_text())
    nbd = proj["tool"]["nbdev"]
    return dict(git_url=proj["project"]["urls"]["Repository"].rstrip("/"), branch=nbd.get("branch", "main"),
                lib=nbd.get("lib_path", "qlora_nb"), title=proj["project"]["name"])

def notebooks(nbs=NBS):
    "Notebooks in site order: index first, then the top folder's by name (their numbers), then each sub-folder's."
    def keep(p): return not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts)
    top = sorted(p for p in nbs.glob("*.ipynb") if p.name != "index.ipynb" and keep(p))
    subs = sorted(p for p in nbs.glob("*/**/*.ipynb") if keep(p))
    return [nbs/"index.ipynb"] + top + subs

def page_of(nb, nbs=NBS):
    "A notebook's page, relative to the site root: nbdev's own rule (numeric prefix dropped), so the links agree."
    return nbpath2html(nb.relative_to(nbs)).as_posix()

def modidx(lib):
    "nbdev's index of exported symbols: `{module: {qualified name: (page#anchor, source file)}}`."
    return importlib.import_module(f"{lib}._modidx").d["syms"]

def is_public(qualname):
    "True unless a part of the name after the module is private (`_x`; dunders such as `__call__` are public)."
    return not any(p.startswith("_") and not p.startswith("__") for p in qualname.split("."))

def def_lines(path):
    "`{name: line of its def or class}` for a module file; `Class.method` for methods and `@patch`ed functions."
    res = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        names = patch_name(node)
        for nm in names if isinstance(names, list) else [names]: res[nm] = node.lineno
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)): res[f"{node.name}.{m.name}"] = m.lineno
    return res

# ---------------------------------------------------------------- one API entry, as nbdev's show_doc shows it

def resolve(module, name):
    "The object `name` (`f` or `Class.method`) of `module`; properties give their getter."
    obj = importlib.import_module(module)
    for part in name.split("."): obj = getattr(obj, part)
    return obj.fget if isinstance(obj, property) else obj

def _clean(s): return re.sub(r" at 0x[0-9a-f]+", "", re.sub(r"\btyping\.", "", s))

def _own_fields(obj):
    "A dataclass's fields declared in the class itself, when it inherits many from another package's class."
    if not (inspect.isclass(obj) and dataclasses.is_dataclass(obj)): return None
    own = obj.__dict__.get("__annotations__", {})
    return list(own) if len(dataclasses.fields(obj)) > 30 and len(own) < len(dataclasses.fields(obj)) else None

def signature_text(obj, name):
    "`name(a:int=1, *, b=None) -> str`, a parameter a line when long; a big inherited dataclass shows its own fields."
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return f"{name}(...)"
    own, parts, pos_only, kw_marker = _own_fields(obj), [], False, True
    for p in sig.parameters.values():
        if own is not None and p.name not in own: continue
        if p.kind == p.POSITIONAL_ONLY: pos_only = True
        elif pos_only: parts.append("/"); pos_only = False
        if p.kind == p.VAR_POSITIONAL: kw_marker = False
        elif p.kind == p.KEYWORD_ONLY and kw_marker: parts.append("*"); kw_marker = False
        parts.append(_clean(str(p)))
    if pos_only: parts.append("/")
    ret = "" if sig.return_annotation is sig.empty or inspect.isclass(obj) else \
        f" -> {_clean(inspect.formatannotation(sig.return_annotation))}"
    more = "" if own is None else f"    ...  # and {len(sig.parameters)-len(own)} fields inherited from " + \
        ", ".join(b.__name__ for b in obj.__bases__) + "\n"
    one = f"{name}({', '.join(parts)}){ret}"
    if len(one) <= 100 and not more: return one
    return f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + more + f"){ret}"

def own_docstring(obj):
    "The object's own docstring (a class's, not its base's; not the one `@dataclass` makes up), or ''."
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")): return ""
    return inspect.cleandoc(doc)

def _type_name(anno):
    if anno is inspect.Parameter.empty: return ""
    return _clean(getattr(anno, "__name__", None) or inspect.formatannotation(anno))

def param_rows(obj):
    "`(name, type, default, details)` per documented parameter: docments' comments, else a dataclass field's help."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try: dm = docments(obj, full=True)
        except Exception: return []
    helps = {f.name: f.metadata.get("help") for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    own, rows = _own_fields(obj), []
    for nm, d in dm.items():
        if nm in ("self", "return") or (own is not None and nm not in own): continue
        default = "" if d.default is inspect.Parameter.empty else _clean(repr(d.default))
        anno = d.anno if "anno" in d else inspect.Parameter.empty
        rows.append((nm, _type_name(anno), default, d.docment or helps.get(nm) or ""))
    ret = dm.get("return")
    if ret is not None and ret.docment: rows.append(("**Returns**", _type_name(ret.anno), "", ret.docment))
    return rows if any(r[3] for r in rows) else []

_highlight = Highlight2HTML(pygments_lexer="python")
_md = mistune.create_markdown(escape=True, plugins=["table", "strikethrough"])
_inline = mistune.create_markdown(escape=True)

def _code(s): return f"<code>{html.escape(s)}</code>" if s else ""

def _inline_html(s): return re.sub(r"^<p>(.*)</p>\s*$", r"\1", _inline(s), flags=re.S)

def entry_html(e, level=3):
    "An API entry as HTML: anchor, name, source link, highlighted signature, docstring, parameter table."
    rows = "".join(f"<tr><td><code>{html.escape(n)}</code></td><td>{_code(t)}</td>"
                   f"<td>{_code(d)}</td><td>{_inline_html(x)}</td></tr>" for n, t, d, x in e["rows"])
    table = (f'<table class="api-params"><thead><tr><th></th><th>Type</th><th>Default</th><th>Details</th></tr>'
             f"</thead><tbody>{rows}</tbody></table>") if rows else ""
    extra = "".join(f'<a id="{a}"></a>' for a in e.get("also", []))
    src = f'<a class="api-source" href="{e["url"]}" target="_blank">source</a>' if e["url"] else ""
    return (f'<div class="api-entry" id="{e["anchor"]}">{extra}{src}<h{level} class="api-name"><code>{e["name"]}'
            f'</code></h{level}><div class="api-sig">{_highlight(e["sig"])}</div>'
            f'<div class="api-doc">{_md(e["doc"]) if e["doc"] else ""}</div>{table}</div>')

def entry_markdown(e, level=3):
    "The same entry as markdown, for the `.html.md` twin."
    rows = "".join(f"| `{n}` | `{t}` | `{d}` | {x.replace('|', '&#124;').replace(chr(10), ' ')} |\n"
                   for n, t, d, x in e["rows"]).replace("``", "")
    table = f"\n|  | Type | Default | Details |\n|---|---|---|---|\n{rows}" if rows else ""
    src = f"[source]({e['url']})\n\n" if e["url"] else ""
    return f"{'#'*level} {e['name']}\n\n{src}```python\n{e['sig']}\n```\n\n{e['doc']}\n{table}"

# ---------------------------------------------------------------- a notebook's cells, processed as nbdev does

_dir_line = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")

def directives(source):
    "`({directive: value}, source without the directive lines)` for nbdev's `#| name value` lines at a cell's top."
    lines, res = source.splitlines(), {}
    while lines and (m := _dir_line.match(lines[0])):
        key, _, val = m.group(1).partition(" ")
        res[key.rstrip(":")] = val.strip()
        lines.pop(0)
    return res, "\n".join(lines).strip("\n")

def cell_defs(source):
    "Names of the top-level functions and classes a cell defines (`Class.method` for `@patch`), with class methods."
    try: tree = ast.parse(re.sub(r"^\s*[%!].*$", "", source, flags=re.M))
    except SyntaxError: return []
    res = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        names = patch_name(node)
        methods = [f"{node.name}.{m.name}" for m in node.body
                   if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))] if isinstance(node, ast.ClassDef) else []
        res += [(nm, methods) for nm in (names if isinstance(names, list) else [names])]
    return res

_widget = "application/vnd.jupyter.widget-view+json"

def plain_outputs(outputs):
    "Outputs without widget views (they need a live kernel): what remains is their text/html or text/plain."
    res = []
    for o in outputs:
        if "data" in o and _widget in o["data"]:
            o = nbformat.from_dict({**o, "data": {k: v for k, v in o["data"].items() if k != _widget}})
            if not o["data"]: continue
        res.append(o)
    return res

def linkify(text, links):
    "Markdown with `` `name` `` (a documented symbol or a notebook) linked to its page, outside code blocks."
    out, fenced = [], False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")): fenced = not fenced
        if fenced or line.lstrip().startswith("#"): out.append(line); continue
        line = re.sub(r"\]\(([^)\s:]+?)\.ipynb(#[^)\s]*)?\)",
                      lambda m: f"]({nbpath2html(Path(m.group(1)+'.ipynb')).as_posix()}{m.group(2) or ''})", line)
        def link(m): return f"[{m.group(0)}]({links[m.group(1)]})" if m.group(1) in links else m.group(0)
        out.append(re.sub(r"(?<!\[)`([\w./]+)(\(\))?`(?!\])", link, line))
    return "".join(out)

def image_paths(text):
    "Relative image paths a markdown cell refers to (`![..](path)` or `<img src=...>`)."
    found = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)", text) + re.findall(r"<img[^>]*\ssrc=[\"']([^\"']+)", text)
    return [p for p in found if not re.match(r"^([a-z]+:|/|#)", p)]

# ---------------------------------------------------------------- the site

TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{% block extra_css %}<style type="text/css">{{ resources.docs.css }}</style>{% endblock extra_css %}
{%- block body_header -%}
<body class="jp-Notebook docs" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="docs-nav" aria-label="notebooks">{{ resources.docs.nav }}</nav>
<main class="docs-main">{{ resources.docs.header }}
{%- endblock body_header -%}
{% block codecell %}
{%- set fold = cell.metadata.get('docs_fold') -%}
{%- if fold -%}<details class="docs-source" {{ 'open' if fold == 'open' }}><summary>{{ 'Exported source'
  if fold == 'open' else 'Internal source' }}</summary>{{ super() }}</details>{%- else -%}{{ super() }}{%- endif -%}
{%- endblock codecell %}
{% block input %}{# highlighted by Pygments: nothing to sanitize, and bleach would triple the build time #}
<div class="jp-CodeMirrorEditor jp-Editor jp-InputArea-editor" data-type="inline"><div class="cm-editor cm-s-jupyter">
{{ cell.source | highlight_code(metadata=cell.metadata) }}</div></div>
{%- endblock input %}
{% block rawcell scoped %}{% if cell.metadata.get('raw_mimetype') == 'text/html' %}{{ cell.source }}{% endif %}
{%- endblock rawcell %}
{% block body_footer %}{{ resources.docs.pager }}</main></body>{% endblock body_footer %}
"""

CSS = """
body.docs { display: flex; margin: 0; padding: 0; }
.docs-nav, .docs-origin, .docs-pager, .api-entry, details.docs-source > summary {
  font-family: var(--jp-content-font-family); }
.jp-RenderedHTMLCommon a code, .api-entry a code { color: #1a5fb4; }
.docs-nav { position: sticky; top: 0; height: 100vh; overflow-y: auto; flex: 0 0 240px; padding: 16px 12px;
  border-right: 1px solid #ddd; background: #fafafa; font-size: 14px; box-sizing: border-box; }
.docs-nav a { display: block; padding: 3px 8px; color: #333; text-decoration: none; border-radius: 4px; }
.docs-nav a:hover { background: #eee; } .docs-nav a.active { background: #e3ecfa; font-weight: 600; }
.docs-nav .docs-group { margin: 12px 0 4px 8px; color: #777; font-size: 12px; text-transform: uppercase; }
.docs-nav .docs-site { font-size: 18px; font-weight: 700; margin-bottom: 8px; }
.docs-main { flex: 1 1 auto; max-width: 980px; padding: 16px 32px 48px; min-width: 0; }
.docs-origin { font-size: 12px; color: #777; text-align: right; }
.docs-pager { display: flex; justify-content: space-between; margin-top: 32px; padding-top: 12px;
  border-top: 1px solid #ddd; } .docs-pager a { text-decoration: none; }
details.docs-source > summary { cursor: pointer; color: #555; font-size: 13px; margin: 8px 0 2px; }
.api-entry { border: 1px solid #d8d8d8; border-radius: 6px; padding: 8px 16px 4px; margin: 10px 0 22px;
  box-shadow: 0 1px 3px rgba(0,0,0,.06); }
.api-entry .api-entry { box-shadow: none; margin-left: 12px; }
.api-source { float: right; font-size: smaller; }
.api-name { margin: 4px 0 8px; } .api-sig .highlight pre { padding: 6px 8px; white-space: pre-wrap; }
table.api-params { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
table.api-params td, table.api-params th { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: left;
  vertical-align: top; }
.api-list li { margin: 2px 0; } .api-list .api-summary { color: #555; }
"""

_html = {"raw_mimetype": "text/html"}  # a raw cell the template writes as it is

class PageExporter(HTMLExporter):
    "`HTMLExporter` without its last pass, which re-parses each page with BeautifulSoup to add `alt` and `tabindex`."
    # That pass took two thirds of the build time; the site does without it.
    def from_notebook_node(self, nb, resources=None, **kw):
        try:
            resources = self._init_resources(resources)
            data_filter = WidgetsDataTypeFilter(notebook_metadata=self._nb_metadata, parent=self, resources=resources)
        except AttributeError: return super().from_notebook_node(nb, resources, **kw)  # another nbconvert: the slow way
        self.register_filter("highlight_code", Highlight2HTML(pygments_lexer="ipython3", parent=self))
        self.register_filter("filter_data_type", data_filter)
        return TemplateExporter.from_notebook_node(self, nb, resources, **kw)

class Site:
    "Renders the notebooks of `nbs` into `out`: one page each, its markdown twin, `api.html`, images."
    def __init__(self, out, nbs=NBS):
        self.out, self.cfg, self.root, self.nbs = Path(out), settings(), Path(nbs), notebooks(Path(nbs))
        self.pages = [page_of(nb, self.root) for nb in self.nbs] + ["api.html"]
        self.titles = {p: self.title(nb) for p, nb in zip(self.pages, self.nbs)} | {"api.html": ("API reference", "")}
        self.syms = modidx(self.cfg["lib"])
        self.entries = {}  # qualified name -> (page, anchor) of each entry built
        self.lines = {}
        self.html = PageExporter(template_name="lab", template_file="docs.html.j2",
                                 extra_loaders=[jinja2.DictLoader({"docs.html.j2": TEMPLATE})],
                                 exclude_input_prompt=True, exclude_output_prompt=True)
        self.md = MarkdownExporter()

    @staticmethod
    def title(nb):
        "`(title, summary)` from a notebook's `# title` / `> summary` cell."
        nbk = nbformat.read(nb, as_version=4)
        first = next((c.source for c in nbk.cells if c.cell_type == "markdown" and c.source.startswith("# ")), "")
        lines = first.splitlines() or [f"# {nb.stem}"]
        summ = " ".join(l[1:].strip() for l in lines[1:] if l.startswith(">"))
        return lines[0][2:].strip(), summ

    def rel(self, page, target):
        "Link from `page` to `target` (both relative to the site root)."
        return os.path.relpath(target, os.path.dirname(page) or ".").replace(os.sep, "/")

    def nav(self, page):
        "The sidebar: the site's name, then every page in order, sub-folders under their name."
        items, group = [f'<div class="docs-site">{html.escape(self.cfg["title"])}</div>'], ""
        for p in self.pages:
            g = os.path.dirname(p)
            if g != group and g: items.append(f'<div class="docs-group">{html.escape(g)}</div>')
            group = g
            label = "Home" if p == "index.html" else self.titles[p][0]
            cls = ' class="active"' if p == page else ""
            items.append(f'<a href="{self.rel(page, p)}"{cls}>{html.escape(label)}</a>')
        return "\n".join(items)

    def pager(self, page):
        "Previous and next links, in the sidebar's order."
        i, res = self.pages.index(page), []
        for j, arrow in ((i-1, "&larr; "), (i+1, "")):
            if 0 <= j < len(self.pages):
                t = html.escape(self.titles[self.pages[j]][0])
                label = f"{arrow}{t}" if arrow else f"{t} &rarr;"
                res.append(f'<a class="docs-{"prev" if arrow else "next"}" href="{self.rel(page, self.pages[j])}">'
                           f"{label}</a>")
            else: res.append("<span></span>")
        return f'<div class="docs-pager">{"".join(res)}</div>'

    def links(self, page, module):
        "Targets for linkify: each public symbol by name (its own module's first; nbdev's index) and each notebook."
        res = {}
        for mod, syms in self.syms.items():
            for q, (target, _) in syms.items():
                short = q[len(mod)+1:]
                if not is_public(short): continue
                res[q] = res[q.split(".", 1)[1]] = self.rel(page, target.split("#")[0]) + "#" + target.split("#")[1]
                if short not in res or mod == module: res[short] = res[q]
            if syms: res[mod] = self.rel(page, next(iter(syms.values()))[0].split("#")[0])  # `qlora_nb.checks`
        for nb in self.nbs:
            res[nb.relative_to(self.root).with_suffix("").as_posix()] = self.rel(page, page_of(nb, self.root))
        return res

    def entry(self, module, name, page):
        "The API entry of `module.name`: its signature, docstring, documented parameters and source link."
        q, cfg = f"{module}.{name}", self.cfg
        anchor = self.syms[module][q][0].split("#", 1)[1]
        src = self.syms[module][q][1]
        if src not in self.lines: self.lines[src] = def_lines(ROOT/src)
        line = self.lines[src].get(name)
        url = f"{cfg['git_url']}/blob/{cfg['branch']}/{src}#L{line}" if line else ""
        try: obj = resolve(module, name)
        except Exception as e:
            print(f"docs: cannot import {q} ({type(e).__name__}: {e}); its entry has no signature", file=sys.stderr)
            obj = None
        self.entries[q] = (page, anchor)
        return dict(name=name, anchor=anchor, url=url, sig=signature_text(obj, name) if obj else f"{name}(...)",
                    doc=own_docstring(obj) if obj else "", rows=param_rows(obj) if obj else [])

    def entries_for(self, source, module, page):
        "API entries (HTML, markdown) for the public exported definitions of a cell, methods under their class."
        mod = f"{self.cfg['lib']}.{module}"
        res = []
        for nm, methods in cell_defs(source):
            if f"{mod}.{nm}" not in self.syms.get(mod, {}) or not is_public(nm): continue
            e = self.entry(mod, nm, page)
            subs = [self.entry(mod, m, page) for m in methods if f"{mod}.{m}" in self.syms[mod] and is_public(m)]
            e["also"] = [s["anchor"] for s in subs if s["name"].endswith(".__init__")]
            subs = [s for s in subs if not s["name"].endswith(".__init__")]
            h = entry_html(e).removesuffix("</div>") + "".join(entry_html(s, 4) for s in subs) + "</div>"
            res.append((h, "\n\n".join([entry_markdown(e)] + [entry_markdown(s, 4) for s in subs])))
        return res

    def cells(self, nb, page):
        "Two cell lists for a notebook, for its HTML page and its markdown twin; and the images it refers to."
        nbk = nbformat.read(nb, as_version=4)
        module = next((d["default_exp"] for c in nbk.cells if c.cell_type == "code"
                       for d in [directives(c.source)[0]] if d.get("default_exp")), None)
        html_cells, md_cells, images = [], [], []
        for c in nbk.cells:
            if c.cell_type == "markdown":
                html_cells.append(c); md_cells.append(c); images += image_paths(c.source); continue
            if c.cell_type != "code": continue
            d, body = directives(c.source)
            if "hide" in d or d.get("include") == "false" or not (body or c.outputs): continue
            kind = next((k for k in ("export", "exports", "exporti") if k in d), None)
            c.source = "" if d.get("echo") == "false" else body
            c.outputs = [] if d.get("output") == "false" or d.get("eval") == "false" else plain_outputs(c.outputs)
            if kind: c.metadata["docs_fold"] = "closed" if kind == "exporti" else "open"
            if not c.source and not c.outputs: continue
            html_cells.append(c); md_cells.append(c)
            if kind and kind != "exporti" and (module or d[kind]):
                for h, m in self.entries_for(body, d[kind] or module, page):
                    html_cells.append(nbformat.v4.new_raw_cell(h, metadata=_html))
                    md_cells.append(nbformat.v4.new_markdown_cell(m))
        return nbk, html_cells, md_cells, images, module

    def write(self, page, nbk, html_cells, md_cells, origin=""):
        "Write `page` and `page.md` from the processed cells, with the sidebar and pager."
        for i, c in enumerate(html_cells): c["id"] = f"c{i}"  # stable ids: the same page every build
        dest = self.out/page
        dest.parent.mkdir(parents=True, exist_ok=True)
        title = self.titles[page][0]
        docs = dict(css=CSS, nav=self.nav(page), pager=self.pager(page), header=origin)
        nbk = nbformat.from_dict({**nbk, "metadata": {k: v for k, v in nbk.get("metadata", {}).items()
                                                     if k != "widgets"}})  # no widget is live: no widget scripts
        body, _ = self.html.from_notebook_node(nbformat.from_dict({**nbk, "cells": html_cells}),
                                               resources=dict(docs=docs, metadata=dict(name=title)))
        dest.write_text(body)
        md_nb = nbformat.from_dict({**nbk, "cells": md_cells})
        md_nb.metadata["language_info"] = {"name": "python"}  # so code blocks are fenced as ```python
        text, res = self.md.from_notebook_node(md_nb, resources=dict(output_files_dir=f"{dest.stem}_files"))
        for name, data in res.get("outputs", {}).items():
            (dest.parent/name).parent.mkdir(parents=True, exist_ok=True)
            (dest.parent/name).write_bytes(data)
        dest.with_name(dest.name + ".md").write_text(text)

    def notebook_page(self, nb):
        "Render one notebook: its page, its markdown twin, and copies of the images its markdown shows."
        page = page_of(nb, self.root)
        nbk, html_cells, md_cells, images, module = self.cells(nb, page)
        links = self.links(page, f"{self.cfg['lib']}.{module}")
        for c in html_cells + md_cells:
            if c.cell_type == "markdown": c.source = linkify(c.source, links)
        rel = (NBS.relative_to(ROOT)/nb.relative_to(self.root)).as_posix()  # its place in the repository
        origin = (f'<div class="docs-origin">from <a href="{self.cfg["git_url"]}/blob/{self.cfg["branch"]}/{rel}">'
                  f"{html.escape(rel)}</a></div>")
        self.write(page, nbk, html_cells, md_cells, origin)
        for img in images:
            src, dest = nb.parent/img, (self.out/page).parent/img
            if src.is_file(): dest.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dest)
            else: print(f"docs: {rel} shows {img}, which does not exist", file=sys.stderr)

    def api_page(self):
        "`api.html`: each module's summary and its public exported symbols, each linked to its entry."
        parts = ["# API reference\n> Every public exported symbol, by module, linked to its entry in its notebook."]
        def order(mod): return self.pages.index(p) if (p := next(iter(self.syms[mod].values()))[0].split("#")[0]) \
            in self.pages else len(self.pages)
        for mod, syms in sorted(self.syms.items(), key=lambda kv: order(kv[0])):  # in the notebooks' order
            doc = (inspect.getdoc(importlib.import_module(mod)) or "").split("\n\n")[0]
            items = []
            for q in syms:
                short = q[len(mod)+1:]
                if not is_public(short): continue
                if q not in self.entries: items.append(f"<li><code>{short}</code> (no entry)</li>"); continue
                p, a = self.entries[q]
                summ = (own_docstring(resolve(mod, short)) or "").split("\n")[0]
                items.append(f'<li><a href="{p}#{a}"><code>{html.escape(short)}</code></a> '
                             f'<span class="api-summary">{_inline_html(summ) if summ else ""}</span></li>')
            page = self.syms[mod][next(iter(syms))][0].split("#")[0]
            parts.append(f'<h2 id="{mod}"><a href="{page}"><code>{mod}</code></a></h2>'
                         f'<p>{_inline_html(doc)}</p><ul class="api-list">{"".join(items)}</ul>')
        cells = [nbformat.v4.new_markdown_cell(parts[0])] + [
            nbformat.v4.new_raw_cell(f'<div class="jp-RenderedHTMLCommon">{p}</div>', metadata=_html)
            for p in parts[1:]]
        md = [nbformat.v4.new_markdown_cell(parts[0] + "\n\n" + "\n".join(
            f"- [`{q}`]({p}#{a})" for q, (p, a) in self.entries.items()))]
        self.write("api.html", nbformat.v4.new_notebook(), cells, md)

    def build(self):
        "Every page; returns `(pages, entries)` counts."
        if self.out.exists(): shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        for nb in self.nbs: self.notebook_page(nb)
        self.api_page()
        return len(self.pages), len(self.entries)

def missing_entries(site):
    "Public exported symbols that got no entry (defined in a cell nbdev does not document, say)."
    return [q for mod, syms in site.syms.items() for q in syms if is_public(q[len(mod)+1:]) and q not in site.entries]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT/"_docs"), help="folder to write the site to (emptied first)")
    ap.add_argument("--nbs", default=str(NBS), help="the notebooks (another copy of nbs/, executed, say)")
    opts = ap.parse_args()
    out = Path(opts.out).resolve()
    site = Site(out, Path(opts.nbs).resolve())
    pages, entries = site.build()
    for q in missing_entries(site): print(f"docs: {q} is exported but has no entry", file=sys.stderr)
    print(f"docs: {pages} pages and {entries} API entries in {out}; open {out/'index.html'}")
