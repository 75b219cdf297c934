"""The lock files agree with what they are made from (pyproject.toml, requirements/tools.in): every direct requirement
is pinned inside its range, every pin is an exact `==`, and nothing is pinned that nothing needs. Offline and fast: it
reads the files and pip-compile's `# via` annotations, and never asks an index. Refresh the locks: bash scripts/lock.sh"""
import importlib.metadata, re, shutil, sys, tomllib
from pathlib import Path
import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import ROOT
# lock -> what it is compiled from: pyproject.toml's dependencies plus these extras, or a requirements .in file
LOCKS = {"requirements/dev.txt": ("dev",), "requirements/bench.txt": ("dev", "bench"),
         "requirements/gguf.txt": ("dev", "gguf"), "requirements/tools.txt": "requirements/tools.in"}
PIN = re.compile(r"^(\S+)==(\S+)$")
VIA = re.compile(r"^ {4}# via(?: (.+))?$")     # "    # via peft" or "    # via" followed by "    #   peft" lines
VIA_MORE = re.compile(r"^ {4}# {3}(.+)$")

def parse_lock(text):
    "{name: (version, [via, ...])} from pip-compile's output; a line that is neither a pin nor a comment is a problem."
    pins, problems, name = {}, [], None
    for n, line in enumerate(text.splitlines(), 1):
        if m := VIA.match(line) or (name and VIA_MORE.match(line)):
            if name and m.group(1): pins[name][1].append(m.group(1).strip())
        elif not line.strip() or line.startswith("#"): name = None
        elif m := PIN.match(line):
            name = canonicalize_name(m.group(1))
            if name in pins: problems.append(f"line {n}: {name} is pinned twice")
            pins[name] = (m.group(2), [])
        else: problems.append(f"line {n}: not an exact `name==version` pin: {line!r}"); name = None
    return pins, problems

def direct_requirements(root, source):
    "The requirements a lock is compiled from, markers evaluated here (extras: the pyproject.toml extras it includes)."
    if isinstance(source, str):
        lines = [l.split("#")[0].strip() for l in (root/source).read_text().splitlines()]
        return [r for r in map(Requirement, filter(None, lines)) if not r.marker or r.marker.evaluate()]
    project = tomllib.loads((root/"pyproject.toml").read_text())["project"]
    reqs = [(Requirement(r), "") for r in project["dependencies"]]
    reqs += [(Requirement(r), e) for e in source for r in project["optional-dependencies"][e]]
    return [r for r, extra in reqs if not r.marker or r.marker.evaluate({"extra": extra})]

def lock_problems(root, lock, source):
    "Every way the lock disagrees with its source, as sentences (an empty list: they agree)."
    pins, problems = parse_lock((root/lock).read_text())
    if "bash scripts/lock.sh" not in (root/lock).read_text():
        problems.append("the header does not name `bash scripts/lock.sh`, the command that writes the lock")
    if m := re.search(r"^\s*(?:-|--)\S+.*$|(?:file:/|^\s*/|\s/(?:opt|tmp|work|home|root)/).*$", (root/lock).read_text(), re.M):
        problems.append(f"an index option or a machine path: {m.group(0)!r}")
    for name, (version, _) in pins.items():
        try: Version(version)
        except Exception: problems.append(f"{name}=={version}: not a version")
    direct = direct_requirements(root, source)
    roots = {canonicalize_name(r.name) for r in direct}
    origin = "-r " + source if isinstance(source, str) else f"{canonicalize_name(_project_name(root))} (pyproject.toml)"
    for r in direct:
        name = canonicalize_name(r.name)
        if name not in pins: problems.append(f"{r} is required but not pinned"); continue
        version, vias = pins[name]
        if not r.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{name}=={version} is outside the required range {r}")
        if origin not in vias: problems.append(f"{name} is required, but the lock does not say it comes from {origin}")
    # what is needed: the direct requirements and, through the `# via` annotations, whatever they pull in.
    # "-c FILE" (pinned to agree with another lock) needs nothing.
    needed, todo = set(), list(roots)
    children = {}
    for name, (_, vias) in pins.items():
        for v in vias:
            if v == origin and name not in roots:
                problems.append(f"{name} says it comes from {origin}, which does not list it")
            elif not v.startswith(("-c ", "-r ")) and v != origin:
                if canonicalize_name(v) in pins: children.setdefault(canonicalize_name(v), []).append(name)
                else: problems.append(f"{name} says it comes from {v}, which the lock does not pin")
    while todo:
        if (n := todo.pop()) not in needed: needed.add(n); todo += children.get(n, [])
    problems += [f"{name}=={pins[name][0]} is pinned but nothing needs it" for name in sorted(set(pins) - needed)]
    return problems

def _project_name(root): return tomllib.loads((root/"pyproject.toml").read_text())["project"]["name"]

@pytest.mark.parametrize("lock", LOCKS)
def test_lock_agrees_with_what_it_is_made_from(lock):
    problems = lock_problems(ROOT, lock, LOCKS[lock])
    assert not problems, f"{lock} disagrees with what it is made from (run: bash scripts/lock.sh):\n" + "\n".join(problems)

@pytest.mark.parametrize("lock", ["requirements/bench.txt", "requirements/gguf.txt", "requirements/tools.txt"])
def test_layered_locks_pin_what_they_share_with_dev_txt_alike(lock):
    "bench.txt, gguf.txt and tools.txt are compiled with `-c requirements/dev.txt`: a package in both has one version."
    dev, other = (parse_lock((ROOT/f).read_text())[0] for f in ("requirements/dev.txt", lock))
    assert {n: (v, dev[n][0]) for n, (v, _) in other.items() if n in dev and v != dev[n][0]} == {}

def test_the_set_up_pins_torch_and_pip():
    pins = {f: parse_lock((ROOT/f).read_text())[0] for f in LOCKS}
    assert "torch" in pins["requirements/dev.txt"] and "pip" in pins["requirements/tools.txt"]

@pytest.mark.skipif(not (Path(sys.prefix)/".qlora_nb_installed").exists(), reason="not a venv scripts/setup_env.sh made")
def test_the_set_up_venv_has_the_locked_versions():
    "Every package requirements/dev.txt pins is installed at that version (torch: unless the set-up kept a torch of yours)."
    kept = Path(sys.prefix, ".qlora_nb_torch_kept.txt")
    kept = kept.read_text().strip() if kept.exists() else ""
    pins = parse_lock((ROOT/"requirements/dev.txt").read_text())[0]
    here = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {n: (v, here.get(n)) for n, (v, _) in pins.items() if here.get(n) != v and not (n == "torch" and kept)}
    assert wrong == {}, "(locked, installed); run: source scripts/setup_env.sh"

# The check fails when it should: each edit of a copy (a pattern, its replacement) and the sentence it must produce
BREAKS = {
    "a pin outside its range": ("requirements/dev.txt", r"^peft==\S+$", "peft==0.20.0", "outside the required range"),
    "a range, not a pin": ("requirements/dev.txt", r"^peft==\S+$", "peft>=0.21", "not an exact"),
    "a pin nothing needs": ("requirements/dev.txt", r"^peft==", "left-pad==1.0\npeft==",
                            r"^left-pad==1.0 is pinned but nothing needs it"),
    "a machine path": ("requirements/dev.txt", r"^accelerate==", "--find-links /opt/wheels\naccelerate==", "machine path"),
    "a requirement the lock lacks": ("pyproject.toml", r'^    "traitlets",$', '    "traitlets",\n    "left-pad>=1",',
                                     "left-pad>=1 is required but not pinned"),
    "a new requirement the lock has for another reason": ("pyproject.toml", r'^    "traitlets",$',
        '    "traitlets",\n    "rich",', "rich is required, but the lock does not say it comes from qlora-nb"),
    "a requirement dropped from pyproject.toml": ("pyproject.toml", r'^    "sentencepiece",\n', "",
                                                  r"^sentencepiece==\S+ is pinned but nothing needs it"),
}

@pytest.mark.parametrize("case", BREAKS)
def test_the_check_catches(case, tmp_path):
    path, pattern, new, sentence = BREAKS[case]
    for f in ("pyproject.toml", *LOCKS, "requirements/tools.in"):
        (tmp_path/f).parent.mkdir(exist_ok=True); shutil.copy(ROOT/f, tmp_path/f)
    assert lock_problems(tmp_path, "requirements/dev.txt", LOCKS["requirements/dev.txt"]) == []
    text, n = re.subn(pattern, new, (tmp_path/path).read_text(), count=1, flags=re.M)
    assert n == 1, pattern
    (tmp_path/path).write_text(text)
    problems = lock_problems(tmp_path, "requirements/dev.txt", LOCKS["requirements/dev.txt"])
    assert any(re.search(sentence, p) for p in problems), problems

def test_readme_names_the_locked_versions():
    "README.md's table of key versions (written in nbs/index.ipynb) is the lock's, Python included."
    lock = (ROOT/"requirements/dev.txt").read_text()
    pins, python = parse_lock(lock)[0], re.search(r"pip-compile with Python (\S+)", lock)[1]
    rows = re.search(r"^\| Python \|.*\n\|[-|]+\|\n\|.*\|$", (ROOT/"README.md").read_text(), re.M)
    assert rows, "README.md has no `| Python | torch | ...` table"
    head, _, values = ([c.strip() for c in row.strip("|").split("|")] for row in rows[0].splitlines())
    assert dict(zip(head, values)) == {"Python": python, **{n: pins[canonicalize_name(n)][0] for n in head[1:]}}
