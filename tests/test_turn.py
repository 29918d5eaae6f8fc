"""Section 11, one turn: the context window, the record for scripts (--json), and memory running out on
an accelerator: free it, say so in one line, retry once on the CPU, never loop."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from conftest import GREEDY, SAMPLE_IMAGE, fake_hub_cache, offline_env, run_tool
from references import reference_chat

WRAPPER = Path(__file__).resolve().parent / "oom_wrapper.py"
ARGS = ("--prompt", "Hello cat", "--temperature", "0", "--max_new_tokens", "12")
BOTH_FAILED = ("Error: out of memory on cuda and on the CPU; try a smaller model such as Qwen/Qwen2.5-1.5B-Instruct "
               "or fewer --max_new_tokens")


def test_an_answer_past_the_context_window_is_cut_to_fit(tiny_models, tmp_path):
    short = tmp_path / "short_context"
    shutil.copytree(tiny_models["qwen2"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    result = run_tool("--model_id", short, "--prompt", "hello", "--max_new_tokens", "100", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "⚠️ The prompt is 70 tokens and the model reads at most 96: the answer stops after 26 tokens, not " \
        "--max_new_tokens 100" in result.stderr
    assert "26 new tokens" in result.stderr


def test_json_is_the_only_thing_on_stdout_and_has_every_field(tiny_models):
    model = tiny_models["qwen2_5_vl"]
    expected = reference_chat(model, [("Describe it", [SAMPLE_IMAGE])])[0]
    result = run_tool("--model_id", model, "--prompt", "Describe it", "--image_path", SAMPLE_IMAGE, "--json",
                      "--seed", "11", *GREEDY)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)   # nothing but the object
    assert record["text"] == expected and record["audio_path"] is None
    plan = record["plan"]
    assert (plan["device"], plan["dtype"], plan["fits"], plan["media_tokens"]) == ("cpu", "float32", True, 178)
    assert plan["components"]["model"]["parameters"] == 183_520
    stats = record["stats"]
    assert set(stats) >= {"load_s", "prompt_tokens", "new_tokens", "ttft_s", "decode_tokens_per_s",
                          "peak_memory_bytes", "device"}
    assert (stats["new_tokens"], stats["device"]) == (12, "cpu")
    assert stats["prompt_tokens"] == 220 and stats["ttft_s"] > 0 and stats["decode_tokens_per_s"] > 0
    assert stats["peak_memory_bytes"] > 0
    repro = record["reproducibility"]
    import accelerate
    import torch
    import transformers
    assert repro == {
        "model_id": str(model), "revision": None, "path": str(model), "dtype": "float32",
        "device_map": {"": "cpu"}, "seed": 11, "sampling": {"max_new_tokens": 12, "do_sample": False},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__}}
    assert "📈 cpu:" in result.stderr   # the people's lines still go to stderr


def test_json_records_the_hub_revision(tiny_models, tmp_path):
    cache, snapshot = fake_hub_cache(tmp_path, tiny_models["qwen2"])
    result = run_tool("--model_id", "tiny/qwen2", "--prompt", "Hello cat", "--json", *GREEDY,
                      env=offline_env(HF_HUB_CACHE=str(cache)))
    assert result.returncode == 0, result.stderr
    repro = json.loads(result.stdout)["reproducibility"]
    assert (repro["model_id"], repro["revision"], repro["path"]) == ("tiny/qwen2", "0123456789abcdef", str(snapshot))


# --- out of memory --------------------------------------------------------------------

def test_out_of_memory_while_loading_on_the_gpu_retries_on_the_cpu(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], *ARGS)
    result = run_tool(*args, script=WRAPPER, env=offline_env(SIMULATED_GPU_GB="8"))
    assert result.returncode == 0, result.stderr
    assert "🚀 NVIDIA GPU found (Simulated GPU) - using CUDA" in result.stderr
    assert result.stderr.count("⚠️ Out of memory on cuda: freed it, retrying once on the CPU") == 1
    assert "📈 cpu:" in result.stderr
    # The retry is an ordinary CPU run, in the CPU's dtype: the same answer as --device cpu.
    on_cpu = run_tool(*args, "--device", "cpu")
    assert on_cpu.returncode == 0 and result.stdout == on_cpu.stdout and result.stdout.strip()


def test_out_of_memory_on_the_gpu_and_the_cpu_is_a_clean_error(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], *ARGS, script=WRAPPER,
                      env=offline_env(SIMULATED_GPU_GB="8", OOM_AT_GENERATE="1"))
    assert result.returncode == 1
    assert result.stderr.count("retrying once on the CPU") == 1
    assert result.stderr.count("[oom_wrapper] out of memory in a forward pass") == 1
    assert result.stderr.strip().splitlines()[-1] == BOTH_FAILED
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_out_of_memory_on_the_cpu_does_not_retry(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], *ARGS, script=WRAPPER,
                      env=offline_env(OOM_AT_GENERATE="1"))
    assert result.returncode == 1
    assert "retrying" not in result.stderr
    assert result.stderr.count("[oom_wrapper] out of memory in a forward pass") == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: out of memory on the CPU; try a smaller model")


def test_out_of_memory_while_generating_on_the_gpu_retries_on_the_cpu(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], *ARGS)
    result = run_tool(*args, script=WRAPPER, env=offline_env(SIMULATED_GPU_GB="80", SIMULATED_GPU_FITS="1",
                                                             OOM_AT_GENERATE="1"))
    assert result.returncode == 0, result.stderr
    assert "🚀 NVIDIA GPU found (Simulated GPU) - using CUDA" in result.stderr
    assert result.stderr.count("[oom_wrapper] out of memory in a forward pass") == 1
    assert result.stderr.count("⚠️ Out of memory on cuda: freed it, retrying once on the CPU") == 1
    assert result.stderr.count("[oom_wrapper] from_pretrained") == 2   # loaded again, for the CPU
    assert "📈 cpu:" in result.stderr and "Traceback" not in result.stderr
    on_cpu = run_tool(*args, "--device", "cpu")
    assert on_cpu.returncode == 0 and result.stdout == on_cpu.stdout and result.stdout.strip()


def test_out_of_memory_while_generating_on_the_gpu_and_then_the_cpu_is_a_clean_error(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], *ARGS, script=WRAPPER,
                      env=offline_env(SIMULATED_GPU_GB="80", SIMULATED_GPU_FITS="1", OOM_AT_GENERATE="2"))
    assert result.returncode == 1
    assert result.stderr.count("[oom_wrapper] out of memory in a forward pass") == 2
    assert result.stderr.count("retrying once on the CPU") == 1
    assert result.stderr.strip().splitlines()[-1] == BOTH_FAILED
    assert "Traceback" not in result.stderr and result.stdout == ""
