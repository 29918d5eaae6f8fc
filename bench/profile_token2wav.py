"""Where token2wav's time goes, a chunk at a time, on a full-size random-weight Qwen2.5-Omni-3B: each
window's ODE solve (the lengths the chunk schedule needs; 36 DiT evaluations each) eager and as a CUDA
graph, in float32 and with TF32 matrix products; the vocoder on each chunk size's mel (with 2 x 20 frames
of overlap); transformers' token2wav on the whole reply at once; and what TF32 does to the mel.

    python bench/profile_token2wav.py            (on an NVIDIA GPU, after bench/bench_speech.py built the model)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_multimodal as rm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/real_size_models/qwen2_5_omni"))
    parser.add_argument("--codes", type=int, default=500)
    args = parser.parse_args()

    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    rm.quiet_libraries(debug=False)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda")
    token2wav, voice = model.token2wav.float(), model.speaker_map["Chelsie"]
    codes = torch.randint(0, 8000, (1, args.codes), device="cuda")
    matmul = torch.backends.cuda.matmul
    dit, vocoder = (sum(p.numel() for p in part.parameters()) / 1e6 for part in
                    (token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model))
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name(0)} | cudnn TF32 "
          f"{torch.backends.cudnn.allow_tf32} | DiT {dit:.0f} M, vocoder {vocoder:.0f} M parameters")

    def timed(run, repeats: int = 5) -> float:
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    runtime = rm.Runtime("cuda", "graph", "")
    block = token2wav.code2wav_dit_model.block_size
    windows, lengths = rm.SpeechChunks.window_lengths(block), rm.SpeechChunks.vocoder_lengths(block)
    with torch.inference_mode():
        for tf32 in (False, True):
            model = rm.Token2Wav(token2wav, voice, runtime)
            model.tf32 = tf32
            model.capture(windows, lengths)
            noise = rm.SpeechChunks(model, args.codes).noise
            for window in windows:
                eager = timed(lambda: model._solve(noise[:, :window], codes[:, :window // 2]))
                graphed = timed(lambda: model.solve(noise[:, :window], codes[:, :window // 2]))
                print(f"{'TF32' if tf32 else 'float32'} matmuls: one {window}-frame window's solve "
                      f"(36 DiT evaluations) eager {1000 * eager:.1f} ms, CUDA graph {1000 * graphed:.1f} ms")
        for size in sorted({block * n for n in rm.SPEECH_CHUNK_SCHEDULE}):
            mel = torch.randn((1, 80, size + 2 * rm.VOCODER_OVERLAP_FRAMES), device="cuda")
            print(f"vocoder on {mel.shape[2]} frames: {1000 * timed(lambda: model.vocode(mel)):.1f} ms")
        for tf32 in (False, True):
            matmul.allow_tf32 = tf32
            whole = timed(lambda: token2wav(codes, conditioning=voice["cond"].cuda().float().view(1, -1),
                                            reference_mel=voice["ref_mel"].cuda().float()), repeats=2)
            print(f"transformers token2wav, {args.codes} codes at once ({'TF32' if tf32 else 'float32'} matmuls): "
                  f"{whole:.2f} s")
        matmul.allow_tf32 = False
        made = {}
        for tf32 in (False, True):
            model = rm.Token2Wav(token2wav, voice, runtime)
            model.tf32 = tf32
            seconds = model.capture(windows, lengths)
            chunks = rm.SpeechChunks(model, args.codes)
            torch.cuda.synchronize()
            start = time.perf_counter()
            waves = chunks.add(codes, args.codes, final=True)
            torch.cuda.synchronize()
            made[tf32] = chunks.mel
            print(f"chunked, {len(waves)} chunks ({'TF32' if tf32 else 'float32'}): "
                  f"{time.perf_counter() - start:.2f} s for {args.codes / 50:.1f} s of speech (graphs captured first, "
                  f"in {seconds:.1f} s)")
        print(f"TF32 vs float32 mel: relative L2 "
              f"{float(torch.linalg.norm(made[True] - made[False]) / torch.linalg.norm(made[False])):.2e}")

if __name__ == "__main__":
    main()
