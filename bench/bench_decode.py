"""Decode speed against the hardware's ceiling: the tool's generation path, and plain transformers
`generate` (eager, and static cache + torch.compile) on the same model, in the same run.

Random weights from the real configs in tests/configs (decode speed does not depend on the weights'
values), batch 1, greedy, bf16 (or the dtype given), N new tokens forced with min_new_tokens.
The ceiling is the weights' bytes read once per token at the copy bandwidth measured here first:
tokens/s <= bandwidth / weights bytes.

    python bench/bench_decode.py                                   (GPU: 3B and 1.5B; ~5 minutes)
    python bench/bench_decode.py --device cpu --configs Qwen--Qwen2.5-0.5B-Instruct --new_tokens 64
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

PROMPT = "Explain quantum computing in simple terms"


def copy_bandwidth(device: str, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes per second moved by a large device-to-device copy (read + write), the best of a few."""
    import torch

    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def gemv_bandwidth(device: str, dtype, megabytes: int = 512) -> float:
    """Bytes per second read by matrix-vector products over weights too large for any cache: the
    access pattern of decoding, which a copy's figure (reads + writes) can overstate on a CPU."""
    import torch

    rows = 4864   # Qwen2.5-0.5B's MLP width
    count = max(2, megabytes * 2**20 // (rows * 896 * torch.tensor([], dtype=dtype).element_size()))
    weights = [torch.randn(rows, 896, device=device).to(dtype) for _ in range(count)]
    vector = torch.randn(1, 896, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for weight in weights:
            torch.nn.functional.linear(vector, weight)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return sum(w.numel() * w.element_size() for w in weights) / best


def sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, run) -> tuple[float, int]:
    sync(device)
    start = time.perf_counter()
    tokens = run()
    sync(device)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--configs", nargs="+", default=["Qwen--Qwen2.5-3B-Instruct", "Qwen--Qwen2.5-1.5B-Instruct"])
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--skip_compile", action="store_true", help="leave out static cache + torch.compile")
    parser.add_argument("--isolate", action="store_true",
                        help="plain, plain with a TextStreamer, the tool, plain again (no compile)")
    args = parser.parse_args()

    import torch
    import transformers

    import tiny_models

    rm._quiet_libraries(debug=False)
    bandwidth = copy_bandwidth(args.device)
    gemv = gemv_bandwidth(args.device, rm.torch_dtype(args.dtype))
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, matrix-vector reads {gemv / 1e9:.1f} GB/s | "
          f"{args.dtype}, {args.new_tokens} new tokens, greedy")
    for name in args.configs:
        with tempfile.TemporaryDirectory() as folder:
            tiny_models.build_qwen2(Path(folder) / "m", full_size=True, device=args.device, config_name=name)
            info = rm.resolve_model(str(Path(folder) / "m"))
            plan = rm.Plan(args.device, args.dtype, None, "", ())
            model, tokenizer = rm.load_model(info, plan, rm.detect_hardware(), False, False)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        ceiling = bandwidth / weights
        messages = rm.build_messages(PROMPT, None, rm.Media(), "text")
        inputs = rm.prepare_inputs(tokenizer, messages, model.device)
        sampling = rm.Sampling(args.new_tokens, temperature=0, min_new_tokens=args.new_tokens)
        forced = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

        def tool() -> int:
            stats = rm.Stats(device=args.device)
            rm.generate(model, tokenizer, inputs, sampling, rm.SHOW_NONE, stats)
            return stats.new_tokens

        def plain() -> int:
            return model.generate(**inputs, **forced).shape[-1] - inputs["input_ids"].shape[-1]

        def static_compiled() -> int:
            return model.generate(**inputs, **forced, cache_implementation="static").shape[-1] \
                - inputs["input_ids"].shape[-1]

        def plain_streamed() -> int:   # plain generate with transformers' own TextStreamer (printing nothing)
            from transformers import TextStreamer

            class Quiet(TextStreamer):
                def on_finalized_text(self, text, stream_end=False):
                    pass

            return model.generate(**inputs, **forced, streamer=Quiet(tokenizer, skip_prompt=True)).shape[-1] \
                - inputs["input_ids"].shape[-1]

        runs = [("the tool", tool), ("plain generate, eager", plain)]
        if args.isolate:   # which part of the tool's path costs what: plain first, then with a streamer
            runs = [("plain generate, eager", plain), ("plain generate, eager + TextStreamer", plain_streamed),
                    ("the tool", tool), ("plain generate, eager (again)", plain)]
        if not (args.skip_compile or args.isolate):
            runs.append(("plain generate, static cache + compile", static_compiled))
        print(f"\n{name}: weights {weights / 1e9:.2f} GB, ceiling {ceiling:.0f} tokens/s from the copy bandwidth "
              f"({gemv / weights:.0f} from the matrix-vector reads)")
        for label, run in runs:
            with torch.inference_mode():
                first, tokens = timed(args.device, run)    # cold: first use, compilation
                second, tokens = timed(args.device, run)
            speed = tokens / second
            print(f"  {label:<40} {speed:7.1f} tokens/s  {speed / ceiling:5.1%} of the ceiling  "
                  f"(first run {first:.1f} s, second {second:.1f} s, {tokens} tokens)")
        model = tokenizer = None   # frees it for the next model


if __name__ == "__main__":
    main()
