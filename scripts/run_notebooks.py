"""Run the notebooks in fresh kernels and write their outputs back, without this machine's noise.

    python scripts/run_notebooks.py                      # every notebook under nbs/, two at a time
    python scripts/run_notebooks.py nbs/02_quant.ipynb   # one notebook (or several)
    python scripts/run_notebooks.py --check              # CI: runs nothing; fails where outputs are missing or noisy

Each notebook runs top to bottom in a fresh Python (execnb's CaptureShell, the shell nbdev-test uses), from its own
folder, and skips the cells nbdev-test skips (`#| eval: false`, and the `tst_flags` of pyproject.toml: `#| cuda`,
`#| slow`, `#| notest`, unless named in --flags); a skipped cell keeps the outputs it has. A notebook that fails is
not written. The outputs are then scrubbed so that a run elsewhere gives a small diff: progress bars, timings, this
machine's paths (the checkout, home, temporary folders, site-packages), object addresses and the warnings' file:line
are replaced by stable placeholders; a displayed widget keeps its read-only HTML picture
(`qlora_nb.pictures.widget_html`) instead of a view that needs a kernel; and `nbdev-clean` runs on the result.
"""
import argparse, ast, json, os, re, site, socket, subprocess, sys, sysconfig, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# ---------------------------------------------------------------------------------------------------- scrubbing
def _machine_paths() -> list:
    "(path, placeholder) pairs for this machine, longest first so that the checkout wins over home."
    home = str(Path.home())
    pairs = [(p, "<site-packages>") for p in {*site.getsitepackages(), site.getusersitepackages(),
                                             sysconfig.get_paths()["purelib"]} if p and p.endswith("site-packages")]
    pairs += [(sysconfig.get_paths()["stdlib"], "<python>"), (str(ROOT), "<repo>"),
              (os.environ.get("QLORA_NB_CACHE", ""), "~/.cache/qlora_nb"),
              (os.environ.get("HF_HOME", ""), "~/.cache/huggingface"), (home, "~")]
    pairs = [(p.rstrip("/"), ph) for p, ph in pairs if p and p.rstrip("/") not in ("", "/")]
    return sorted(pairs, key=lambda t: -len(t[0]))

_TMP = re.escape(tempfile.gettempdir().rstrip("/"))
_TMP_RE = re.compile(rf"(?<![\w./-])(?:{_TMP}|/tmp)/[^/\s'\"<>),:;\]]+")  # a folder in the temporary directory
_WARNING_RE = re.compile(r"^\S+?:\d+: (\w*Warning): ", re.M)   # `file.py:123: FutureWarning: ...`
# tqdm's bars: `desc: 50%|##   | 1/2 [00:12<00:12, 1.2s/it]`, or `desc: 16 examples [00:00, 1857 examples/s]`
_BAR_RE = re.compile(r"\d+%\|.*\||\[\d\d:\d\d(?::\d\d)?(?:<|, )|\d+(?:\.\d+)?\s?(?:it/s|s/it)\b")
_BAR_SEGMENT = re.compile(r"^[^\n]*?\[\d\d:\d\d(?::\d\d)?(?:<|, )[^\]\n]*\]")
_TIMINGS = [  # (pattern, replacement): a number of seconds (or a rate) becomes "…"
    (re.compile(r"\b(in|took|after|elapsed|time:|Wall time:|runtime:?)(\s+)\d+(?:\.\d+)?(\s?)"
                r"(ms|µs|us|ns|s|secs?|seconds?|min|minutes?)\b"), r"\1\2…\3\4"),
    (re.compile(r"\d+(?:\.\d+)?(\s?)(it/s|s/it|samples/s|steps/s|tokens/s|tok/s)\b"), r"…\1\2"),
    (re.compile(r"(\w*(?:_runtime|_per_second)['\"]?\s*[:=]\s*['\"]?)[\d:.]+(?:e[-+]?\d+)?"), r"\1…"),  # Trainer's
    (re.compile(r"(CPU times: ).*"), r"\1…"),
]
_ADDRESS = [(re.compile(r" at 0x[0-9a-fA-F]+"), ""), (re.compile(r"\b0x[0-9a-fA-F]{9,}\b"), "0x…")]
_DATES = [(re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[+-]\d{2}:?\d{2}|Z)?"), "<time>"),
          (re.compile(r"\b[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}\b"), "<time>")]  # tensorboard's run folder names

class Scrubber:
    "Replaces what differs between machines and runs; temporary folders are numbered in order of appearance."
    def __init__(self):
        self.paths, self.tmps = _machine_paths(), {}
        self.host = socket.gethostname()

    def _tmp(self, m) -> str: return self.tmps.setdefault(m.group(0), f"<tmp{len(self.tmps) + 1}>")

    def text(self, s: str, html: bool = False) -> str:
        "`s` with paths, timings, addresses and dates replaced (escaped placeholders in HTML)."
        for p, ph in self.paths: s = re.sub(re.escape(p) + r"(?=[/\s'\"<>),:;\]]|$)", ph, s, flags=re.M)
        s = _TMP_RE.sub(self._tmp, s)
        if len(self.host) > 3: s = re.sub(rf"\b{re.escape(self.host)}\b", "<host>", s)
        for rx, rep in _TIMINGS + _ADDRESS + _DATES: s = rx.sub(rep, s)
        return re.sub(r"<(repo|python|site-packages|tmp\d+|host|time)>", r"&lt;\1&gt;", s) if html else s

    def stream(self, s: str) -> str:
        "A stdout/stderr text as a terminal would leave it (a \\r rewrites its line), without progress bars."
        lines, out, after_warning = s.split("\n"), [], False
        for line in lines:
            line = line.rsplit("\r", 1)[-1]
            if _BAR_SEGMENT.search(line) or re.search(r"\d+%\|.*\|", line):  # a bar: what follows it (a warning) stays
                line = _BAR_SEGMENT.sub("", line)
                if not line.strip() or re.search(r"\d+%\|.*\|", line): continue
            if after_warning and line.startswith("  "): after_warning = False; continue  # the warning's source line
            after_warning = bool(_WARNING_RE.match(line))
            out.append(_WARNING_RE.sub(r"\1: ", line))
        return self.text("\n".join(out))

def _lines(v) -> str: return "".join(v) if isinstance(v, list) else v

def scrub_outputs(outputs: list, scrub: Scrubber) -> list:
    "The outputs of one cell, scrubbed; a stream left empty is dropped."
    res = []
    for o in outputs:
        if o["output_type"] == "stream":
            text = scrub.stream(_lines(o["text"]))
            if text.strip(): res.append({**o, "text": text.splitlines(True)})
            continue
        if o["output_type"] == "error":
            o = {**o, "traceback": [scrub.text(t) for t in o["traceback"]], "evalue": scrub.text(o["evalue"])}
        if "data" in o:
            o = {**o, "data": {k: (scrub.text(_lines(v), html=k == "text/html").splitlines(True)
                                   if k.startswith("text/") else v) for k, v in o["data"].items()}}
        res.append(o)
    return res

# ---------------------------------------------------------------------------------------------------- executing
def _widget_picture(outputs: list) -> list:
    "Displayed widgets as their read-only HTML picture, drawn now from the widget's state (a view needs a kernel)."
    res = []
    for o in outputs:
        data = o.get("data", {})
        if WIDGET_VIEW in data:
            data = {k: v for k, v in data.items() if k != WIDGET_VIEW}
            if "text/html" not in data:  # ipywidgets' private registry of live widgets (tests/test_run_notebooks.py pins it)
                from ipywidgets.widgets.widget import _instances
                from qlora_nb.pictures import widget_html
                w = _instances.get(o["data"][WIDGET_VIEW]["model_id"])
                if w is not None: data["text/html"] = widget_html(w).splitlines(True)
            o = {**o, "data": data}
        res.append(o)
    return res

def execute(src: Path, dest: Path, force_flags: list) -> int:
    "Run notebook `src` in this (fresh) Python and write it with its outputs to `dest`; 1 when a cell fails."
    from execnb.shell import CaptureShell
    from fastcore.nbio import dict2nb, write_nb
    from fastcore.xtras import working_directory
    from nbdev.clean import _nbdev_clean
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    cfg, text = get_config(ROOT), src.read_text(encoding="utf-8")  # the project's tst_flags, wherever `src` is
    sys.path.insert(0, str(cfg.config_path))
    raw = json.loads(text)
    nb = NBProcessor(nb=dict2nb(json.loads(text)), rm_directives=False, process=True).nb
    skip = _skip_cell(nb, cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else cfg.tst_flags, force_flags)
    ran = [c.cell_type == "code" and not skip(c) for c in nb.cells]
    assert len(ran) == len(raw["cells"]), "nbdev's reading of the notebook has other cells than its JSON"
    def postproc(cell): cell.outputs = _widget_picture(json.loads(json.dumps(cell.outputs)))
    shell = CaptureShell(src, mpl_format="png")  # png, not retina: nbdev-clean drops the size a retina image needs
    try:
        with working_directory(src.parent):
            shell.run_all(nb, exc_stop=True, preproc=skip, postproc=postproc, cell_timeout=cfg.cell_timeout or None)
    except BaseException:
        sys.stderr.write(shell.prettytb(fname=src) or "failed\n"); return 1
    if os.environ.get("RUN_NOTEBOOKS_RAW"):  # to see what the scrubbing removes
        Path(os.environ["RUN_NOTEBOOKS_RAW"]).write_text(json.dumps([c.get("outputs", []) for c in nb.cells], indent=1))
    scrub = Scrubber()
    for rc, c, r in zip(raw["cells"], nb.cells, ran):
        if r: rc["outputs"], rc["execution_count"] = scrub_outputs(c.outputs, scrub), None
    if dest.resolve() == src.resolve() and src.read_text(encoding="utf-8") != text:
        sys.stderr.write(f"{src} changed while it ran; not written: run it again\n"); return 1
    with working_directory(ROOT): _nbdev_clean(raw)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_nb(raw, dest)
    return 0

# ---------------------------------------------------------------------------------------------------- checking
_SHOWS = {"print", "display", "show_doc", "pprint", "HTML", "Markdown"}  # calls that surely show something

def _call_name(node) -> str:
    f = node.func if isinstance(node, ast.Call) else None
    if isinstance(f, ast.Attribute) and f.attr == "show" and isinstance(f.value, ast.Name) and f.value.id == "plt":
        return "show"  # plt.show()
    return f.id if isinstance(f, ast.Name) else ""

def _to_stdout(call) -> bool:
    "A print to the cell's output, not to a file."
    kw = next((k.value for k in call.keywords if k.arg == "file"), None)
    return kw is None or isinstance(kw, ast.Attribute) and kw.attr in ("stdout", "stderr")

def _unconditional_calls(stmts):
    "The calls that `stmts` surely run: not in a def, a class, a lambda, or a branch of an if/try/while."
    for s in stmts:
        if isinstance(s, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)): yield from _unconditional_calls(s.body)
        if not isinstance(s, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)): continue
        todo = [s]
        while todo:
            n = todo.pop()
            if isinstance(n, (ast.Lambda, ast.IfExp, ast.BoolOp, ast.comprehension)): continue
            if isinstance(n, ast.Call): yield n
            todo.extend(ast.iter_child_nodes(n))

def shows_something(source: str) -> bool:
    "Whether a code cell surely shows something: it ends in an expression (no `;`) that is not a call, or in a call"
    "that shows (HTML(...), display(...)), or it surely runs print/display/show_doc/plt.show. A call whose value is"
    "unknown (`check(x)` may return None) is not judged, nor is a cell with a magic or a shell escape."
    code = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith("#|"))
    if re.search(r"^\s*[%!]", code, re.M): return False
    try: tree = ast.parse(code)
    except SyntaxError: return False
    if not tree.body: return False
    last = tree.body[-1]
    if isinstance(last, ast.Expr) and not code.rstrip().endswith(";"):
        v = last.value
        if not isinstance(v, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)) and not (
            isinstance(v, ast.Constant) and v.value is None): return True
    return any(_call_name(c) in _SHOWS and _to_stdout(c) for c in _unconditional_calls(tree.body))

def _noise(text: str, scrub: Scrubber) -> str | None:
    "What in an output's text a run of this script would have removed, or None."
    for p, ph in scrub.paths:
        if re.search(re.escape(p) + r"(?=[/\s'\"<>),:;\]]|$)", text, re.M): return f"a path of this machine ({p})"
    m = (re.search(r"(?:/home/|/Users/|/root/|/site-packages/|/tmp/tmp\w{8})\S*", text) or _BAR_RE.search(text)
         or re.search(r" at 0x[0-9a-fA-F]+|\r", text))
    return None if m is None else f"{m.group(0).strip()[:60]!r}"

def check(path: Path) -> list:
    "Problems of one notebook's committed outputs: a cell that shows something without output, noise in an output."
    from fastcore.nbio import dict2nb
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    cfg, raw = get_config(ROOT), json.loads(path.read_text(encoding="utf-8"))
    nb = NBProcessor(nb=dict2nb(json.loads(json.dumps(raw))), rm_directives=False, process=True).nb
    skip, scrub, problems = _skip_cell(nb, cfg.tst_flags.split(), []), Scrubber(), []
    for i, (rc, c) in enumerate(zip(raw["cells"], nb.cells)):
        if c.cell_type != "code": continue
        where = f"{_rel(path)} cell {i} ({rc.get('id', '?')})"
        if not skip(c) and shows_something(_lines(rc["source"])) and not rc.get("outputs"):
            problems.append(f"{where}: shows something but has no output")
        for o in rc.get("outputs", []):
            if WIDGET_VIEW in o.get("data", {}): problems.append(f"{where}: a widget view (it needs a kernel)")
            data = o.get("data", {})
            texts = [_lines(o.get("text", ""))] + [_lines(v) for k, v in data.items() if k.startswith("text/")]
            if (why := next(filter(None, (_noise(t, scrub) for t in texts)), None)):
                problems.append(f"{where}: an output holds {why}")
    return problems

# ---------------------------------------------------------------------------------------------------- command line
def _rel(p: Path) -> str:
    try: return str(p.resolve().relative_to(ROOT))
    except ValueError: return str(p)

def notebooks(paths: list) -> list:
    "The notebooks named (files or folders), or all of nbs/ as nbdev-test finds them."
    from nbdev.doclinks import nbglob
    from nbdev.config import get_config
    if not paths: return [Path(p) for p in nbglob(get_config().nbs_path, as_path=True)]
    return sorted(p for a in map(Path, paths) for p in ([a] if a.is_file() else nbglob(a, as_path=True)))

def run_one(nb: Path, out: Path | None, flags: str, timeout: int) -> tuple:
    "Execute `nb` in a fresh Python; (notebook, seconds, return code, its stderr's end)."
    dest = nb if out is None else out/(_rel(nb) if not Path(_rel(nb)).is_absolute() else nb.name)
    env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MPLBACKEND", None)  # the notebook's own inline backend, as in Jupyter
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, __file__, "--_execute", str(nb.resolve()), str(dest.resolve()), flags],
                           env=env, capture_output=True, text=True, timeout=timeout, cwd=nb.parent)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired: rc, err = 124, f"timed out after {timeout} s"
    return nb, time.time() - t0, rc, err[-3000:]

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks or folders (default: every notebook under nbs/)")
    ap.add_argument("--check", action="store_true", help="run nothing: check the committed outputs (for CI)")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("NBDEV_WORKERS", 2)), help="notebooks at a time")
    ap.add_argument("--out", type=Path, help="write the executed notebooks under this folder instead of in place")
    ap.add_argument("--flags", default="", help="skip flags to run anyway, e.g. 'cuda slow' on a GPU machine")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one notebook may take")
    ap.add_argument("--_execute", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._execute:
        src, dest, flags = a._execute
        return execute(Path(src), Path(dest), flags.split())
    nbs = notebooks(a.notebooks)
    if a.check:
        problems = [p for nb in nbs for p in check(nb)]
        for p in problems[:200]: print(p)
        if problems:
            print(f"FAILED: {len(problems)} problem(s) in the notebooks' outputs; refresh them with "
                  "`python scripts/run_notebooks.py [NOTEBOOK ...]` and commit the result")
            return 1
        print(f"outputs of {len(nbs)} notebooks: complete, no machine paths or progress bars"); return 0
    t0, failed = time.time(), []
    with ThreadPoolExecutor(max(1, a.workers)) as pool:
        for nb, secs, rc, err in pool.map(lambda nb: run_one(nb, a.out, a.flags, a.timeout), nbs):
            print(f"{_rel(nb)}: {'ok' if rc == 0 else 'FAILED'} in {secs:.0f} s", flush=True)
            if rc: failed.append(nb); print(err, file=sys.stderr)
    print(f"{len(nbs) - len(failed)} of {len(nbs)} notebooks written in {time.time() - t0:.0f} s"
          + (f"; failed: {' '.join(map(_rel, failed))}" if failed else ""))
    return 1 if failed else 0

if __name__ == "__main__": sys.exit(main())
