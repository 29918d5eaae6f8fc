#!/usr/bin/env bash
# Run the tool as a user would on real-size models with random weights (decode speed does
# not depend on the weights' values): Qwen2.5-3B-Instruct and -1.5B-Instruct text-only, and
# Qwen2.5-Omni-3B with a picture; then again with another process holding most of the GPU,
# to see the offload warning and the fall back to the CPU. Plain transformers `generate` on
# the same 3B checkpoint is timed in the same run, for comparison.
#
#   bash bench/real_size_run.sh            (on a machine with an NVIDIA GPU; ~6 minutes)
#   ONLY_SPEED=1 bash bench/real_size_run.sh   (the tool's own runs only)
set -uo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-/tmp/real_size_models}
PROMPT="Explain quantum computing in simple terms"
mkdir -p "$MODELS"

python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '|', torch.cuda.get_device_name(0))"
python3 tests/tiny_models.py "$MODELS" --full-size --device cuda --only qwen2 qwen2_5_omni 2>&1 | grep -v "Writing\|Model config"
python3 tests/tiny_models.py "$MODELS/small" --full-size --device cuda --only qwen2 \
    --text-config Qwen--Qwen2.5-1.5B-Instruct 2>&1 | grep -v "Writing\|Model config"

tool() {
    echo; echo "\$ python run_multimodal.py $*"
    python3 run_multimodal.py "$@" > /tmp/answer.txt
    echo "exit code $? · answer: $(wc -c < /tmp/answer.txt) bytes on stdout"
}

[ -z "${ONLY_SPEED:-}" ] && tool --self_test
tool --model_id "$MODELS/qwen2" --prompt "$PROMPT" --max_new_tokens 256 --temperature 0
tool --model_id "$MODELS/small/qwen2" --prompt "$PROMPT" --max_new_tokens 256 --temperature 0
tool --model_id "$MODELS/qwen2_5_omni" --prompt "Describe this image and explain what's happening" \
     --image_path sample_data/sample_image.jpg --max_new_tokens 256 --temperature 0
tool --model_id "$MODELS/qwen2" --prompt "$PROMPT" --max_new_tokens 256 --temperature 0 --compile
tool --model_id "$MODELS/qwen2" --prompt "$PROMPT" --max_new_tokens 256 --temperature 0 --no_fast_decode
[ -n "${ONLY_SPEED:-}" ] && exit 0   # ONLY_SPEED=1: the runs above alone (~3 minutes)
tool --model_id "$MODELS/qwen2" --prompt "$PROMPT" --max_new_tokens 16 --quantize 4bit

echo; echo "--- plain transformers generate (eager), same 3B checkpoint, 256 tokens forced"
python3 - "$MODELS/qwen2" <<'PY'
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
inputs = tok.apply_chat_template([{"role": "user", "content": "Explain quantum computing in simple terms"}],
                                 add_generation_prompt=True, return_dict=True, return_tensors="pt").to("cuda")
for _ in range(2):
    torch.cuda.synchronize(); start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=256, min_new_tokens=256, do_sample=False)
    torch.cuda.synchronize(); seconds = time.perf_counter() - start
print(f"plain generate: {out.shape[1] - inputs['input_ids'].shape[1]} tokens in {seconds:.2f} s = "
      f"{(out.shape[1] - inputs['input_ids'].shape[1]) / seconds:.1f} tokens/s (includes prefill)")
PY

echo; echo "--- another process holds all but 6 GB of the GPU"
python3 - <<'PY' &
import pathlib, time, torch
free, _ = torch.cuda.mem_get_info()
hold = torch.empty(free - 6 * 2**30, dtype=torch.uint8, device="cuda")
pathlib.Path("/tmp/hog_ready").touch()
time.sleep(900)
PY
HOG=$!
for _ in $(seq 60); do [ -f /tmp/hog_ready ] && break; sleep 1; done
tool --model_id "$MODELS/qwen2_5_omni" --prompt "Describe this image" --image_path sample_data/sample_image.jpg \
     --max_new_tokens 16 --temperature 0
tool --model_id "$MODELS/qwen2" --prompt "$PROMPT" --max_new_tokens 16 --temperature 0
kill $HOG
wait $HOG 2>/dev/null

echo; echo "--- the streaming path against plain generate, Qwen2.5-1.5B, warm"
python3 bench/stream_overhead.py "$MODELS/small/qwen2" --tokens 128 2>&1 | grep "ms/token"
