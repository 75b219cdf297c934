"""CPU seconds of one forward + backward of SmolLM2-135M (4-bit NF4, LoRA r 8, qlora_nb's loader) in fp32, bf16 or fp16.

    python bench/bench_dtype_step.py fp32 2     # dtype, repeats (each printed); one thread, 2 rows x 256 random tokens

bf16 and fp16 run under autocast, as the Trainer runs them; the flags are parsed as a plan (`plan=True`) so that fp16,
which `qlora-nb train` refuses on a CPU, can be measured. The figures quoted in bench/RESULTS.md (issue 28) came from it.
"""
import sys, time
from harness import ROOT  # bench/harness.py: offline, this checkout on sys.path
import torch
torch.set_num_threads(1)
from qlora_nb.config import parse_args
from qlora_nb.model import get_accelerate_model
from qlora_nb.sources import known_model_folder
dtype = sys.argv[1]; repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[dtype]
args = parse_args(["--model_name_or_path", str(known_model_folder("smollm2-135m-instruct")), "--use_cpu", "--lora_r", "8",
                   "--output_dir", str(ROOT/"bench"/"_work"/"dtype_step"), *flags], quiet=True, plan=True)
model, tok = get_accelerate_model(args)
model.train()
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (2, 256), generator=g)
ac = torch.autocast("cpu", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16, enabled=dtype != "fp32")
times = []
for r in range(repeats):
    c0 = time.process_time()
    with ac: loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); model.zero_grad(set_to_none=True)
    times.append(time.process_time() - c0)
print(f"RESULT {dtype} cap={torch.backends.cpu.get_cpu_capability()} loss={loss.item():.4f} cpu_s={' '.join(f'{t:.2f}' for t in times)}", flush=True)
