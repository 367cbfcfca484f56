"""The GPU check (issue 28, item 11): what one lent H100/H200 does with this project, in
under 8 minutes, each part in its own process under its own timeout, one table at the end.

    timeout 540 python benchmarks/gpu_check.py --out gpu_check      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc  # every part, small, on a CPU

Parts: env (versions, devices, what llmret.launch would claim, measured matmul rate),
prepare (synthetic tokenizer, random 7B-width Llama, LLaRA shards, negatives), llara (2 and 4
layers under torchrun + DeepSpeed: step time, memory, MFU, attention kernel), resume (kill at
step 5, resume to 10, losses against an uninterrupted run), lora (fine-tuning memory, merged vs
unmerged), csplade (forward + backward at Llama-3 width), encode (texts/s), search (torch vs
faiss-cpu). Writes OUT.md, OUT.json and OUT_logs/. How to run it and what goes into the
note: docs/gpu_check.md. The code is in benchmarks/gpu_check/.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]  # llmret, and the gpu_check package beside this file

from gpu_check.driver import main  # noqa: E402  (the package takes precedence over this file's name)

if __name__ == "__main__":
    sys.exit(main())
