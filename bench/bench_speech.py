"""Time a spoken reply from Qwen2.5-Omni-3B: wall time, real-time factor and time to the first audio.

Random weights from the real config (speed does not depend on the weights' values), built on the
GPU by tests/tiny_models.py; the speech is forced to a length (the talker's codes, 50 a second,
min = max), since a random talker never stops on its own. Measured in one process, in turn:
the tool's own path (load_model, prepare_inputs, generate with a Speech), and plain transformers
`generate` on the same model with the same inputs. The first run of each is cold.

    python bench/bench_speech.py                 (on an NVIDIA GPU; ~3 minutes with the build)
    python bench/bench_speech.py --seconds 5 --model /tmp/real_size_models/qwen2_5_omni
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_multimodal as rm  # noqa: E402

PROMPT = "Tell me about cats in a few sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/real_size_models/qwen2_5_omni"))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the spoken reply to force")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--static_talker", action="store_true", help="also try the talker with a static KV cache")
    args = parser.parse_args()

    import torch
    import transformers

    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_models.py"), str(args.model.parent), "--full-size",
                        "--device", "cuda", "--only", "qwen2_5_omni"], check=True, capture_output=True)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}")
    rm.quiet_libraries(debug=False)
    info = rm.resolve_model(str(args.model))
    facts = rm.model_facts(rm.load_config(info, False), info, False)
    hw = rm.detect_hardware()
    codes = round(args.seconds * rm.TALKER_CODES_PER_SECOND)
    options = rm.Options(output_audio=Path("unused.wav"), sampling=rm.Sampling(64, temperature=0), speech_codes=codes)
    plan = rm.choose_plan(hw, facts, options)
    print(f"plan: {plan.device} {plan.dtype}, estimate {rm.format_bytes(plan.estimate.total)}")

    start = time.perf_counter()
    model, processor = rm.load_model(info, plan, hw)
    loaded = rm.Loaded(model, processor, plan, 0.0, {}, rm.choose_decoder(model, plan.device, options))
    print(f"load {time.perf_counter() - start:.1f} s")
    media = rm.Media()
    inputs = rm.prepare_inputs(processor, rm.build_messages(PROMPT, rm.SPEECH_SYSTEM_PROMPT, media, "omni"),
                               model.device, media)
    sampling = rm.Sampling(max_new_tokens=64, temperature=0)
    speech = rm.Speech("Chelsie", max_codes=codes, min_codes=codes)

    def tool() -> float:
        answer = rm.generate_answer(loaded, inputs, sampling, rm.SHOW_NONE, speech)
        stats, wav = rm.stats_of(answer, loaded, 0.0), answer.wav
        print(f"    tool: text {stats.new_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s, "
              f"speech part {stats.speech_s:.2f} s")
        return len(wav) / rm.SPEECH_SAMPLE_RATE

    def plain() -> float:
        _, wav = model.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=64, thinker_do_sample=False,
                                talker_max_new_tokens=codes, talker_min_new_tokens=codes)
        return wav.numel() / rm.SPEECH_SAMPLE_RATE

    def plain_static_talker() -> float:   # a probe: the talker with a static cache (generate compiles it)
        _, wav = model.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=64, thinker_do_sample=False,
                                talker_max_new_tokens=codes, talker_min_new_tokens=codes,
                                talker_cache_implementation="static")
        return wav.numel() / rm.SPEECH_SAMPLE_RATE

    runs = [("tool", tool), ("plain generate", plain)]
    if args.static_talker:
        runs.append(("static talker", plain_static_talker))
    for label, run in runs:
        for repeat in range(args.repeats):
            sync()
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    seconds = run()
            except Exception as exc:   # a probe may fail on this transformers; say how, go on
                print(f"{label:<15} run {repeat + 1}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                break
            sync()
            wall = time.perf_counter() - start
            print(f"{label:<15} run {repeat + 1}: {seconds:.2f} s of audio in {wall:.2f} s "
                  f"(real-time factor {wall / seconds:.2f}; the first audio comes at the end: {wall:.2f} s)")
    peak = torch.cuda.max_memory_allocated() if cuda else rm.peak_memory("cpu")[0]
    print(f"peak CUDA memory {rm.format_bytes(peak)} vs the plan's estimate {rm.format_bytes(plan.estimate.total)}")


if __name__ == "__main__":
    main()
