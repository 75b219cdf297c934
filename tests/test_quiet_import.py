"""Importing qlora_nb is quick and quiet, and library noise is silenced by mechanism, never by a message's text.

bitsandbytes' request for a hub kernel (on AVX512-BF16 CPUs) is refused as bitsandbytes' CPU module is imported, and
the warning it then logs is hidden by that logger's level for that import only (tests/test_hub_kernels.py proves that
no request leaves). The warnings the demo hides are matched by category and module. Each case checks that something
else still shows. Processes are fresh where the order of imports matters."""
import importlib.util, logging, re, subprocess, sys, warnings
from pathlib import Path
from unittest import mock

import pytest
import qlora_nb
from bitsandbytes.functional import has_avx512bf16
from helpers import ENV, ROOT, run_python

BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"

def python(code: str, env: dict = ENV) -> subprocess.CompletedProcess: return run_python("-c", code, env=env)


def test_the_guarded_module_is_the_one_that_asks_the_hub():
    "If a bitsandbytes release calls `get_kernel` from another module, the guard would miss it: fail here."
    root = Path(importlib.util.find_spec("bitsandbytes").submodule_search_locations[0])
    asking = {".".join(("bitsandbytes", *p.relative_to(root).with_suffix("").parts)) for p in root.rglob("*.py")
              if re.search(r"\bget_kernel\b", p.read_text())}
    assert asking <= set(qlora_nb.ASKS_THE_HUB), f"bitsandbytes asks the hub from {asking}: guard them in qlora_nb"


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes probes the kernels hub only on CPUs with AVX512-BF16")
def test_without_qlora_nb_the_probe_shows():  # so the next test can fail
    r = python("import bitsandbytes")
    assert "kernels-community" in r.stderr, r.stderr


def test_importing_qlora_nb_hides_the_probe_and_imports_nothing_heavy():
    r = python("import sys, qlora_nb\nassert not {'torch', 'bitsandbytes', 'transformers'} & set(sys.modules)\n"
               "import bitsandbytes\nimport kernels  # refused only while bitsandbytes' CPU code loads")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_other_bitsandbytes_warnings_still_show():  # the logger's level is back once bitsandbytes is imported
    r = python("import qlora_nb, logging\nimport bitsandbytes\n"
               f"logging.getLogger({BNB_CPU_OPS!r}).warning('some other problem with the CPU kernels')")
    assert "some other problem with the CPU kernels" in r.stderr, r.stderr


def test_the_opt_in_setting():
    assert not qlora_nb.hub_kernels_allowed({}) and not qlora_nb.hub_kernels_allowed({"QLORA_NB_HUB_KERNELS": "0"})
    assert qlora_nb.hub_kernels_allowed({"QLORA_NB_HUB_KERNELS": "1"})


# The demo's filters, on the real warnings: each raised by the library that raises it in a demo run.

def paged_optimizer_on_cpu():
    import bitsandbytes as bnb, torch
    weight = torch.nn.Parameter(torch.zeros(4)); weight.grad = torch.ones(4)
    bnb.optim.PagedAdamW32bit([weight]).step()  # "Paged optimizers are not supported on CPU..."

def renamed_in_transformers():
    import transformers
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).is_gradient_checkpointing  # peft asks this; renamed for v6

def scripted_in_torch():
    import torch
    def forward(self, x): return x
    torch.jit.script_method(forward)  # deprecated; torch.utils.mkldnn does this as it is imported

NOISE = [paged_optimizer_on_cpu, renamed_in_transformers, scripted_in_torch]

def raised(during_demo) -> list:
    "The warnings `qlora_nb.demo.demo_main` lets through when its demo is `during_demo` (every one, not once each)."
    from qlora_nb import demo
    demo_instead = mock.patch.object(demo, "run_demo", lambda *args, **kwargs: during_demo())
    with warnings.catch_warnings(record=True) as seen, demo_instead:
        warnings.simplefilter("always")
        assert demo.demo_main(["--output_dir", "unused"]) == 0
    return [(w.category, str(w.message)) for w in seen]

def noise():
    for make in NOISE: make()
    return {"summary": ""}


def test_each_noise_is_real():  # so the next test can fail
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        noise()
    assert [w.category for w in seen] == [UserWarning, FutureWarning, DeprecationWarning], [w.message for w in seen]


def test_the_demo_hides_the_noise_and_shows_other_warnings():
    def elsewhere(category, module):  # the same kinds of warning, from other modules of the same libraries
        warnings.warn_explicit(f"a {category.__name__} from {module}", category, module.replace(".", "/") + ".py", 1,
                               module=module)
    def noise_and_others():
        warnings.warn("a warning of the user's own")
        elsewhere(UserWarning, "bitsandbytes.nn.modules")
        elsewhere(FutureWarning, "transformers.trainer")
        elsewhere(DeprecationWarning, "torch.jit._trace")
        return noise()
    assert raised(noise_and_others) == [(UserWarning, "a warning of the user's own"),
                                        (UserWarning, "a UserWarning from bitsandbytes.nn.modules"),
                                        (FutureWarning, "a FutureWarning from transformers.trainer"),
                                        (DeprecationWarning, "a DeprecationWarning from torch.jit._trace")]
