"""Where a fast-decoder step's time goes on CUDA: the step replayed as a CUDA graph (per-token time),
and the same step run eagerly under torch.profiler (each kernel's GPU time), for a real-size
random-weight model. The sum of kernel times against the replay time says whether the rest is
kernel efficiency or gaps between kernels.

    python bench/profile_decode_step.py --config Qwen--Qwen2.5-3B-Instruct [--compile]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import run_multimodal as rm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="Qwen--Qwen2.5-3B-Instruct")
    parser.add_argument("--compile", action="store_true", help="compile the layers as --compile does")
    parser.add_argument("--slots", type=int, default=512, help="prompt + new tokens the cache holds")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import tiny_models

    rm.quiet_libraries(debug=False)
    with tempfile.TemporaryDirectory() as folder:
        tiny_models.build_qwen2(Path(folder) / "m", full_size=True, device="cuda", config_name=args.config)
        info = rm.resolve_model(str(Path(folder) / "m"))
        model, tokenizer = rm.load_model(info, rm.Plan("cuda", "bfloat16", None, "", ()), rm.detect_hardware())
    inputs = rm.prepare_inputs(tokenizer, rm.build_messages("Hello there", None, rm.Media(), "text"), model.device)
    length = inputs["input_ids"].shape[-1]
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        decoder = rm.FastDecoder(model, out.past_key_values, length, args.slots - length, True, args.compile)
        token = out.logits[:, -1].argmax(-1)
        start = time.perf_counter()
        decoder.capture()
        torch.cuda.synchronize()
        print(f"capture (and compile) {time.perf_counter() - start:.1f} s")
        for _ in range(20):
            decoder.logits_at(token, length)
        torch.cuda.synchronize()
        steps = 200
        start = time.perf_counter()
        for _ in range(steps):
            decoder.logits_at(token, length)
        torch.cuda.synchronize()
        replay = (time.perf_counter() - start) / steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                decoder._fused_step(decoder.token, decoder.position)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / 10 / 1000
    kernels = sum(e.count for e in events) / 10
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.config}: replayed step {replay * 1000:.2f} ms ({1 / replay:.0f} tokens/s); eager step's kernels "
          f"{total:.2f} ms of GPU time in {kernels:.0f} kernels; weights {size / 1e9:.2f} GB -> "
          f"{size / replay / 1e9:.0f} GB/s while replaying")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
