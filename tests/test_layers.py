"""The package's imports flow one way: config -> model -> data -> evaluation -> training -> face, and the product never
imports the test fixtures. The layers are declared once, as import-linter contracts in pyproject.toml's
[tool.importlinter] (the architecture page, nbs/98_architecture.ipynb, draws them); these tests run `lint-imports` on
the package, and show that the contracts catch each kind of mistake on a copy of it."""
import shutil, subprocess, sys, tomllib
from pathlib import Path

import pytest

from helpers import ROOT
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    "`lint-imports` on the package in `root`, with the contracts of its pyproject.toml (no cache left behind)."
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT.parent), "PYTHONPATH": str(root)})


def test_the_package_keeps_its_contracts():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout, done.stdout


@pytest.fixture
def copy(tmp_path):
    "A copy of the package and its contracts, to break."
    shutil.copytree(ROOT/"qlora_nb", tmp_path/"qlora_nb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT/"pyproject.toml", tmp_path)
    return tmp_path


def broken(root: Path, module: str, source: str) -> str:
    "What lint-imports says once `source` is appended to qlora_nb/`module`.py; it must fail."
    path = root/"qlora_nb"/f"{module}.py"
    path.write_text(path.read_text() + "\n" + source + "\n")
    done = lint(root)
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout


def test_an_import_up_a_layer_breaks_it_even_inside_a_function(copy):
    said = broken(copy, "quant", "def _later():\n    from qlora_nb.train import train")
    assert "imports flow one way: config -> model -> data -> evaluation -> training -> face BROKEN" in said
    assert "qlora_nb.quant is not allowed to import qlora_nb.train" in said and "1 kept, 1 broken" in said


def test_siblings_of_one_layer_do_not_import_each_other(copy):
    said = broken(copy, "chat", "from . import merge")
    assert "qlora_nb.chat is not allowed to import qlora_nb.merge" in said and "1 kept, 1 broken" in said


def test_the_product_importing_a_fixture_breaks_it(copy):
    said = broken(copy, "plots", "from .tiny import tiny_model_path")  # plots sits above tiny: only this contract
    assert "the product never imports the test fixtures BROKEN" in said and "1 kept, 1 broken" in said
    assert "qlora_nb.plots is not allowed to import qlora_nb.tiny" in said


def test_a_new_module_must_be_placed(copy):
    (copy/"qlora_nb"/"newthing.py").write_text("from .checks import require\n")
    done = lint(copy)
    assert done.returncode == 1 and "qlora_nb.newthing" in done.stdout, done.stdout


def test_every_product_module_is_held_to_the_fixtures_contract():
    contracts = tomllib.loads((ROOT/"pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    fixtures = next(c for c in contracts if c["id"] == "fixtures")
    stand_on_them = {"tiny", "testing", "demo"}  # the fixtures themselves, and the tiny demo built on them
    modules = {p.stem for p in (ROOT/"qlora_nb").glob("*.py") if not p.stem.startswith("_")} - stand_on_them
    assert modules == {m.removeprefix("qlora_nb.") for m in fixtures["source_modules"]}
