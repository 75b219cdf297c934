"""JupyterLab in a real browser: the `ConfigForm` renders in headless Chromium, and what a person does in it (typing a
LoRA rank, choosing bits, ticking full_finetune) reaches the kernel, moves the memory estimate and, for a combination
that cannot work, shows the reason and disables Train.

The notebook is a small one this test writes (import the form, point it at the tiny model, show it; a cell that prints
what the kernel sees), not nbs/10_widgets.ipynb: that notebook quantizes models and measures activations for half a
minute before its form appears, holds many forms, and JupyterLab would save outputs into the source tree. The form
class, its widgets and its wiring are the same objects either way.

Needs Debian's Chromium and the `playwright` package (never `playwright install`):
    apt-get install -y chromium          # as root
    pip install playwright               # in the dev extra: pip install -e '.[dev]'
Everything the test starts (JupyterLab, the kernel, Chromium) is stopped at the end, on failure too; Jupyter's
config, data and runtime folders live in a temporary folder, so nothing in the home folder is touched."""
import json, os, re, secrets, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from helpers import ROOT
ARTIFACTS = ROOT/"tests"/"_artifacts"
CHROMIUM = Path(os.environ.get("QLORA_NB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL_HINT = ("Install them with `apt-get update && apt-get install -y chromium` (as root; Debian's package, never "
                "`playwright install`) and `pip install playwright` (part of the dev extra: `pip install -e '.[dev]'`); "
                "scripts/test.sh does both.")
STARTUP_S, KERNEL_S, UI_S = 60, 90, 30  # generous limits for a loaded 2-core machine; every wait ends on a condition

# ---------------------------------------------------------------------------------------------------------------------
# The notebook the browser opens

FORM_CELL = """\
import json, os
from qlora_nb.tiny import tiny_model_path
from qlora_nb.widgets import ConfigForm
form = ConfigForm()
form.set_values(dict(model_name_or_path=str(tiny_model_path()), source_max_len=64, target_max_len=32))
form"""

KERNEL_CELL = """\
print("KERNEL " + json.dumps(dict(pid=os.getpid(), lora_r=form.values["lora_r"], bits=form.values["bits"],
                                  full_finetune=form.values["full_finetune"], error=form.error,
                                  lora_weights=form.estimate["lora_weights"], linear_weights=form.estimate["linear_weights"])))"""

def write_notebook(path: Path):
    cell = lambda id, src: {"id": id, "cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}
    nb = {"cells": [cell("form", FORM_CELL), cell("kernel", KERNEL_CELL)], "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}}
    path.write_text(json.dumps(nb, indent=1))

# ---------------------------------------------------------------------------------------------------------------------
# Processes: JupyterLab (and the kernels it starts, each in its own session), stopped by pid

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def descendants(pid: int) -> set:
    "Pids of every live process below `pid` (kernels run in their own session, so a process group would miss them)."
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out: out.add(c); todo.append(c)
    return out

def alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except OSError: return False

def stop(pids, grace_s=10):
    "SIGTERM each pid, wait up to `grace_s` for all to end, then SIGKILL what is left."
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            if alive(p):
                try: os.kill(p, sig)
                except ProcessLookupError: pass
        deadline = time.monotonic() + grace_s
        while any(alive(p) for p in pids) and time.monotonic() < deadline: time.sleep(0.1)
    return [p for p in pids if alive(p)]

def jupyter_env(tmp: Path) -> dict:
    "The environment of JupyterLab and its kernels: Jupyter's and IPython's folders in `tmp`, everything offline."
    from qlora_nb.files import cache_dir  # the tiny model is the project's shared fixture: reuse its cache
    dirs = {k: tmp/k.lower() for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR")}
    for d in dirs.values(): d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "HOME": str(tmp/"home"), "QLORA_NB_CACHE": str(cache_dir()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("JUPYTER_PATH", None)
    (tmp/"home").mkdir(exist_ok=True)
    return env

def lab_settings(config_dir: Path):
    "No news or update toasts over the page, and every cell attached to the DOM (no virtual scrolling)."
    settings = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
                "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}
    for plugin, values in settings.items():
        package, name = plugin.rsplit("/", 1)
        f = config_dir/"lab"/"user-settings"/package/f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(values))

def wait_for_server(url: str, proc, log: Path):
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None: pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.2)  # polling a condition (the server answers), not a fixed wait
    pytest.fail(f"JupyterLab did not answer {url.split('?')[0]} within {STARTUP_S}s:\n{log.read_text()[-3000:]}")

@pytest.fixture
def browser_tools():
    "Playwright's sync API and Chromium's path; a clear failure saying how to install them when they are missing."
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.fail(f"The browser test needs the `playwright` Python package. {INSTALL_HINT}")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"The browser test needs Chromium at {CHROMIUM} (or set QLORA_NB_CHROMIUM). {INSTALL_HINT}")
    return sync_playwright

@pytest.fixture
def jupyterlab(tmp_path):
    "A JupyterLab server on 127.0.0.1 serving `tmp_path/work` with a token; yields (base url, token, work folder, pids to stop)."
    work, port, token = tmp_path/"work", free_port(), secrets.token_hex(16)
    work.mkdir()
    env = jupyter_env(tmp_path/"jupyter")
    lab_settings(Path(env["JUPYTER_CONFIG_DIR"]))
    log = tmp_path/"jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--allow-root", "--ip", "127.0.0.1", "--no-browser", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--ServerApp.shutdown_no_activity_timeout=600"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    started = {proc.pid}
    try:
        wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, work, started
    finally:
        started |= descendants(proc.pid)  # the kernels, while the server still holds them
        try:  # a clean shutdown stops the kernels and removes their connection files
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"), timeout=5)
            proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired): pass
        left = stop(sorted(started))
        proc.poll()
        assert not left, f"processes still running after the test: {left}"

# ---------------------------------------------------------------------------------------------------------------------
# Reading and driving the page

def widget_row(page, description: str, kind: str):
    "The widget whose description label is exactly `description`; kind: number (input), select, checkbox."
    label = re.compile(rf"^\s*{re.escape(description)}\s*$")
    if kind == "checkbox":
        return page.locator(".widget-checkbox").filter(has=page.locator("span", has_text=label)).locator("input[type=checkbox]")
    box = page.locator(".widget-inline-hbox").filter(has=page.locator("label.widget-label", has_text=label))
    return box.locator("input" if kind == "number" else "select")

def open_tab(page, title: str):
    page.locator(".widget-tab .lm-TabBar-tab", has_text=re.compile(rf"^\s*{re.escape(title)}\s*$")).click()

def estimate_cell(page, label: str):
    "The table cell showing the size of one component of the memory estimate, e.g. '1.50 KiB'."
    row = page.locator(".widget-html table tr", has=page.locator("td", has_text=re.compile(rf"^{re.escape(label)}$")))
    return row.locator("td").nth(1)

def estimate_row(page, label: str) -> float:
    "The size the memory estimate shows for one component, in bytes."
    return as_bytes(estimate_cell(page, label).inner_text().strip())

def field_help() -> dict:
    "Each setting's help text, from the dataclasses (what the form's hover text must say)."
    import dataclasses
    from qlora_nb.config import ARG_CLASSES
    return {f.name: f.metadata.get("help", "") for cls in ARG_CLASSES for f in dataclasses.fields(cls)}

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}

def as_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]

def kernel_idle(page):
    page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return !!k && k.status === 'idle'; }""", timeout=KERNEL_S * 1000)

def execution_count(cell) -> str:
    "The cell's prompt: '[3]:' once run, '[*]:' while running, '[ ]:' never run."
    return cell.locator(".jp-InputArea-prompt").inner_text().strip()

def kernel_sees(page) -> dict:
    "Run the second cell from the keyboard (click into it, Ctrl+Enter) and read what the kernel printed."
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    before = execution_count(cell)
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+Enter")
    # done when the prompt shows a new execution count (not '*'), and the output is the KERNEL line
    page.wait_for_function("""([cell, before]) => { const p = cell.querySelector('.jp-InputArea-prompt').innerText.trim();
        const o = cell.querySelector('.jp-OutputArea-output');
        return /\\[\\d+\\]/.test(p) && p !== before && !!o && o.innerText.includes('KERNEL '); }""",
        arg=[cell.element_handle(), before], timeout=KERNEL_S * 1000)
    return json.loads(cell.locator(".jp-OutputArea-output").inner_text().split("KERNEL ", 1)[1])

# ---------------------------------------------------------------------------------------------------------------------

def test_config_form_in_jupyterlab(browser_tools, jupyterlab):
    base, token, work, started = jupyterlab
    help_text = field_help()
    write_notebook(work/"form.ipynb")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import expect
    expect.set_options(timeout=UI_S * 1000)
    with browser_tools() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS, chromium_sandbox=False)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(UI_S * 1000)
        try:
            page.goto(f"{base}/lab/tree/form.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=STARTUP_S * 1000)
            kernel_idle(page)
            page.locator(".jp-Notebook .jp-Cell").nth(0).locator(".cm-content").click()
            page.keyboard.press("Control+Enter")  # run the form cell

            # the form renders, with an estimate for the tiny model and a valid configuration
            memory = page.locator(".widget-html", has_text="total")
            expect(memory).to_contain_text("4-bit, r=64", timeout=KERNEL_S * 1000)
            train = page.locator("button.widget-button", has_text=re.compile(r"^\W*Train$"))  # after the play icon
            expect(train).to_be_enabled()
            first = kernel_sees(page)
            assert (first["lora_r"], first["bits"], first["full_finetune"], first["error"]) == (64, 4, False, None), first
            started.add(first["pid"])
            lora64, linear4 = estimate_row(page, "LoRA adapters"), estimate_row(page, "base model: linear layers")

            # lora_r 64 -> 8, typed into the number box of the LoRA tab (Enter commits it, as a person would)
            open_tab(page, "LoRA")
            rank = widget_row(page, "lora_r", "number")
            rank.fill("8"); rank.press("Enter")
            expect(memory).to_contain_text("4-bit, r=8")
            lora8 = estimate_row(page, "LoRA adapters")
            assert abs(lora64 / lora8 - 8) < 0.05, (lora64, lora8)  # adapters have r * (in + out) weights each

            # bits 4 -> 16 in the dropdown of the first tab: the frozen linear layers grow (4.x -> 16 bits per weight)
            open_tab(page, "Model & quantization")
            for name in ("model_name_or_path", "bits", "full_finetune", "max_memory_MB"):  # text, dropdown, checkbox, number
                expect(page.get_by_title(help_text[name], exact=True).filter(has_text=re.compile(rf"^{name}$")).first).to_be_visible()
            widget_row(page, "bits", "select").select_option(label="16")
            expect(memory).to_contain_text("16-bit, r=8")
            linear16 = estimate_row(page, "base model: linear layers")
            assert linear16 > 2 * linear4, (linear4, linear16)
            assert estimate_row(page, "LoRA adapters") == lora8
            expect(train).to_be_enabled()

            seen = kernel_sees(page)
            assert (seen["lora_r"], seen["bits"], seen["error"]) == (8, 16, None), seen
            assert seen["lora_weights"] * 8 == first["lora_weights"], (seen, first)
            assert abs(estimate_row(page, "base model: linear layers") / seen["linear_weights"] - 1) < 0.01

            # full_finetune is fine at 16 bits; back at 4 bits it cannot work: the message says why, Train is disabled
            widget_row(page, "full_finetune", "checkbox").check()
            expect(estimate_cell(page, "LoRA adapters")).to_have_text("0 B")  # every weight is trained, no adapters
            expect(train).to_be_enabled()
            widget_row(page, "bits", "select").select_option(label="4")
            message = page.locator(".widget-html", has_text="Cannot train")
            expect(message).to_contain_text("use --bits 16 or --bits 32")
            expect(train).to_be_disabled()
            invalid = kernel_sees(page)
            assert (invalid["bits"], invalid["full_finetune"]) == (4, True) and "use --bits 16" in invalid["error"], invalid
            page.screenshot(path=str(ARTIFACTS/"browser_config_form.png"), full_page=True)

            # and fixing it clears the message and enables Train again
            widget_row(page, "full_finetune", "checkbox").uncheck()
            expect(message).to_have_count(0)
            expect(train).to_be_enabled()
        except Exception:
            try:
                page.screenshot(path=str(ARTIFACTS/"browser_failure.png"), full_page=True)
                (ARTIFACTS/"browser_failure.html").write_text(page.content())
            except Exception: pass
            raise
        finally:
            browser.close()
