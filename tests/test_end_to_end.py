"""The real script, run as a user runs it, on tiny random-weight checkpoints saved to disk.

Expected answers come from plain transformers on the same checkpoint, so a test fails if the
tool changes the prompt, the chat template, the media, the decoding or the printing."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import SAMPLE_IMAGE, SECOND_IMAGE, fake_hub_cache, offline_env, run_tool

# The references run on the CPU in float32, so the exact comparisons do too (on a machine
# with a GPU the tool would otherwise pick it, and a GPU's float32 rounds differently).
GREEDY_ANY_DEVICE = ("--temperature", "0", "--dtype", "float32", "--max_new_tokens", "12")
GREEDY = (*GREEDY_ANY_DEVICE, "--device", "cpu")


def reference_answer(model_dir, kind: str, prompt: str, images=(), system_prompt=None) -> tuple[str, int]:
    """(answer, prompt tokens) from plain transformers: greedy, float32, on the CPU."""
    import torch
    from PIL import Image
    from transformers import (AutoModelForCausalLM, AutoModelForMultimodalLM, AutoProcessor, AutoTokenizer,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    if kind == "text":
        processor = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": prompt}]
    else:
        processor = AutoProcessor.from_pretrained(model_dir)
        cls = Qwen2_5OmniThinkerForConditionalGeneration if kind == "omni" else AutoModelForMultimodalLM
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
        content = [{"type": "image", "image": Image.open(path).convert("RGB")} for path in images]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[-1]
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.decode(output[0, prompt_tokens:], skip_special_tokens=True), prompt_tokens


def stat(stderr: str, name: str) -> int:
    return int(re.search(rf"(\d+) {name}", stderr).group(1))


def assert_answered(result, expected: str, prompt_tokens: int) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert stat(result.stderr, "tokens ·") == prompt_tokens    # "prompt N tokens ·"
    assert "Traceback" not in result.stderr


def test_text_only_greedy_answer_is_exactly_transformers(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--seed", "0", *GREEDY)
    assert expected.strip()   # a real answer, not only whitespace
    assert_answered(result, expected, prompt_tokens)
    assert "🎯 Greedy decoding (--temperature 0)" in result.stderr
    assert "📈 cpu:" in result.stderr and "12 new tokens" in result.stderr
    assert "Loading weights" not in result.stderr and "[transformers]" not in result.stderr   # library noise


def test_system_prompt_reaches_the_template(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat",
                                               system_prompt="Answer like a pirate.")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat",
                      "--system_prompt", "Answer like a pirate.", *GREEDY)
    assert_answered(result, expected, prompt_tokens)


def test_prompt_from_stdin(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "-", *GREEDY, stdin="Hello cat\n")
    assert_answered(result, expected, prompt_tokens)


def test_no_stream_prints_the_same_answer_once(tiny_models):
    streamed = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", *GREEDY)
    at_once = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--no_stream", *GREEDY)
    assert at_once.returncode == streamed.returncode == 0
    assert at_once.stdout == streamed.stdout


def test_seeded_sampling_repeats(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--temperature", "1.0",
            "--top_k", "50", "--max_new_tokens", "12", "--dtype", "float32", "--device", "cpu")
    first, second = run_tool(*args, "--seed", "7"), run_tool(*args, "--seed", "7")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "🎲 Sampling: temperature 1.0, top_k 50" in first.stderr


def test_force_cpu(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--force_cpu", *GREEDY_ANY_DEVICE)
    assert_answered(result, expected, prompt_tokens)
    assert "🔧 --force_cpu: using the CPU" in result.stderr


def test_automatic_choice_on_this_machine(tiny_models):
    """No flags: the device and dtype the policy picks for this machine's real hardware."""
    import run_multimodal as rm

    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--max_new_tokens", "4")
    assert result.returncode == 0, result.stderr
    facts = rm.model_facts(rm.load_config(rm.resolve_model(str(tiny_models["qwen2"])), False),
                           rm.resolve_model(str(tiny_models["qwen2"])), False)
    plan = rm.choose_plan(rm.detect_hardware(), facts, rm.Request())
    assert all(reason in result.stderr for reason in plan.reasons[:2])   # device and dtype; then the fit
    assert plan.fits and "(available RAM): fits" in result.stderr
    assert f"📈 {plan.device}:" in result.stderr
    assert "🧠 " in result.stderr and "99.9 K parameters" in result.stderr


def test_one_image_vl(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Describe this image",
                                               [SAMPLE_IMAGE])
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Describe this image",
                      "--image_path", SAMPLE_IMAGE, *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    assert prompt_tokens > 150   # the 451x300 photo is 176 visual tokens


def test_two_images_vl(tiny_models):
    images = [SAMPLE_IMAGE, SECOND_IMAGE]
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Compare them", images)
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Compare them",
                      "--image_path", images[0], "--image_path", images[1], *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    one = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Compare them", images[:1])[1]
    assert prompt_tokens > one


def test_text_only_question_to_a_vl_model(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Hello")
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Hello", *GREEDY)
    assert_answered(result, expected, prompt_tokens)


def test_omni_loads_only_the_thinker_and_sees_the_image(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_omni"], "omni", "What is this?",
                                               [SAMPLE_IMAGE])
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "What is this?",
                      "--image_path", SAMPLE_IMAGE, *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    assert "loading the thinker only (243.9 K)" in result.stderr
    assert "1.6 M parameters" in result.stderr   # thinker + talker + token2wav, counted but not loaded


def test_omni_text_only(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_omni"], "omni", "Explain quantum computing")
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Explain quantum computing",
                      *GREEDY)
    assert_answered(result, expected, prompt_tokens)


def test_hub_id_from_the_offline_cache(tiny_models, tmp_path):
    """A model id resolves through the Hugging Face cache exactly as a real download would."""
    cache, _ = fake_hub_cache(tmp_path, tiny_models["qwen2"])
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", "tiny/qwen2", "--prompt", "Hello cat", *GREEDY,
                      env=offline_env(HF_HUB_CACHE=str(cache)))
    assert_answered(result, expected, prompt_tokens)
    assert "🧠 tiny/qwen2 (qwen2)" in result.stderr

    # Without HF_HUB_OFFLINE the tool finds out by itself that the Hub does not answer
    # (here: a closed local port) and uses the cache, instead of sitting through retries.
    env = offline_env(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9")
    del env["HF_HUB_OFFLINE"]
    result = run_tool("--model_id", "tiny/qwen2", "--prompt", "Hello cat", *GREEDY, env=env)
    assert_answered(result, expected, prompt_tokens)
    assert "📴 http://127.0.0.1:9 cannot be reached: using the local Hugging Face cache only" in result.stderr


def test_self_test_runs_offline():
    result = run_tool("--self_test")
    assert result.returncode == 0, result.stderr
    assert "✅ Self-test passed" in result.stderr
    assert "8 new tokens" in result.stderr
    assert result.stdout.strip()


@pytest.fixture()
def remote_code_model(tiny_models, tmp_path):
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


def test_remote_code_runs_only_when_allowed(remote_code_model, tiny_models):
    refused = run_tool("--model_id", remote_code_model, "--prompt", "Hello cat", *GREEDY)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Error: --model_id {remote_code_model}: this model ships its own Python code, which would run on your "
        "machine; pass --trust_remote_code only if you trust its authors")
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    allowed = run_tool("--model_id", remote_code_model, "--prompt", "Hello cat", "--trust_remote_code", *GREEDY)
    assert_answered(allowed, expected, prompt_tokens)


def test_quantize_on_the_cpu_is_skipped_with_a_note(tiny_models):
    """Chosen automatically, the CPU skips quantization with a note (a script stays portable);
    --quantize with --device cpu is a contradiction, refused (test_faults.py)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the tool would quantize")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--quantize", "4bit",
                      *GREEDY_ANY_DEVICE)
    assert result.returncode == 0, result.stderr
    assert "⚠️ Skipping --quantize 4bit: bitsandbytes quantization needs a CUDA GPU" in result.stderr
