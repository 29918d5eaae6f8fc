"""Section 12, one turn: the context window, the record for scripts (--json), and memory running out on
an accelerator: free it, say so in one line, retry once on the CPU, never loop."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest

from conftest import GREEDY, MPS_OUT_OF_MEMORY, SAMPLE_IMAGE, assert_one_line_error, fake_hub_cache, offline_env, run_tool
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


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    MPS_OUT_OF_MEMORY,
    "MPS backend out of memory (MPS allocated: 9.1 GB)",
    "Invalid buffer size: 12.50 GB",                                                    # one Metal buffer too large
    "Error: command buffer exited with error status.\n\tThe Metal Performance Shaders operations encoded on it may "
    "not have completed.\n\tError: \n\t(null)\n\tInsufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory",
])
def test_out_of_memory_in_every_form_the_devices_word_it(message):
    import run_multimodal as rm
    assert rm.is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (type("OutOfMemoryError", (RuntimeError,), {})("boom"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_what_is_not_out_of_memory(exc, oom):
    import run_multimodal as rm
    assert rm.is_out_of_memory(exc) is oom


def test_the_cpu_fallback_is_checked_before_it_is_tried(tiny_models):
    """Out of memory on the GPU, and the CPU has too little RAM for the model too: one line with the figures,
    instead of a CPU attempt that would thrash."""
    result = run_tool("--model_id", tiny_models["qwen2"], *ARGS, script=WRAPPER,
                      env=offline_env(SIMULATED_GPU_GB="8", SIMULATED_RAM_GB="0.1"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("[oom_wrapper] from_pretrained") == 1   # the GPU's; the CPU was never tried
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: memory ran out on the GPU in bfloat16, and ")
    assert "needs about 0.25 GB to retry in a wider dtype or on the CPU, which has 0.10 GB of RAM available" in \
        result.stderr


# --- logits that overflow: said, and retried once in a dtype that does not --------------------

def retried_in(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if line.startswith("⚠️ The logits turned NaN or infinite"))
    return line.split("retrying once in ")[1].split()[0]


@pytest.mark.parametrize("extra", [(), ("--no_fast_decode",)], ids=["fast-decoder", "generate"])
def test_an_answer_that_overflows_float16_is_redone_and_equals_the_wider_dtypes(overflowing_models, extra):
    args = ("--model_id", overflowing_models["overflowing"], "--prompt", "Hello cat", "--temperature", "0",
            "--max_new_tokens", "12", "--device", "cpu", *extra)
    half = run_tool(*args, "--dtype", "float16")
    assert half.returncode == 0, half.stderr
    wider = retried_in(half.stderr)
    assert wider in ("bfloat16", "float32")   # bfloat16 where this CPU runs it natively, else float32
    assert "⚠️ The logits turned NaN or infinite in float16: the model's activations overflow it; retrying once in " \
           f"{wider} on the CPU" in half.stderr
    reference = run_tool(*args, "--dtype", wider)
    assert reference.returncode == 0 and "NaN" not in reference.stderr
    assert half.stdout == reference.stdout and half.stdout.strip()


def test_logits_that_stay_non_finite_are_an_error(overflowing_models):
    result = run_tool("--model_id", overflowing_models["damaged"], "--prompt", "Hello cat", "--max_new_tokens", "4",
                      "--device", "cpu", "--dtype", "float16")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("retrying once in") == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: the logits turned NaN or infinite in ") and \
        result.stderr.strip().endswith("too, so the answer would be wrong; the checkpoint looks damaged (check its "
                                       "files, or try another copy)")


# --- on a (simulated) Mac ----------------------------------------------------------------------

MAC = Path(__file__).resolve().parent / "mac_wrapper.py"


def test_a_mac_runs_bfloat16_on_mps_capped_at_metals_budget(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--temperature", "1", "--top_k", "50",
            "--seed", "3", "--max_new_tokens", "12")
    result = run_tool(*args, script=MAC, env=offline_env(MAC_SPEC="mps:16"))
    assert result.returncode == 0, result.stderr
    assert "🔢 bfloat16 on MPS: Qwen was trained in bfloat16 and its activations overflow float16" in result.stderr
    assert "[mac_wrapper] memory fraction 1.0" in result.stderr
    assert "🛡️ Metal memory capped at the plan's budget, 10.67 GB (Metal's working-set limit (~67% of RAM))" in \
        result.stderr
    assert "each sampled token drawn on the CPU" in result.stderr
    assert "peak memory 0.12 GB (MPS allocated at the end; no MPS peak in this PyTorch)" in result.stderr
    # drawn on the CPU with the seeded generator: the answer a CPU run gives, seed for seed
    cpu = run_tool(*args, "--device", "cpu", "--dtype", "bfloat16")
    assert result.stdout == cpu.stdout and result.stdout.strip()


def test_an_old_macos_runs_float16_and_redoes_an_overflow_in_float32(overflowing_models):
    args = ("--model_id", overflowing_models["overflowing"], "--prompt", "Hello cat", "--temperature", "0",
            "--max_new_tokens", "12")
    result = run_tool(*args, script=MAC, env=offline_env(MAC_SPEC="mps:16:macos13.5"))
    assert result.returncode == 0, result.stderr
    assert "🔢 float16 on MPS for memory efficiency" in result.stderr
    assert "retrying once in float32 on MPS" in result.stderr   # no bfloat16 before macOS 14
    assert result.stdout == run_tool(*args, "--device", "cpu", "--dtype", "float32").stdout


def test_mps_out_of_memory_in_its_own_words_falls_back_to_the_cpu(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], *ARGS)
    result = run_tool(*args, script=MAC, env=offline_env(MAC_SPEC="mps:16", MPS_OOM_AT_LOAD="1"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("⚠️ Out of memory on mps: freed it, retrying once on the CPU") == 1
    assert "📈 cpu:" in result.stderr
    assert result.stdout == run_tool(*args, "--device", "cpu", "--dtype", "bfloat16").stdout   # an M3: native bf16


def test_metal_quantization_is_refused_without_mps(tiny_models):
    """transformers' own MetalConfig refuses to quantize without an MPS device: its words, on one line."""
    result = run_tool("--model_id", tiny_models["qwen2"], *ARGS, "--quantize", "8bit", script=MAC,
                      env=offline_env(MAC_SPEC="mps:16", MAC_KERNELS="1"))
    assert_one_line_error(result, 1, "Error: 8bit metal quantization could not load: Metal quantization requires an "
                                     "Apple Silicon GPU (MPS). No MPS device found.")
    assert "🗜️ 8bit Metal quantization on MPS" in result.stderr


# --- where a spoken reply is written ------------------------------------------------------

SPEAK = ("--prompt", "Say something", "--max_speech_seconds", "0.4", "--temperature", "0", "--max_new_tokens", "4",
         "--device", "cpu")


def speak_into(tiny_models, target, *, umask: int = 0o022, stdout=None):
    """The tiny Omni speaking into `target`, as a user's shell starts it (umask given)."""
    import os
    import subprocess
    import sys

    from conftest import SCRIPT

    def start():
        os.umask(umask)
    return subprocess.run([sys.executable, str(SCRIPT), "--model_id", str(tiny_models["qwen2_5_omni"]), *SPEAK,
                           "--output_audio", str(target)], stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=offline_env(), timeout=600, preexec_fn=start)


def is_wav(data: bytes) -> bool:
    import io

    import soundfile
    samples, rate = soundfile.read(io.BytesIO(data))
    return rate == 24000 and len(samples) > 0


def test_a_new_wav_gets_the_umask_and_a_symlink_keeps_pointing_at_its_target(tiny_models, tmp_path):
    import stat

    new = speak_into(tiny_models, tmp_path / "new.wav", umask=0o027)
    assert new.returncode == 0, new.stderr.decode()
    assert stat.S_IMODE((tmp_path / "new.wav").stat().st_mode) == 0o640 and is_wav((tmp_path / "new.wav").read_bytes())
    (tmp_path / "takes").mkdir()
    (tmp_path / "takes" / "real.wav").write_bytes(b"an older take")
    (tmp_path / "takes" / "real.wav").chmod(0o604)
    (tmp_path / "link.wav").symlink_to(tmp_path / "takes" / "real.wav")
    linked = speak_into(tiny_models, tmp_path / "link.wav")
    assert linked.returncode == 0, linked.stderr.decode()
    assert (tmp_path / "link.wav").is_symlink() and is_wav((tmp_path / "takes" / "real.wav").read_bytes())
    assert stat.S_IMODE((tmp_path / "takes" / "real.wav").stat().st_mode) == 0o604   # as it was
    assert sorted(path.name for path in (tmp_path / "takes").iterdir()) == ["real.wav"]   # no temporary left


def test_a_fifo_and_stdout_are_written_in_place(tiny_models, tmp_path):
    """`--output_audio /dev/stdout | aplay` and a named pipe: the WAV goes through them (the answer's text then
    comes on stderr); the FIFO stays a FIFO."""
    import os
    import stat
    import threading

    fifo = tmp_path / "speech.fifo"
    os.mkfifo(fifo)
    heard = []
    reader = threading.Thread(target=lambda: heard.append(fifo.read_bytes()))
    reader.start()
    result = speak_into(tiny_models, fifo)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert stat.S_ISFIFO(fifo.stat().st_mode) and is_wav(heard[0])
    piped = speak_into(tiny_models, "/dev/stdout")
    assert piped.returncode == 0, piped.stderr.decode()
    assert is_wav(piped.stdout)
    assert "🔊 stdout carries the spoken reply (--output_audio /dev/stdout): the answer's text comes here" in \
        piped.stderr.decode()


def test_a_full_disk_or_a_reader_gone_is_one_line(tiny_models):
    """/dev/full answers every write with 'no space left': one line naming it, and /dev/full is still the device
    (as root too: nothing in /dev is replaced). A reader of stdout that went away: one line too."""
    import os
    import stat

    result = speak_into(tiny_models, "/dev/full")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    assert lines[-1] == "Error: --output_audio /dev/full: could not be written (No space left on device); free some " \
                        "space or choose another file"
    assert stat.S_ISCHR(Path("/dev/full").stat().st_mode)
    reading, writing = os.pipe()
    os.close(reading)   # the reader is gone before the WAV comes
    with os.fdopen(writing, "wb") as closed:
        gone = speak_into(tiny_models, "/dev/stdout", stdout=closed)
    assert gone.returncode == 1 and gone.stderr.decode().strip().splitlines()[-1] == \
        "Error: --output_audio /dev/stdout: its reader went away before all was written"
