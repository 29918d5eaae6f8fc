"""Where does per-token time go in the tool's generation path? Times plain `generate` against
the same call with a streamer (in the main thread, and in a second thread as transformers'
TextIteratorStreamer needs) and against the tool's own generate(), on one checkpoint, warm.

    python bench/stream_overhead.py MODEL_DIR [--device cuda] [--tokens 64]

Seen on an H100 (2026-11-27, transformers 5.17, torch 2.11), ms per token, tiny Qwen2 / Qwen2.5-1.5B
(random weights): plain 5.1 / 23-40; streamer in the main thread 5.0 / 24; streamer in a thread
48-54 / 72-79. The tool therefore streams from the main thread.
"""

import argparse
import io
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_multimodal as rm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    rm.quiet_libraries(False)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map={"": args.device})
    inputs = tok.apply_chat_template([{"role": "user", "content": "Explain quantum computing"}],
                                     add_generation_prompt=True, return_dict=True, return_tensors="pt").to(model.device)
    forced = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    def plain() -> int:
        return model.generate(**inputs, **forced).shape[-1] - inputs["input_ids"].shape[-1]

    def streamer_main_thread() -> int:
        s = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        return model.generate(**inputs, **forced, streamer=s).shape[-1] - inputs["input_ids"].shape[-1]

    def streamer_thread() -> int:
        s = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        t = threading.Thread(target=lambda: model.generate(**inputs, **forced, streamer=s))
        t.start()
        for _ in s:
            pass
        t.join()
        return args.tokens

    plan = rm.Plan(args.device, "bfloat16", None, "", ())
    loaded = rm.Loaded(model, tok, plan, 0.0, {}, rm.Runtime("cuda", "generate", ""))   # generate(), as measured here

    def tool_generate() -> int:
        old, sys.stdout = sys.stdout, io.StringIO()
        try:
            with torch.inference_mode():
                answer = rm.generate_answer(loaded, inputs, rm.Sampling(args.tokens, temperature=0), rm.SHOW_STREAM)
        finally:
            sys.stdout = old
        return len(answer.token_times)

    for name, fn in {"plain generate": plain, "streamer, main thread": streamer_main_thread,
                     "streamer in a second thread": streamer_thread, "the tool's generate()": tool_generate}.items():
        fn()   # warm-up
        for _ in range(2):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(f"{name:<30} {(time.perf_counter() - start) * 1000 / tokens:7.2f} ms/token ({tokens} tokens)",
                  flush=True)


if __name__ == "__main__":
    main()
