"""Time a spoken reply from Qwen2.5-Omni-3B: when the first audio comes, the whole reply's real-time
factor, the talker's milliseconds a code and token2wav's seconds, beside plain transformers generate().

Random weights from the real config (speed does not depend on the weights' values), built on the GPU
by tests/tiny_models.py. The text is forced to --text_tokens (greedy; a random thinker rarely stops)
and the speech to --seconds (the talker's codes, 50 a second, min = max). Measured in one process, in
turn: the tool's path (generate_answer with a Speech: thinker and talker interleaved, token2wav in
chunks) with token2wav's CUDA graphs and without, then plain transformers `generate` on the same model
and inputs. Then, on the codes the tool made: the chunks against token2wav over the whole reply at
once (mel and wave, relative L2), and the graphed chunks against the eager ones.

--timeline prints, for each chunk of speech, when it was started, how long that held the host and
when the GPU made it; --schedule and --priority try other chunk sizes and stream priorities.

    python bench/bench_speech.py                 (on an NVIDIA GPU; ~3 minutes with the build)
    python bench/bench_speech.py --seconds 5 --model /tmp/real_size_models/qwen2_5_omni

--qwen3 times Qwen3-Omni-30B-A3B-Instruct instead (12.5 frames a second): random full-size weights made in
memory on the GPU (about 70 GB in bfloat16: more than a lent machine's disk holds, so never saved), the tiny
model on a CPU. The tool's streamed reply (thinker, talker and code predictor on its fast decoder, CUDA graphs
on a GPU; code2wav in chunks), the same through each part's own forward pass (--runs eager: the tool's way
for what its decoder cannot run), then transformers' generate() on the same model and inputs; the first sound, the real-time factor,
the talker's and the code predictor's milliseconds a frame, code2wav's seconds, peak memory against the plan.

    python bench/bench_speech.py --qwen3         (on an H100 or H200; ~4 minutes)
    python bench/bench_speech.py --qwen3 --seconds 2 --text_tokens 16    (the tiny model on a CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_multimodal as rm  # noqa: E402

PROMPT = "Tell me about cats in a few sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/real_size_models/qwen2_5_omni"))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the spoken reply to force")
    parser.add_argument("--text_tokens", type=int, default=64, help="length of the text answer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", nargs="+", choices=("graphs", "eager", "plain"), default=["graphs", "eager", "plain"])
    parser.add_argument("--priority", type=int, help="token2wav's CUDA stream priority (default: the tool's)")
    parser.add_argument("--timeline", action="store_true", help="when each chunk was started and made (CUDA)")
    parser.add_argument("--schedule", help="token2wav's chunks in DiT blocks, e.g. 1,2,4,8 (default: the tool's)")
    parser.add_argument("--qwen3", action="store_true", help="Qwen3-Omni-30B-A3B, made in memory (see above)")
    parser.add_argument("--compile", action="store_true", help="--qwen3: as the tool's --compile (layers compiled)")
    args = parser.parse_args()
    if args.qwen3:
        return qwen3(args)

    import numpy as np
    import torch
    import transformers

    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_models.py"), str(args.model.parent), "--full-size",
                        "--device", "cuda", "--only", "qwen2_5_omni"], check=True, capture_output=True)
    if args.schedule:
        rm.SPEECH_CHUNK_SCHEDULE = tuple(int(n) for n in args.schedule.split(","))
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}")
    rm.quiet_libraries(debug=False)
    info = rm.resolve_model(str(args.model))
    facts = rm.model_facts(rm.load_config(info, False), info, False)
    hw = rm.detect_hardware()
    codes = round(args.seconds * rm.TALKER_CODES_PER_SECOND)
    sampling = rm.Sampling(args.text_tokens, temperature=0)
    options = rm.Options(output_audio=Path("unused.wav"), sampling=sampling, speech_codes=codes)
    plan = rm.choose_plan(hw, facts, options)
    print(f"plan: {plan.device} {plan.dtype}, estimate {rm.format_bytes(plan.estimate.total)}; "
          f"{args.text_tokens} text tokens, {codes} codes ({args.seconds:.1f} s of speech)")

    start = time.perf_counter()
    model, processor = rm.load_model(info, plan, hw)
    speech = rm.Speech("Chelsie", max_codes=codes, min_codes=codes)
    runtime = rm.choose_runtime(model, plan.device, options)
    loaded = rm.Loaded(model, processor, plan, 0.0, {}, runtime, speech)
    print(f"load {time.perf_counter() - start:.1f} s; decoder {runtime.decoder}")
    media = rm.Media()
    inputs = rm.prepare_inputs(processor, rm.build_messages(PROMPT, rm.SPEECH_SYSTEM_PROMPT, media, "omni"),
                               model.device, media)
    made = {}   # the codes token2wav was given and the reply's waveform, per label
    add = rm.SpeechChunks.add

    def tool(label: str, graphs: bool) -> None:
        if graphs:   # as load() does: at load time
            token2wav = rm.token2wav_for(model, speech, runtime)
        else:
            token2wav = rm.Token2Wav(model.token2wav, model.speaker_map[speech.speaker], runtime)
        if args.priority is not None and cuda:
            token2wav.queue.stream = torch.cuda.Stream(priority=args.priority)
        speaking = dataclasses.replace(loaded, token2wav=token2wav)
        seen = {}

        def spy_add(self, all_codes, available, final):
            seen["codes"] = all_codes[0, :available].clone()
            return add(self, all_codes, available, final)
        chunk, ready, timeline = rm.SpeechChunks._chunk, rm.SpeechChunks.ready, []

        def spy_chunk(self, codes, frames):   # when each chunk was started, how long that took the host
            begun = time.perf_counter()
            chunk(self, codes, frames)
            _, end, since = self.queue.items[-1] if cuda else (None, None, None)
            timeline.append(("chunk", begun - base_s, time.perf_counter() - begun, since, end))

        def spy_ready(self):
            begun = time.perf_counter()
            out = ready(self)
            timeline.append(("ready", begun - base_s, time.perf_counter() - begun, None, None))
            return out
        rm.SpeechChunks.add, rm.SpeechChunks._chunk, rm.SpeechChunks.ready = spy_add, spy_chunk, spy_ready
        try:
            torch.manual_seed(0)
            base = torch.cuda.Event(enable_timing=True) if cuda else None
            base_s = time.perf_counter()
            if base is not None:
                base.record()
            answer = rm.generate_answer(speaking, inputs, sampling, rm.SHOW_NONE)
        finally:
            rm.SpeechChunks.add, rm.SpeechChunks._chunk, rm.SpeechChunks.ready = add, chunk, ready
        if args.timeline:
            for kind, at, took, begun, ended in timeline:
                if kind == "ready" and took < 1e-3:
                    continue   # a look that found nothing to wait for
                gpu = (f"; on the GPU {base.elapsed_time(begun) / 1000:.3f}-{base.elapsed_time(ended) / 1000:.3f} s"
                       if begun is not None else "")
                print(f"    {kind} at {at:.3f} s, the host busy {1000 * took:.1f} ms{gpu}")
        made[label] = seen["codes"], answer.wav
        stats = rm.stats_of(answer, speaking, 0.0)
        total, seconds = answer.end - answer.start, len(answer.wav) / rm.SPEECH_SAMPLE_RATE
        print(f"{label:<22} {seconds:.2f} s of audio in {total:.2f} s (real-time factor {total / seconds:.2f}); "
              f"first audio {answer.first_audio_s:.3f} s from the start, "
              f"{answer.first_audio_s - stats.ttft_s:.3f} s after the prompt was read (first token "
              f"{stats.ttft_s:.3f} s); text {stats.new_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s "
              f"with the talker; talker alone {stats.talker_ms_per_code:.2f} ms a code; token2wav "
              f"{stats.token2wav_s:.2f} s in all{' (GPU time, beside the talker)' if cuda else ''}, "
              f"{sum(kind == 'chunk' for kind, *_ in timeline)} chunks of {rm.SPEECH_CHUNK_SCHEDULE} blocks")

    def plain(label: str) -> None:
        torch.manual_seed(0)
        start = time.perf_counter()
        _, wav = model.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=args.text_tokens,
                                thinker_do_sample=False, talker_max_new_tokens=codes, talker_min_new_tokens=codes)
        sync()
        total, seconds = time.perf_counter() - start, wav.numel() / rm.SPEECH_SAMPLE_RATE
        print(f"{label:<22} {seconds:.2f} s of audio in {total:.2f} s (real-time factor {total / seconds:.2f}); "
              f"first audio at the end: {total:.2f} s")

    runs = {"graphs": ("tool, token2wav graphs", lambda name: tool(name, True)),
            "eager": ("tool, token2wav eager", lambda name: tool(name, False)),
            "plain": ("plain generate", plain)}
    for key in args.runs:
        label, run = runs[key]
        for repeat in range(args.repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            with torch.inference_mode():
                run(f"{label} #{repeat + 1}")
            peak = torch.cuda.max_memory_allocated() if cuda else rm.peak_memory("cpu")[0]
            print(f"{'':<22} peak memory {rm.format_bytes(peak)} "
                  f"(plan's estimate {rm.format_bytes(plan.estimate.total)})")

    if args.repeats > 1:
        print("the same codes in every run: " + "; ".join(
            f"{key} {all(torch.equal(made[f'{runs[key][0]} #1'][0], made[f'{runs[key][0]} #{n + 1}'][0]) for n in range(args.repeats))}"
            for key in args.runs if key != "plain"))
    if not {"graphs", "eager"} <= set(args.runs):
        return
    # Exactness, on the codes of the last graphed run
    made_codes, chunked = made[f"tool, token2wav graphs #{args.repeats}"]
    eager = made[f"tool, token2wav eager #{args.repeats}"][1]
    voice = model.speaker_map["Chelsie"]
    with torch.inference_mode():
        whole = rm.Token2Wav(model.token2wav, voice, runtime)
        mel = whole.solve(rm.SpeechChunks(whole, len(made_codes)).noise, made_codes.view(1, -1))
        wave = whole.vocode(mel).cpu().numpy()
        again = rm.SpeechChunks(rm.token2wav_for(model, speech, runtime), len(made_codes))
        again.add(made_codes.view(1, -1), len(made_codes), final=True)
        sync()
    same_codes = torch.equal(made_codes, made[f"tool, token2wav eager #{args.repeats}"][0])
    rel = float(torch.linalg.norm(again.mel - mel) / torch.linalg.norm(mel))
    print(f"chunks vs whole: mel relative L2 {rel:.2e}; wave relative L2 "
          f"{np.linalg.norm(chunked - wave) / np.linalg.norm(wave):.2e} (wave RMS {np.sqrt(np.mean(wave ** 2)):.3f}); "
          f"graphed vs eager chunks: max |difference| {np.abs(chunked - eager).max():.2e} "
          f"(same codes in both runs: {same_codes})")


def qwen3(args) -> None:
    """The Qwen3-Omni bench (--qwen3)."""
    import torch
    import transformers
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}")
    rm.quiet_libraries(debug=False)
    frames = round(args.seconds * rm.QWEN3_CODES_PER_SECOND)
    sampling = rm.Sampling(args.text_tokens, temperature=0)
    real = rm.resolve_model(str(ROOT / "tests" / "configs" / "Qwen--Qwen3-Omni-30B-A3B-Instruct"))
    facts = rm.model_facts(rm.load_config(real, False), real, False)
    options = rm.Options(output_audio=Path("unused.wav"), sampling=sampling, compile_layers=args.compile,
                         speech_codes=math.ceil(frames * rm.TALKER_CODES_PER_SECOND / rm.QWEN3_CODES_PER_SECOND))
    plan = rm.choose_plan(rm.detect_hardware(), facts, options)
    print(f"plan for the real model here: {plan.device} {plan.dtype}, estimate {rm.format_bytes(plan.estimate.total)}"
          f"; {args.text_tokens} text tokens, {frames} frames ({args.seconds:.1f} s of speech)")
    start = time.perf_counter()
    model, processor = tiny_models.qwen3_omni(full_size=cuda, device="cuda" if cuda else "cpu", talker=True)
    if not cuda:
        model.float()
    talker = model.talker   # as load_model() mends it
    talker.config.audio_config = model.config.thinker_config.audio_config
    sync()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"made in {time.perf_counter() - start:.1f} s: {parameters / 1e9:.2f} B parameters, "
          f"{rm.format_bytes(sum(p.numel() * p.element_size() for p in model.parameters()))}")
    speech = rm.Speech("Ethan", max_codes=frames, min_codes=frames)
    runtime = rm.choose_runtime(model, "cuda" if cuda else "cpu", options)
    start = time.perf_counter()
    predictor = rm.code_predictor_for(model, runtime) if runtime.fast else None   # as load() makes it
    loaded = rm.Loaded(model, processor, plan, 0.0, {}, runtime, speech, predictor=predictor)
    print(f"decoder {runtime.decoder}; the code predictor ready in {time.perf_counter() - start:.2f} s")
    media = rm.Media()
    inputs = rm.prepare_inputs(processor, rm.build_messages(PROMPT, rm.SPEECH_SYSTEM_PROMPT, media, "omni"),
                               model.device, media)

    forward = dataclasses.replace(runtime, decoder="stages", lag=0)

    def tool(label: str, staged: bool = False) -> None:
        torch.manual_seed(0)
        speaking = dataclasses.replace(loaded, runtime=forward) if staged else loaded
        answer = rm.generate_answer(speaking, inputs, sampling, rm.SHOW_NONE)
        stats = rm.stats_of(answer, speaking, 0.0)
        total, seconds = answer.end - answer.start, len(answer.wav) / rm.SPEECH_SAMPLE_RATE
        print(f"{label:<16} {seconds:.2f} s of audio in {total:.2f} s (real-time factor {total / seconds:.2f}); "
              f"first audio {answer.first_audio_s:.3f} s from the start, {answer.first_audio_s - stats.ttft_s:.3f} s "
              f"after the prompt was read (first token {stats.ttft_s:.3f} s); text {stats.new_tokens} tokens at "
              f"{stats.decode_tokens_per_s:.1f} tokens/s with the talker; talker {stats.talker_ms_per_code:.1f} ms a "
              f"frame, code predictor {stats.predictor_ms_per_frame:.1f} ms a frame; code2wav "
              f"{stats.token2wav_s:.2f} s in all; {stats.speech_codes} frames")

    def plain(label: str) -> None:
        torch.manual_seed(0)
        start = time.perf_counter()
        _, wav = model.generate(**inputs, speaker="Ethan", thinker_max_new_tokens=args.text_tokens,
                                thinker_do_sample=False, thinker_eos_token_id=model.config.im_end_token_id,
                                talker_max_new_tokens=frames, talker_min_new_tokens=frames)
        sync()
        total, seconds = time.perf_counter() - start, wav.numel() / rm.SPEECH_SAMPLE_RATE
        print(f"{label:<16} {seconds:.2f} s of audio in {total:.2f} s (real-time factor {total / seconds:.2f}); "
              f"first audio at the end: {total:.2f} s")

    for key, label, run in (("graphs", "tool, streamed", tool), ("eager", "tool, forward", lambda name: tool(name, True)),
                            ("plain", "plain generate", plain)):
        if key not in args.runs:
            continue
        for repeat in range(args.repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
                run(f"{label} #{repeat + 1}")
            peak = torch.cuda.max_memory_allocated() if cuda else rm.peak_memory("cpu")[0]
            print(f"{'':<16} peak memory {rm.format_bytes(peak)} (plan's estimate for the real model "
                  f"{rm.format_bytes(plan.estimate.total)})")

    if cuda and predictor is not None and predictor.graph is not None:   # where a frame's time goes
        def per_frame(unit, count: int = 100) -> float:
            hidden, code, residual = unit.hidden.clone(), unit.code.clone(), unit.residual.clone()
            unit.frame(hidden, code, residual)
            sync()
            begun = time.perf_counter()
            for _ in range(count):
                unit.frame(hidden, code, residual)
            sync()
            return 1000 * (time.perf_counter() - begun) / count
        settings = rm.predictor_settings
        rm.predictor_settings = lambda model, groups: {"do_sample": False, "max_new_tokens": groups - 1}
        greedy = rm.CodePredictor(model, runtime)
        rm.predictor_settings = settings
        print(f"a frame of the code predictor replayed alone: {per_frame(predictor):.2f} ms sampled, "
              f"{per_frame(greedy):.2f} ms greedy (no top-k/top-p/draws)")


if __name__ == "__main__":
    main()
