"""A spoken conversation, timed turn by turn: `--voice` as a user runs it, the microphone simulated
(tests/fake_sound: a 3.4-second spoken question, played in real time into the microphone's callback, once per
turn, with silence between), the voice detector and the model real.

Per turn: the detector's end-of-speech delay (from the end of the voice as the detector placed it, and from
the last loud sample of the recording), then from the moment the detector was sure: the first text token
(audio features, the audio encoder and the prefill, then one step), the first chunk of speech made, and the
first reply sample handed to the speakers; the prompt's tokens and how many came from the cache. The same
conversation then with --no_fast_decode (transformers' generate(): the whole reply, then its sound), in the
same process, on the same model.

    python bench/bench_voice.py                           (GPU: random full-size Qwen2.5-Omni-3B)
    python bench/bench_voice.py --model tiny --device cpu (the tests' tiny Omni)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "fake_sound"))   # the microphone and speakers this machine may lack

import run_multimodal as rm  # noqa: E402

QUESTION = ROOT / "sample_data" / "question_16k_mono.wav"


def build(name: str, folder: Path, device: str) -> Path:
    import tiny_models
    if name == "tiny":
        return tiny_models.build_qwen2_5_omni(folder / "tiny_omni")
    if Path(name).is_dir():
        return Path(name)
    return tiny_models.build_qwen2_5_omni(Path(name), full_size=True, device=device)


def loud_end(path: Path) -> float:
    """The recording's last sample above 2% of its peak (seconds)."""
    import numpy as np
    import soundfile
    samples, rate = soundfile.read(path, dtype="float32")
    return float(np.flatnonzero(np.abs(samples) > 0.02 * np.abs(samples).max())[-1] / rate)


def conversation(model: Path, flags: list[str], turns: int, gap: float) -> list[dict]:
    """One --voice run of `turns` questions `gap` seconds apart; each turn's figures."""
    placed = [0.5 + turn * gap for turn in range(turns)]
    os.environ["FAKE_MIC"] = ",".join(f"{QUESTION}@{at}" for at in placed)
    os.environ["FAKE_MIC_SECONDS"] = str(placed[-1] + gap)
    figures, describe = [], rm.describe_turn

    def spy(heard, outcome, stopped, barged):   # each turn as the tool describes it
        stats = outcome.stats if outcome else None
        row = {"start": heard.start, "end": heard.end, "detector_s": heard.told - heard.end,
               "after_voice_s": heard.told - (placed[len(figures)] + voice_end)}
        if stats is not None:
            told_at = heard.told_at
            row.update(first_token_s=stats.started_at + stats.ttft_s - told_at,
                       first_chunk_s=None if stats.first_audio_s is None else
                       stats.started_at + stats.first_audio_s - told_at,
                       first_sound_s=None if stats.first_played_s is None else
                       stats.started_at + stats.first_played_s - told_at,
                       prompt=stats.prompt_tokens, reused=stats.reused_tokens or 0, speech_s=stats.audio_seconds)
        figures.append(row)
        return describe(heard, outcome, stopped, barged)
    rm.describe_turn = spy
    try:
        code = rm.main(["--model_id", str(model), "--voice", *flags])
    finally:
        rm.describe_turn = describe
    if code != 0:
        raise SystemExit(f"the run failed ({code})")
    return figures


def show(label: str, figures: list[dict], turns: int) -> None:
    print(f"\n{label}: {len(figures)} of {turns} questions heard as turns")
    print(f"{'turn':>4} {'spoken (s)':>12} {'detector':>9} {'after voice':>12} {'1st token':>10} {'1st chunk':>10} "
          f"{'1st sound':>10} {'prompt':>7} {'reused':>7} {'speech':>7}")

    def ms(value):
        return "-" if value is None else f"{1000 * value:.0f} ms"
    for number, row in enumerate(figures, 1):
        print(f"{number:>4} {row['start']:5.2f}-{row['end']:5.2f} {ms(row['detector_s']):>9} "
              f"{ms(row['after_voice_s']):>12} {ms(row.get('first_token_s')):>10} {ms(row.get('first_chunk_s')):>10} "
              f"{ms(row.get('first_sound_s')):>10} {row.get('prompt', '-'):>7} {row.get('reused', '-'):>7} "
              f"{row.get('speech_s') or 0:6.1f}s")


voice_end = loud_end(QUESTION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/real_size_models/qwen2_5_omni",
                        help="'tiny', a checkpoint folder, or where to build the full-size random Omni-3B")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--gap", type=float, default=9.0, help="seconds from one question to the next")
    parser.add_argument("--speech_seconds", default="2", help="each reply's speech at most (--max_speech_seconds)")
    parser.add_argument("--text_tokens", default="24", help="each reply's text at most (--max_new_tokens)")
    parser.add_argument("--runs", nargs="+", choices=("tool", "plain"), default=["tool", "plain"])
    args = parser.parse_args()
    import torch
    print("torch", torch.__version__, "| device", torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU")
    with tempfile.TemporaryDirectory() as folder:
        model = build(args.model, Path(folder), args.device)
        common = ["--max_speech_seconds", args.speech_seconds, "--max_new_tokens", args.text_tokens,
                  "--temperature", "0", "--seed", "0", "--device", args.device]
        for run in args.runs:
            started = time.perf_counter()
            figures = conversation(model, common + (["--no_fast_decode"] if run == "plain" else []), args.turns,
                                   args.gap)
            show({"tool": "the tool (fast decoder, speech in chunks)",
                  "plain": "--no_fast_decode (transformers' generate(), the whole reply then its sound)"}[run],
                 figures, args.turns)
            print(f"(the run: {time.perf_counter() - started:.0f} s with loading)")


if __name__ == "__main__":
    main()
