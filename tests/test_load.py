"""Section 8, loading: weights from safetensors (a pickle that would run code is refused), a model's
own code only when allowed, and the runtime decided once (device, decoder, look-ahead, draw policy, whether
it speaks), with the line that says which decoder and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import run_multimodal as rm
from conftest import GREEDY, assert_one_line_error, run_tool, stat
from references import reference_answer


class Payload:
    """Unpickling this creates a file: what a malicious pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def poisoned(path: Path, marker: Path) -> None:
    import torch
    torch.save({"payload": Payload(marker)}, path)


def test_pickled_weights_that_run_code_are_refused(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    poisoned(folder / "pytorch_model.bin", marker)
    result = run_tool("--model_id", folder, "--prompt", "hi", "--max_new_tokens", "2", cwd=tmp_path)
    assert_one_line_error(result, 1, f"Error: --model_id {folder}: its weights file holds objects or code that "
                          "PyTorch will not load safely, so it was not loaded; use a .safetensors checkpoint from a "
                          "source you trust")
    assert not marker.exists()


def test_safetensors_are_loaded_rather_than_a_pickle_beside_them(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    marker = tmp_path / "code_ran"
    poisoned(folder / "pytorch_model.bin", marker)
    args = ("--prompt", "Hello cat", "--max_new_tokens", "8", "--temperature", "0", "--device", "cpu")
    result = run_tool("--model_id", folder, *args, cwd=tmp_path)
    clean = run_tool("--model_id", tiny_models["qwen2"], *args, cwd=tmp_path)
    assert result.returncode == clean.returncode == 0, result.stderr
    assert result.stdout == clean.stdout and result.stdout.strip()
    assert not marker.exists()


def remote_code_model(tiny_models, tmp_path) -> Path:
    """The tiny Qwen2 as a repository that ships its own Python classes (auto_map)."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "configuration_custom.py").write_text(
        "from transformers import Qwen2Config\n\n\nclass CustomConfig(Qwen2Config):\n    model_type = 'custom_qwen'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import Qwen2ForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomModel(Qwen2ForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_qwen", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_runs_only_when_allowed(tiny_models, tmp_path):
    folder = remote_code_model(tiny_models, tmp_path)
    refused = run_tool("--model_id", folder, "--prompt", "Hello cat", *GREEDY)
    assert_one_line_error(refused, 2, f"Error: --model_id {folder}: this model ships its own Python code, which would "
                          "run on your machine; pass --trust_remote_code only if you trust its authors")
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    allowed = run_tool("--model_id", folder, "--prompt", "Hello cat", "--trust_remote_code", *GREEDY)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == expected + "\n" and stat(allowed.stderr, "tokens ·") == prompt_tokens


# --- the decoder, chosen once -----------------------------------------------------------

def test_the_runtime_is_decided_at_load_time(tiny_models):
    """Device, decoder, look-ahead and the draw policy, decided once from the loaded model and the flags."""
    info = rm.resolve_model(str(tiny_models["qwen2"]))
    plan = rm.Plan("cpu", "float32", None, "small", ())
    model, _ = rm.load_model(info, plan, rm.simulated_hardware("cpu:8"))
    assert rm.choose_runtime(model, "cpu", rm.Options()) == rm.Runtime(
        "cpu", "step", "⚡ Fast decoding: a static KV cache, one step at a time (--no_fast_decode: transformers' "
        "generate())")
    mac = rm.choose_runtime(model, "mps", rm.Options(sampling=rm.Sampling(8, temperature=0.7)))
    assert (mac.lag, mac.draw_on_cpu, mac.graphs) == (0, True, False)   # reading on MPS waits for all before it
    assert "each sampled token drawn on the CPU" in mac.reason and mac.sampler((None, None, set())).draw_on_cpu
    graph = rm.choose_runtime(model, "cuda", rm.Options())
    assert (graph.decoder, graph.lag, graph.graphs) == ("graph", rm.STREAM_LAG_TOKENS, True)
    assert "--compile: faster after seconds of compiling" in graph.reason
    assert rm.choose_runtime(model, "cuda", rm.Options(compile_layers=True)).decoder == "compiled"
    assert not rm.choose_runtime(model, "cpu", rm.Options(fast_decode=False)).fast
    beams = rm.Options(sampling=rm.Sampling(8, temperature=0))
    model.generation_config.num_beams = 2
    try:
        assert rm.choose_runtime(model, "cpu", beams).reason == (
            "🐢 These decoding settings need transformers' generate(); the fast decoder is not used")
    finally:
        model.generation_config.num_beams = 1


def test_a_model_loaded_without_its_talker_does_not_speak(tiny_models):
    """Whether a run speaks is decided from the flags and the loaded model together: asked of a model without
    a talker, the runtime says so in one line instead of failing later."""
    info = rm.resolve_model(str(tiny_models["qwen2"]))
    model, _ = rm.load_model(info, rm.Plan("cpu", "float32", None, "small", ()), rm.simulated_hardware("cpu:8"))
    with pytest.raises(rm.RunError, match="--output_audio: Qwen2ForCausalLM was loaded without its talker"):
        rm.choose_runtime(model, "cpu", rm.Options(output_audio=Path("reply.wav")))


def test_models_it_does_not_know_use_generate(tiny_models, tmp_path):
    """A layer the fast decoder does not write out (here the tiny Qwen2 with another activation) is decoded by
    transformers' generate(), said."""
    model = shutil.copytree(tiny_models["qwen2"], tmp_path / "gelu")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_pytorch_tanh"}))
    result = run_tool("--model_id", model, "--prompt", "Hello", "--max_new_tokens", "4", "--device", "cpu",
                      "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "🐢 Decoding with transformers' generate(): the fast decoder does not handle the gelu_pytorch_tanh " \
           "activation" in result.stderr


def test_the_switch_and_what_it_says(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--max_new_tokens", "16",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu")
    fast, plain = run_tool(*args), run_tool(*args, "--no_fast_decode")
    assert fast.returncode == plain.returncode == 0, fast.stderr + plain.stderr
    assert fast.stdout == plain.stdout and fast.stdout.strip()
    assert "⚡ Fast decoding: a static KV cache, one step at a time" in fast.stderr
    assert "--compile" not in fast.stderr   # it does nothing off NVIDIA GPUs, so it is not offered
    assert "🐢 Decoding with transformers' generate() (--no_fast_decode)" in plain.stderr
    assert "16 new tokens" in fast.stderr and "16 new tokens" in plain.stderr


def test_compile_off_nvidia_gpus_says_so_and_answers_the_same(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--max_new_tokens", "8",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu")
    plain, compiled = run_tool(*args), run_tool(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert "⚠️ --compile is used on NVIDIA GPUs only" in compiled.stderr
    assert compiled.stdout == plain.stdout and compiled.stdout.strip()


def test_a_generation_config_that_cannot_be_read_is_said(tiny_models, tmp_path):
    """transformers would quietly decode greedily instead of as the checkpoint says: said, and the answer goes on."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "generation_config.json").write_text('{"temperature": ')
    result = run_tool("--model_id", folder, "--prompt", "Hello cat", "--max_new_tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"⚠️ --model_id {folder}: generation_config.json is damaged (" in result.stderr
    assert "decoding follows transformers' defaults (greedy) instead of the checkpoint's own settings" in result.stderr


def test_an_error_over_several_lines_keeps_its_reason_and_the_debug_hint(tiny_models, tmp_path):
    """A model's own code that fails with a message of several lines (as libraries' often are): one Error: line
    with all of its reason and the --debug hint, not just its first line."""
    folder = remote_code_model(tiny_models, tmp_path)
    (folder / "modeling_custom.py").write_text("raise RuntimeError('the first line of the reason\\nand the second')\n")
    result = run_tool("--model_id", folder, "--prompt", "Hello cat", "--trust_remote_code", *GREEDY)
    assert_one_line_error(result, 1, "RuntimeError: the first line of the reason and the second (run again with "
                                     "--debug for the traceback)")
