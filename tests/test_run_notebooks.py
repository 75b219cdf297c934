"""scripts/run_notebooks.py writes the notebooks' outputs with three names that nbdev and ipywidgets keep private:
`nbdev.test._skip_cell` (which cells nbdev-test skips), `nbdev.clean._nbdev_clean` (nbdev-clean on a notebook in
memory) and `ipywidgets.widgets.widget._instances` (the live widgets, to draw a displayed one's picture). No release
promises them, so each is pinned here by what the script needs it to do: a release that renames or changes one fails
this test, with the name, instead of the script failing later or writing notebooks without their pictures."""
import json

import pytest

from helpers import ROOT


def code(source: str, **extra) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": f"c{abs(hash(source)) % 10**6}", "metadata": {},
            "outputs": [], "source": source} | extra


def test_skip_cell_skips_what_nbdev_test_skips():
    try: from nbdev.test import _skip_cell
    except ImportError as e: pytest.fail(f"nbdev.test._skip_cell is gone ({e}): scripts/run_notebooks.py needs another "
                                         "way to skip the cells nbdev-test skips")
    from fastcore.nbio import dict2nb
    from nbdev.process import NBProcessor
    raw = {"cells": [code("x = 1"), code("#| eval: false\nx = 2"), code("#| slow\nx = 3")], "metadata": {},
           "nbformat": 4, "nbformat_minor": 5}
    nb = NBProcessor(nb=dict2nb(raw), rm_directives=False, process=True).nb
    assert [bool(_skip_cell(nb, ["slow"], [])(c)) for c in nb.cells] == [False, True, True]
    assert [bool(_skip_cell(nb, ["slow"], ["slow"])(c)) for c in nb.cells] == [False, True, False]  # --flags slow


def test_nbdev_clean_cleans_a_notebook_in_memory():
    try: from nbdev.clean import _nbdev_clean
    except ImportError as e: pytest.fail(f"nbdev.clean._nbdev_clean is gone ({e}): scripts/run_notebooks.py needs another "
                                         "way to run nbdev-clean on the notebook it writes")
    from fastcore.xtras import working_directory
    result = {"output_type": "execute_result", "execution_count": 7, "data": {"text/plain": "1"}, "metadata": {}}
    raw = {"cells": [code("x = 1", execution_count=7, metadata={"scrolled": True}, outputs=[result])],
           "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
           "nbformat": 4, "nbformat_minor": 5}
    with working_directory(ROOT): _nbdev_clean(raw)  # the project's settings (clean_ids)
    cell = raw["cells"][0]
    assert cell["execution_count"] is None and cell["metadata"] == {}, json.dumps(raw)
    assert cell["outputs"][0]["execution_count"] is None and cell["outputs"][0]["data"] == {"text/plain": "1"}


def test_ipywidgets_keeps_its_live_widgets_by_model_id():
    try: from ipywidgets.widgets.widget import _instances
    except ImportError as e: pytest.fail(f"ipywidgets.widgets.widget._instances is gone ({e}): scripts/run_notebooks.py "
                                         "cannot find a displayed widget to draw its picture")
    import ipywidgets as widgets
    w = widgets.IntSlider(value=3)
    assert _instances.get(w.model_id) is w
