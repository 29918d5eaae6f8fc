"""Time to the first token of each turn of a chat: the tool keeping its cache between turns, the tool with
--no_kv_reuse (the whole conversation prefilled at every turn), and plain transformers generate() (the same),
in one process, on the same model and conversation.

A picture of 1,280 tokens (the sample photo at 1120 x 896) goes with the first question; five short questions
follow. Each answer is forced to --answer_tokens tokens (greedy; random weights rarely stop), so that the
history grows the same way on every path. The time is what a user waits: from the question (its inputs built
by the processor) to the first token on the screen.

    python bench/bench_chat.py                                    (GPU: Omni-3B thinker, VL-3B; random weights)
    python bench/bench_chat.py --device cpu --models qwen2:Qwen--Qwen2.5-0.5B-Instruct tiny_vl
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

QUESTIONS = ["What is in this picture?", "What colour is it?", "Is it outside?", "What time of day is it?",
             "Describe it in one word.", "Thank you!"]


def build(name: str, folder: Path, device: str) -> Path:
    """A checkpoint: 'omni' (Qwen2.5-Omni-3B, thinker), 'vl' (Qwen2.5-VL-3B), 'qwen2:CONFIG' (a text model of
    that real config), all random and full-size; 'tiny_vl' the tests' tiny VL; or a folder that holds one."""
    import tiny_models

    if Path(name).is_dir():   # a checkpoint already built (bench/bench_speech.py's, say)
        return Path(name)
    if name == "omni":
        return tiny_models.build_qwen2_5_omni(folder / "omni", full_size=True, device=device)
    if name == "vl":
        return tiny_models.build_qwen2_5_vl(folder / "vl", full_size=True, device=device)
    if name == "tiny_vl":
        return tiny_models.build_qwen2_5_vl(folder / "tiny_vl")
    return tiny_models.build_qwen2(folder / "qwen2", full_size=True, device=device, config_name=name.split(":", 1)[1])


def chat(loaded: rm.Loaded, kind: str, picture, answer_tokens: int, path: str) -> list[tuple]:
    """Six turns on one path ('reuse', 'no_reuse' or 'plain'): (prompt tokens, reused, seconds to the first token)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class First(BaseStreamer):
        def __init__(self):
            self.at, self.tokens = None, []

        def put(self, value):
            if self.at is None and self.tokens:
                self.at = time.perf_counter()
            self.tokens.append(value)

        def end(self):
            pass
    sampling = rm.Sampling(answer_tokens, temperature=0, min_new_tokens=answer_tokens)
    cache = rm.ChatCache() if path == "reuse" else None
    messages, turns, model = [], [], loaded.model
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for number, question in enumerate(QUESTIONS):
        media = rm.Media(images=[picture] if number == 0 else [])
        messages.append(rm.build_messages(question, None, media, kind)[-1])
        sync()
        start = time.perf_counter()
        inputs = rm.prepare_inputs(loaded.processor, messages, model.device, rm.media_of(messages, False),
                                   cache.pictures if cache else None)
        with torch.inference_mode():
            if path == "plain":
                streamer = First()
                out = model.generate(**inputs, **sampling.generate_kwargs(), streamer=streamer)
                text = loaded.processor.batch_decode(out[:, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)[0]
                first = streamer.at
            else:
                answer = rm.generate_answer(loaded, inputs, sampling, rm.SHOW_NONE, chat=cache)
                text, first = answer.text, answer.token_times[0]
        turns.append((int(inputs["input_ids"].shape[-1]), cache.reused if cache else 0, first - start))
        messages.append({"role": "assistant", "content": text if kind == "text" else [{"type": "text", "text": text}]})
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--models", nargs="+", default=["omni", "vl"])
    parser.add_argument("--answer_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="each path's chat, the first run warming up")
    args = parser.parse_args()

    import torch
    import transformers
    from PIL import Image

    rm.quiet_libraries(debug=False)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{args.answer_tokens} tokens an answer, greedy", flush=True)
    picture = Image.open(ROOT / "sample_data" / "sample_image.jpg").convert("RGB").resize((1120, 896))
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            info = rm.resolve_model(str(build(name, Path(folder), args.device)))
            dtype = "bfloat16" if args.device == "cuda" else "float32"
            plan = rm.Plan(args.device, dtype, None, "", (), components=("thinker",) if info.kind == "omni" else ())
            model, processor = rm.load_model(info, plan, rm.detect_hardware())
        runtime = rm.choose_runtime(model, args.device, rm.Options())
        loaded = rm.Loaded(model, processor, plan, 0.0, {}, runtime)
        image = picture if info.vision else None
        results = {}
        for path in ("reuse", "no_reuse", "plain"):
            for _ in range(args.repeats):
                results[path] = chat(loaded, info.kind, image, args.answer_tokens, path)
        print(f"\n{name} ({info.model_type}, {dtype}, {runtime.decoder} decoder): time to the first token, ms")
        print(f"  {'turn':>4} {'prompt':>7} {'reused':>7} {'kept cache':>11} {'--no_kv_reuse':>14} {'plain':>8}")
        for turn, (kept, again, plain) in enumerate(zip(results["reuse"], results["no_reuse"], results["plain"]), 1):
            print(f"  {turn:>4} {kept[0]:>7} {kept[1]:>7} {1000 * kept[2]:>11.1f} {1000 * again[2]:>14.1f} "
                  f"{1000 * plain[2]:>8.1f}")
        kept = [turn[2] for turn in results["reuse"]]
        again = [turn[2] for turn in results["no_reuse"]]
        print(f"  turn 6 / turn 2 with the cache kept: {kept[5] / kept[1]:.2f}; turns 2-6 sooner than without it: "
              + ", ".join(f"{a / k:.1f}x" for a, k in zip(again[1:], kept[1:])))
        model = processor = loaded = None


if __name__ == "__main__":
    main()
