"""Profile the tool's first and second generate() in one process (CUDA), top operators by CPU time.

    python bench/profile_first_run.py MODEL_DIR

Why it exists: on an H100 (2026-11-27, torch 2.11, transformers 5.17, Qwen2.5-1.5B random weights)
the first run decoded at 12.9 tokens/s and the second at 28.5 (under the profiler). The first run
spent 4.0 s in aten::_cudnn_attention_forward, 1.5 ms a call against 61 us warm: cuDNN builds a plan
for each new sequence length. The tool now turns cuDNN's attention off on CUDA
(torch.backends.cuda.enable_cudnn_sdp(False)); a first run of the CLI then decoded at 45 tokens/s.
Run this again to check that cuDNN's attention no longer appears.
"""

import io
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_multimodal as rm  # noqa: E402


def main() -> None:
    rm.quiet_libraries(debug=False)
    info = rm.resolve_model(sys.argv[1])
    plan = rm.Plan("cuda", "bfloat16", None, "small", ())
    model, tokenizer = rm.load_model(info, plan, rm.detect_hardware())
    loaded = rm.Loaded(model, tokenizer, plan, 0.0, {}, rm.choose_runtime(model, "cuda", rm.Options()))
    messages = rm.build_messages("Explain quantum computing in simple terms", None, rm.Media(), "text")
    inputs = rm.prepare_inputs(tokenizer, messages, model.device)
    for name in ("first", "second"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            old, sys.stdout = sys.stdout, io.StringIO()
            try:
                with torch.inference_mode():
                    answer = rm.generate_answer(loaded, inputs, rm.Sampling(96, temperature=0), rm.SHOW_STREAM)
            finally:
                sys.stdout = old
        print(f"{name} run:", rm.describe_stats(rm.stats_of(answer, loaded, 0.0)))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))


if __name__ == "__main__":
    main()
