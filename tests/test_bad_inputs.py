"""Bad input a new user trips over, each from a real `qlora-nb` process: exit status 2, one line on stderr that names
the file or flag and says how to fix it, no traceback, nothing written, and the model never loaded (issue 29). And
`--report_to tensorboard`: refused in one line where tensorboard is not installed; where it is, its event files in the
run folder read back as trainer_state.json's log history."""
import json, os, re, shutil, subprocess

import pytest
from helpers import listing, run_qlora_nb, tiny_flags
from qlora_nb.tiny import tiny_model_path

# run first in each child: any model loaded fails the test (every check here needs only files)
NO_MODEL = """import qlora_nb, transformers
def _loaded(*a, **k): raise AssertionError("a model was loaded before the bad input was found")
transformers.AutoModelForCausalLM.from_pretrained = classmethod(_loaded)"""


PROGRESS = re.compile(r"\d+ examples/s\]|\? examples/s\]")  # a line of a datasets progress bar


def refused(*args, names: list, prelude: str = NO_MODEL, wrap: list = ()) -> str:
    "Run `qlora-nb ARGS`; assert exit status 2 and one `qlora-nb: error:` line naming each of `names`; that line."
    status, out, err = run_qlora_nb(*args, prelude=prelude, wrap=wrap)
    assert (status, out) == (2, ""), (status, out, err[-3000:])
    assert err.startswith("qlora-nb: error: ") and err.count("\n") == 1, err[-3000:]
    for name in names: assert name in err, (name, err)
    return err


@pytest.fixture(scope="module")
def data(alpaca_file): return alpaca_file(24)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    "A completed `qlora-nb train` run of the tiny model, reported to TensorBoard."
    out = tmp_path_factory.mktemp("finished")/"run"
    status, _, err = run_qlora_nb("train", *tiny_flags(data, out, "--report_to", "tensorboard"))
    assert status == 0, err[-3000:]
    return out


# 1, 2, 9: data files

def test_jsonl_with_bytes_that_are_not_utf8(tmp_path):
    good = json.dumps({"instruction": "add", "output": "4"})
    bad = tmp_path/"data.jsonl"
    bad.write_bytes(f"{good}\n{good}\n".encode() + b'{"instruction": "caf\xff", "output": "b"}\n')
    err = refused("train", *tiny_flags(bad, tmp_path/"out"),
                  names=[str(bad), f"line 3, column 21 (offset {2 * len(good) + 22} in the file): 0xff is not UTF-8",
                         "Re-save it as UTF-8"])
    assert not (tmp_path/"out").exists(), err


def test_latin1_json_list(tmp_path):
    bad = tmp_path/"data.json"
    records = [{"instruction": "café", "output": "crème"}] * 3
    bad.write_bytes(json.dumps(records, ensure_ascii=False).encode("latin-1"))  # as a Windows editor may save it
    refused("train", *tiny_flags(bad, tmp_path/"out"),
            names=[str(bad), "line 1, column 22 (offset 21 in the file): 0xe9 is not UTF-8", "Re-save it as UTF-8"])
    assert not (tmp_path/"out").exists()


def test_dataset_that_is_a_folder(tmp_path, data):
    folder = tmp_path/"data"; folder.mkdir(); shutil.copy(data, folder/"alpaca.json")
    refused("train", *tiny_flags(folder, tmp_path/"out"),
            names=[f"{folder} is a folder, not a file: --dataset takes one data file",
                   f"--dataset {folder/'alpaca.json'}"])
    assert not (tmp_path/"out").exists()


# 5, 6, 7: merge

def test_merge_into_a_folder_it_may_not_write(run, tmp_path):
    locked = tmp_path/"locked"; locked.mkdir(); locked.chmod(0o555)
    # root may write anywhere: the child runs as user 1000 of a user namespace, where root's files are its own
    wrap = ["unshare", "--user", "--map-user=1000", "--map-group=1000"] if os.geteuid() == 0 else []
    if wrap and subprocess.run([*wrap, "true"]).returncode != 0: pytest.skip("no user namespaces here")
    err = refused("merge", "--adapter", run, "--output_dir", locked/"merged", "--no_report", wrap=wrap,
                  names=[f"output_dir {locked/'merged'} is not writable (Permission denied in {locked}): choose a "
                         "folder you can write to with --output_dir."])
    assert listing(locked) == [], err


def test_merge_onto_a_read_only_file_system(run, tmp_path):
    ro = tmp_path/"ro"; ro.mkdir()
    mount = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'  # a read-only file system at `ro`, for the child alone
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(ro)]
    if subprocess.run([*wrap, "true"]).returncode != 0: pytest.skip("cannot mount a file system here")
    refused("merge", "--adapter", run, "--output_dir", ro/"merged", "--no_report", wrap=wrap,
            names=[f"output_dir {ro/'merged'} is not writable (Read-only file system in {ro})"])


def test_merge_eval_data_that_is_not_there(run, tmp_path):
    err = refused("merge", "--adapter", run, "--output_dir", tmp_path/"merged", "--eval_data", tmp_path/"gone.json",
                  names=[f"{tmp_path/'gone.json'}: no such file. Check the path given to --eval_data"])
    assert "--dataset" not in err and listing(tmp_path) == []


# 8: chat

def test_chat_with_a_truncated_adapter(run, tmp_path):
    cut = tmp_path/"cut"; shutil.copytree(run/"adapter_model", cut/"adapter_model")
    for name in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(run/name, cut/name)
    weights = cut/"adapter_model"/"adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = listing(cut)
    refused("chat", "--model_name_or_path", tiny_model_path(), "--adapter", cut, "--chat_template", "chatml",
            names=[f"{weights} cannot be read, it is damaged or incomplete (SafetensorError: ",
                   "use another checkpoint of the run"])
    assert listing(cut) == before


# 10: a completed run, started again with another setting

def test_completed_run_started_again_with_another_setting(run, data):
    before = listing(run)
    refused("train", *tiny_flags(data, run, "--report_to", "tensorboard", lora_r=8),
            names=[f"{run} holds a completed run trained with --lora_r 4; this command says --lora_r 8, which a "
                   "completed run does not use. Pass --start_over", "or choose another --output_dir"])
    assert listing(run) == before


# 11: tracking

def test_a_tracker_that_is_not_installed(data, tmp_path):
    hidden = "import sys; sys.modules['tensorboard'] = sys.modules['tensorboardX'] = None  # as where not installed\n"
    refused("train", *tiny_flags(data, tmp_path/"out", "--report_to", "tensorboard"), prelude=hidden + NO_MODEL,
            names=["--report_to tensorboard: not installed in this environment. Install it with "
                   'pip install -e ".[track]"'])
    assert not (tmp_path/"out").exists()


def test_tensorboard_events_in_the_run_read_back_as_the_log_history(run):
    from qlora_nb.plots import read_tensorboard, read_trainer_state
    assert list(run.glob("runs/*/events.out.tfevents.*")), sorted(p.name for p in run.iterdir())
    numbers = lambda log: {(k, e["step"]): v for e in log for k, v in e.items()
                           if k != "step" and isinstance(v, (int, float))}
    logged, written = numbers(read_trainer_state(run)["log_history"]), numbers(read_tensorboard(run)["log_history"])
    assert set(written) == set(logged) and ("loss", 4) in logged, (sorted(written), sorted(logged))
    for key, value in logged.items():  # TensorBoard stores float32: rounding errs by at most 2**-24 of the value
        assert abs(written[key] - value) <= 2**-24 * abs(value), (key, written[key], value)


# Also seen: checks that waited for the model. The layer names and the length budget are answered from the model's
# config and the tokenizer alone (the prelude fails the test if a model loads).

@pytest.mark.parametrize("flags, names", [
    (["--lora_target_modules", "q_proj,qkv"], ["--lora_target_modules qkv: LlamaForCausalLM has no linear layer",
                                               "Its linear layers are down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"]),
    (["--lora_layers", "0,5"], ["--lora_layers 0,5: LlamaForCausalLM has 2 blocks, numbered 0 to 1"]),
    (["--modules_to_save", "head"], ["--modules_to_save head: LlamaForCausalLM has no module of that name"]),
])
def test_a_layer_the_model_does_not_have(flags, names, data, tmp_path):
    refused("train", *tiny_flags(data, tmp_path/"out", *flags), names=names)
    assert not (tmp_path/"out").exists()


def test_conversations_none_of_which_fits(tmp_path):
    from qlora_nb.tiny import make_conversation_records
    chats = tmp_path/"chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in make_conversation_records(12)))
    status, out, err = run_qlora_nb("train", *tiny_flags(chats, tmp_path/"out", "--chat_template", "chatml",
                                                         source_max_len=4, target_max_len=2), prelude=NO_MODEL)
    *reading, last = err.strip("\n").split("\n")  # reading the file shows datasets' progress bars first
    assert (status, out) == (2, "") and all(PROGRESS.search(line) for line in reading if line), err[-3000:]
    assert last == f"qlora-nb: error: {chats}: no conversation fits in 6 tokens: raise --source_max_len or " \
                   "--target_max_len.", err[-3000:]
    assert not (tmp_path/"out").exists()
