__version__ = "0.1.0"

# No code fetched from a hub at import. On CPUs with AVX512-BF16, bitsandbytes 0.50 (`bitsandbytes.backends.cpu.ops`)
# calls `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` while it is imported: online that downloads
# native code and runs it in this process, offline it logs a warning; either way a run's 4-bit numbers would depend on
# the network. (Its Apple GPU backend does the same lazily, at its first 4-bit op on macOS 26+.) qlora_nb lets
# bitsandbytes load only with those requests refused, unless the user opts in with QLORA_NB_HUB_KERNELS=1. Mechanism,
# not message text: while such a module executes, `sys.modules["kernels"]` is None (Python's documented way to make an
# import fail, whether or not `kernels` is loaded already), so bitsandbytes falls back to its own built-in kernel, and
# the module's logger level is raised above the WARNING it then logs; both are restored afterwards. A lazy module gets
# its own "never try" switch set. The guard is a `sys.meta_path` finder installed here, before anything imports
# bitsandbytes (transformers lazily, peft, qlora_nb's own modules), and without importing it or torch: `qlora-nb
# --help` stays fast.
# `qlora_nb.quant.cpu_4bit_kernel()` names the kernel bitsandbytes ended up with (metrics.json records it).
import logging as _logging, os as _os, sys as _sys, warnings as _warnings

HUB_KERNELS = "QLORA_NB_HUB_KERNELS"  # set to 1 to let bitsandbytes fetch its CPU 4-bit kernel from the model hub
ASKS_THE_HUB = {  # bitsandbytes' modules that call `kernels.get_kernel`, and when
    "bitsandbytes.backends.cpu.ops": "as it is imported, on CPUs with AVX512-BF16",
    "bitsandbytes.backends.mps.ops": "at its first 4-bit op on Apple GPUs, unless its `_kernel_load_failed` is set"}


class HubKernelWarning(UserWarning):
    "bitsandbytes' CPU code was imported before qlora_nb, so a kernel it fetched from the model hub may be in use."


def hub_kernels_allowed(env=None) -> bool: # environment; default os.environ
    "Whether the user opted in (QLORA_NB_HUB_KERNELS=1) to bitsandbytes fetching its CPU 4-bit kernel from the hub."
    return (_os.environ if env is None else env).get(HUB_KERNELS, "").strip().lower() in ("1", "true", "yes", "on")


class _WithoutHubKernels:
    "A loader: `loader`'s module run with `import kernels` failing and its logger at ERROR, then told never to try."
    def __init__(self, loader): self.loader = loader
    def __getattr__(self, name): return getattr(self.loader, name)  # get_code, get_resource_reader, ...
    def create_module(self, spec): return self.loader.create_module(spec)

    def exec_module(self, module):
        logger, missing = _logging.getLogger(module.__name__), object()
        kernels, level = _sys.modules.get("kernels", missing), logger.level
        _sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ModuleNotFoundError
        logger.setLevel(_logging.ERROR)  # bitsandbytes then logs a WARNING that it falls back: nothing to act on
        try: self.loader.exec_module(module)
        finally:
            if kernels is missing: _sys.modules.pop("kernels", None)
            else: _sys.modules["kernels"] = kernels
            logger.setLevel(level)
        if hasattr(module, "_kernel_load_failed"): module._kernel_load_failed = True  # the lazy one's own switch


class _HubKernelGuard:
    "A `sys.meta_path` finder: bitsandbytes' modules that ask the hub, found by the other finders, loaded without it."
    qlora_nb_hub_kernel_guard = True  # recognised across reloads of qlora_nb
    reported = False  # whether the user was told that bitsandbytes loaded a hub kernel before the guard was in place

    def find_spec(self, name, path, target=None):
        if name not in ASKS_THE_HUB or hub_kernels_allowed(): return None
        for finder in _sys.meta_path:
            if getattr(finder, "qlora_nb_hub_kernel_guard", False) or not hasattr(finder, "find_spec"): continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None: spec.loader = _WithoutHubKernels(spec.loader)
                return spec
        return None


def _install_hub_kernel_guard():
    "Put the guard first on `sys.meta_path`; say once if bitsandbytes' CPU ops ran before it and loaded a hub kernel."
    guard = next((f for f in _sys.meta_path if getattr(f, "qlora_nb_hub_kernel_guard", False)), None)
    if guard is None: _sys.meta_path.insert(0, guard := _HubKernelGuard())
    ops = _sys.modules.get("bitsandbytes.backends.cpu.ops")
    if getattr(ops, "gemm_4bit_forward_kernel", None) is None or hub_kernels_allowed() or guard.reported: return
    guard.reported = True  # once a process, reloads of qlora_nb included
    _warnings.warn("bitsandbytes was imported before qlora_nb and loaded its CPU 4-bit kernel from the model hub "
                   "(kernels-community/quantization-bitsandbytes): import qlora_nb first to keep hub code out of "
                   f"this process, or set {HUB_KERNELS}=1 to accept it.", HubKernelWarning, stacklevel=3)


_install_hub_kernel_guard()
