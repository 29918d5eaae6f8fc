"""Out of memory on an accelerator: free it, say so in one line, retry once on the CPU, never loop."""

from __future__ import annotations

from pathlib import Path

from conftest import offline_env, run_tool

WRAPPER = Path(__file__).resolve().parent / "oom_wrapper.py"
ARGS = ("--prompt", "Hello cat", "--temperature", "0", "--max_new_tokens", "12")


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
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: out of memory on cuda and on the CPU; try a smaller model such as Qwen/Qwen2.5-1.5B-Instruct "
        "or fewer --max_new_tokens")
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
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: out of memory on cuda and on the CPU; try a smaller model such as Qwen/Qwen2.5-1.5B-Instruct "
        "or fewer --max_new_tokens")
    assert "Traceback" not in result.stderr and result.stdout == ""
