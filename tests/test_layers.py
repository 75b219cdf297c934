"""The package's imports flow one way: config -> model -> data -> evaluation -> training -> face (DESIGN.md), and the
product never imports the test fixtures. Read from the exported modules' source (every import statement, also those
inside functions), so a new module must be placed in LAYERS before it can land."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]/"qlora_nb"

# a module may import only modules of a lower layer; modules of one layer do not import each other
LAYERS = [
    {"checks", "files"},                 # what flags are checked against before anything heavy; the file helpers
    {"sources"},                         # where a base model comes from: a .gguf file converted once, get-model
    {"config"},                          # every setting of a run
    {"quant"}, {"lora"}, {"model"},      # the model side: 4-bit loading, adapters, the assembled model
    {"formatters"}, {"templates"}, {"data"},  # the data side: record formats, chat templates, token ids
    {"mmlu"},                            # evaluation
    {"label_loss", "predict"}, {"train"},  # training
    {"chat", "merge"},                   # after training: talk to the result, merge it into a standalone model
    {"memory", "tiny"},                  # the face: the memory plan; tiny builds the demo's model and the test fixtures
    {"plots"}, {"widgets", "demo"}, {"real_demo"}, {"cli", "testing"},  # real_demo: the README demo on SmolLM2
]
FIXTURES = {"tiny", "testing"}  # what tests stand on
MAY_IMPORT_FIXTURES = {"demo", "testing"}  # the demo runs on a tiny model it builds; test helpers build on fixtures


def rank(module: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) if module in layer]
    assert found, f"qlora_nb.{module} is in no layer of tests/test_layers.py: add it where its imports put it"
    return found[0]


def internal_imports(path: Path) -> set:
    "The qlora_nb modules that `path` imports anywhere in its source."
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1: base = f"qlora_nb.{base}" if base else "qlora_nb"
            if base == "qlora_nb": names |= {f"qlora_nb.{a.name}" for a in node.names}
            elif base.startswith("qlora_nb."): names.add(base)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("qlora_nb.")}
    return {n.split(".")[1] for n in names} & {p.stem for p in PACKAGE.glob("*.py")}


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("module", MODULES)
def test_imports_flow_one_way(module):
    wrong = {m for m in internal_imports(PACKAGE/f"{module}.py") if rank(m) >= rank(module)}
    assert not wrong, f"qlora_nb.{module} (layer {rank(module)}) imports {sorted(wrong)}, which are not below it"


@pytest.mark.parametrize("module", [m for m in MODULES if m not in MAY_IMPORT_FIXTURES])
def test_the_product_does_not_import_the_fixtures(module):
    assert not internal_imports(PACKAGE/f"{module}.py") & FIXTURES, f"qlora_nb.{module} imports a test fixture"


def test_the_checks_can_fail(tmp_path):
    bad = tmp_path/"bad.py"
    bad.write_text("from .train import train\ndef f():\n    from qlora_nb.tiny import tiny_model_path\n    import qlora_nb.cli\n")
    assert internal_imports(bad) == {"train", "tiny", "cli"}
