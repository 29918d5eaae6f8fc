"""Decode speed against the hardware's ceiling: the tool's fast decoder, the tool with
--no_fast_decode, and plain transformers `generate` (eager, and static cache + torch.compile) on the
same model, in the same run; and whether the fast decoder's greedy tokens equal generate()'s.

Random weights from the real configs in tests/configs (decode speed does not depend on the weights'
values), batch 1, greedy, bf16 (or the dtype given), N new tokens forced with min_new_tokens.
The ceiling is the bytes a token must read (every weight of the decoder and the output head; of the
embedding table only one row) over the copy bandwidth measured here first.

    python bench/bench_decode.py                                   (GPU: 3B, 1.5B, Omni thinker + image)
    python bench/bench_decode.py --device cpu --configs Qwen--Qwen2.5-0.5B-Instruct --new_tokens 64 --no_omni
"""

from __future__ import annotations

import argparse
import dataclasses
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


def bytes_per_token(model) -> int:
    """What one decoding step reads: the decoder's weights and the output head (the embedding table
    only where it is the head too; otherwise one row of it)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    size = sum(p.numel() * p.element_size() for p in decoder.parameters())
    embedding = decoder.embed_tokens.weight
    if head.weight.data_ptr() != embedding.data_ptr():
        size += head.weight.numel() * head.weight.element_size() - embedding.numel() * embedding.element_size()
    return size


def same_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bench_model(label, model, processor, inputs, args, bandwidth, gemv, runs_wanted) -> None:
    import torch

    size = bytes_per_token(model)
    ceiling = bandwidth / size
    sampling = rm.Sampling(args.new_tokens, temperature=0, min_new_tokens=args.new_tokens)
    forced = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    prompt_length = inputs["input_ids"].shape[-1]
    tokens_seen = {}

    plan = rm.Plan(args.device, args.dtype, None, "", ())

    def tool(**flags):
        def run():   # the runtime is decided as a run of the tool decides it, when first needed
            runtime = rm.choose_runtime(model, args.device, rm.Options(sampling=sampling, **flags))
            loaded = rm.Loaded(model, processor, plan, 0.0, {}, runtime)
            return rm.stats_of(rm.generate_answer(loaded, inputs, sampling, rm.SHOW_NONE), loaded, 0.0)
        return run

    def plain(**extra):
        def run():
            sequences = model.generate(**inputs, **forced, **extra)
            tokens_seen[tuple(sorted(extra))] = sequences[0, prompt_length:].tolist()
            return sequences.shape[-1] - prompt_length
        return run

    runs = {"plain": ("plain generate, eager", plain()),
            "static": ("plain generate, static cache + compile", plain(cache_implementation="static")),
            "tool_generate": ("the tool, --no_fast_decode", tool(fast_decode=False)),
            "tool": ("the tool (fast decoder, CUDA graph)" if args.device == "cuda" else "the tool (fast decoder)",
                     tool()),
            "compiled": ("the tool, layers compiled (--compile)", tool(compile_layers=True))}
    print(f"\n{label}: {prompt_length} prompt tokens; a token reads {size / 1e9:.2f} GB; ceiling "
          f"{ceiling:.0f} tokens/s from the copy bandwidth ({gemv / size:.0f} from the matrix-vector reads)")
    for key in runs_wanted:
        name, run = runs[key]
        with torch.inference_mode():
            first, result = timed(args.device, run)    # cold: first use, capture, compilation
            second, result = timed(args.device, run)
        if isinstance(result, rm.Stats):   # the rate the tool prints; steady: from the second token on
            speed, tokens = result.decode_tokens_per_s, result.new_tokens
            steady = (tokens - 2) / (result.decode_s - result.second_token_s)
            extra = (f"steady {steady:.1f} tokens/s after {result.second_token_s:.2f} s of setup, "
                     f"first token {result.ttft_s * 1000:.0f} ms, ")
        else:
            tokens, extra = result, ""
            speed = tokens / second
        print(f"  {name:<44} {speed:7.1f} tokens/s  {speed / ceiling:5.1%} of the ceiling  "
              f"({extra}first run {first:.1f} s, second {second:.1f} s, {tokens} tokens)", flush=True)
    if "plain" in runs_wanted and args.check:
        streamer_tokens = []
        from transformers.generation.streamers import BaseStreamer

        class Collect(BaseStreamer):
            def put(self, value):
                streamer_tokens.extend(value.reshape(-1).tolist())

            def end(self):
                pass

        runtime = rm.choose_runtime(model, args.device, rm.Options(sampling=sampling,
                                                                  compile_layers="compiled" in runs_wanted))
        with torch.inference_mode():
            rm.fast_generate(runtime, model, inputs, sampling, Collect(), {})
        fast_tokens = streamer_tokens[prompt_length:]
        reference = tokens_seen[()]
        print(f"  greedy tokens, fast decoder vs plain generate: {same_prefix(fast_tokens, reference)} of "
              f"{len(reference)} identical from the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--configs", nargs="*", default=["Qwen--Qwen2.5-3B-Instruct", "Qwen--Qwen2.5-1.5B-Instruct"])
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--runs", nargs="+", default=["plain", "tool_generate", "tool", "static"],
                        choices=("plain", "static", "tool_generate", "tool", "compiled"))
    parser.add_argument("--no_omni", action="store_true", help="leave out the Omni-3B thinker with a 448x448 image")
    parser.add_argument("--check", action="store_true",
                        help="compare the fast decoder's greedy tokens with plain generate's")
    args = parser.parse_args()

    import torch
    import transformers

    import tiny_models

    rm.quiet_libraries(debug=False)
    bandwidth = copy_bandwidth(args.device)
    gemv = gemv_bandwidth(args.device, getattr(torch, args.dtype))
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, matrix-vector reads {gemv / 1e9:.1f} GB/s | "
          f"{args.dtype}, {args.new_tokens} new tokens, greedy", flush=True)
    plan = rm.Plan(args.device, args.dtype, None, "", ())
    for name in args.configs:
        with tempfile.TemporaryDirectory() as folder:
            tiny_models.build_qwen2(Path(folder) / "m", full_size=True, device=args.device, config_name=name)
            info = rm.resolve_model(str(Path(folder) / "m"))
            model, tokenizer = rm.load_model(info, plan, rm.detect_hardware())
        inputs = rm.prepare_inputs(tokenizer, rm.build_messages(PROMPT, None, rm.Media(), "text"), model.device)
        bench_model(name, model, tokenizer, inputs, args, bandwidth, gemv, args.runs)
        model = tokenizer = None   # frees it for the next model
    if not args.no_omni:
        from PIL import Image

        with tempfile.TemporaryDirectory() as folder:
            tiny_models.build_qwen2_5_omni(Path(folder) / "omni", full_size=True, device=args.device)
            info = rm.resolve_model(str(Path(folder) / "omni"))
            model, processor = rm.load_model(info, dataclasses.replace(plan, components=("thinker",)),
                                             rm.detect_hardware())
        image = Image.open(ROOT / "sample_data" / "sample_image.jpg").convert("RGB").resize((448, 448))
        media = rm.Media(images=[image])
        messages = rm.build_messages("Describe this image.", None, media, "omni")
        inputs = rm.prepare_inputs(processor, messages, model.device, media)
        runs = [r for r in args.runs if r != "static"]   # generate's static cache is not wired for Omni's thinker
        bench_model("Qwen--Qwen2.5-Omni-3B thinker, one 448x448 image", model, processor, inputs, args, bandwidth,
                    gemv, runs)


if __name__ == "__main__":
    main()
