"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which cannot be installed here).

`python scripts/make_readme.py` writes it; `--check` exits 1 when README.md disagrees with the notebook."""
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent
_directive = re.compile(r"^\s*#\s*\|.*$\n?", re.MULTILINE)
# a relative image link (`![..](images/x.svg)`, `<img src="images/x.svg">`) points into nbs/; README.md is one level up
_image = re.compile(r"""(!\[[^\]]*\]\(|<img\b[^>]*\bsrc=["'])(?![a-z][a-z0-9+.-]*:|/|#)""", re.IGNORECASE)

def from_root(markdown: str) -> str:
    "`markdown` of a notebook in nbs/ with its relative image links made relative to the repository root."
    return _image.sub(lambda m: m.group(1) + "nbs/", markdown)

def render(nb_path=ROOT/"nbs"/"index.ipynb"):
    "README text: markdown cells and code cells of the index notebook, without nbdev directives or hidden cells."
    nb = nbformat.read(nb_path, as_version=4)
    keep = []
    for cell in nb.cells:
        if cell.cell_type == "code" and re.search(r"^\s*#\s*\|\s*hide\b", cell.source, re.MULTILINE): continue
        cell.source = _directive.sub("", cell.source).strip("\n")
        if cell.cell_type == "code": cell.outputs = []
        else: cell.source = from_root(cell.source)
        keep.append(cell)
    nb.cells = keep
    body, _ = MarkdownExporter().from_notebook_node(nb)
    note = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file. -->\n\n"
    return note + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"

if __name__ == "__main__":
    want, readme = render(), ROOT/"README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != want:
            sys.exit("README.md disagrees with nbs/index.ipynb: run `python scripts/make_readme.py` and commit README.md")
        print("README.md agrees with nbs/index.ipynb")
    else:
        readme.write_text(want); print(f"wrote {readme}")
