"""Check the plan's spreading over several GPUs for real: this process holds all but FREE_GB of
every GPU, then runs the tool (a fresh process) on a model too big for one GPU's remainder but
small enough for all of them together; the tool's plan lines and stats line are printed.

    python bench/spread_over_gpus.py MODEL_DIR [--free_gb 6] [tool flags...]
    (on a machine with 2 or more NVIDIA GPUs)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import torch

    model, rest = sys.argv[1], sys.argv[2:]
    free_gb = 6.0
    if rest[:1] == ["--free_gb"]:
        free_gb, rest = float(rest[1]), rest[2:]
    hogs = []
    for index in range(torch.cuda.device_count()):
        free, _ = torch.cuda.mem_get_info(index)
        hogs.append(torch.empty(int(free - free_gb * 2**30), dtype=torch.uint8, device=f"cuda:{index}"))
        print(f"cuda:{index}: holding {hogs[-1].numel() / 2**30:.1f} GB, "
              f"{torch.cuda.mem_get_info(index)[0] / 2**30:.1f} GB left free")
    command = [sys.executable, str(ROOT / "run_multimodal.py"), "--model_id", model, *rest]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(result.stderr.strip())
    print(f"exit code {result.returncode}; answer: {len(result.stdout)} characters on stdout")


if __name__ == "__main__":
    main()
