__version__ = "0.1.0"

import logging as _logging

# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional faster 4-bit CPU kernel from the
# Hugging Face kernels hub (the `kernels` package) and, when that fails, logs a warning before every command,
# `--help` included, and in red above the form in JupyterLab. The hub is optional and cannot be reached offline;
# bitsandbytes then uses its own built-in CPU kernel, so there is nothing for the user to do. Only that one
# message is dropped: every other bitsandbytes warning still shows. The filter sits on the logger bitsandbytes
# will use, installed here, before anything in qlora_nb (or transformers, lazily) imports bitsandbytes, and
# without importing it (or torch): `qlora-nb --help` stays fast.
_KERNELS_HUB_PROBE = "Failed to load CPU gemm_4bit_forward from kernels-community"

def _not_the_kernels_hub_probe(record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KERNELS_HUB_PROBE)

_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_hub_probe)
