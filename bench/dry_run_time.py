"""How long a dry run takes, as a user runs it (a fresh process each time: imports, config.json,
exact counts on the meta device, the plan). Prints one line per model and hardware spec.

    python bench/dry_run_time.py            (~1 minute here)
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"
MODELS = ["Qwen--Qwen2.5-0.5B-Instruct", "Qwen--Qwen2.5-3B-Instruct", "Qwen--Qwen2.5-VL-3B-Instruct",
          "Qwen--Qwen2.5-Omni-3B"]
SPECS = ["mps:16", "cuda:24", "cpu:32"]


def main() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for model in MODELS:
        for spec in SPECS:
            command = [sys.executable, str(ROOT / "run_multimodal.py"), "--model_id", str(CONFIGS / model),
                       "--dry_run", "--hardware", spec]
            if "VL" in model or "Omni" in model:
                command += ["--image_path", str(ROOT / "sample_data" / "sample_image.jpg")]
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - start
            verdict = [line for line in result.stderr.splitlines() if line.startswith("   total")]
            print(f"{model:<32} {spec:<8} {seconds:5.1f} s  exit {result.returncode}  "
                  f"{verdict[0].strip() if verdict else result.stderr.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
