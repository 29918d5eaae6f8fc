"""The fast decoder against transformers' own generate(): the same tokens on the CPU in float32
(greedy, seeded sampling, a repetition penalty, an early end token, text and pictures), the fused
step's arithmetic against the model's modules, and the command line's switch."""

from __future__ import annotations

import shutil

import pytest

import run_multimodal as rm
from conftest import SAMPLE_IMAGE, run_tool

MODELS = ["qwen2", "qwen2_5_vl", "qwen2_5_omni"]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """name -> (model, processor, inputs): float32 on the CPU; the VL and Omni prompts carry a picture."""
    found = {}
    for name in MODELS:
        info = rm.resolve_model(str(tiny_models[name]))
        model, processor = rm.load_model(info, rm.Plan("cpu", "float32", None, "", ()), rm.detect_hardware(),
                                         name == "qwen2_5_omni", False)
        media = rm.Media() if name == "qwen2" else rm.Media(images=[rm.load_image(str(SAMPLE_IMAGE))])
        messages = rm.build_messages("Describe the picture, please", None, media, info.kind)
        found[name] = (model, processor, rm.prepare_inputs(processor, messages, model.device, media))
    return found


def fast_tokens(model, inputs, sampling: rm.Sampling, seed: int | None = None, lag: int | None = None) -> list[int]:
    """The new tokens the fast decoder hands to its streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens: list[int] = []

        def put(self, value):
            self.tokens.extend(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    settings = rm._decoding_settings(model, sampling, inputs["input_ids"])
    assert settings is not None, "transformers' decoding helpers changed: the fast decoder would not be used"
    if seed is not None:
        torch.manual_seed(seed)
    collect = Collect()
    with torch.inference_mode():
        rm.fast_generate(model, inputs, sampling, collect, {}, settings, lag=lag)
    assert collect.ended
    return collect.tokens[inputs["input_ids"].shape[-1]:]


def plain_tokens(model, inputs, sampling: rm.Sampling, seed: int | None = None) -> list[int]:
    """transformers' generate(), as a user of plain transformers would call it."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(**inputs, **sampling.generate_kwargs())
    return output[0, inputs["input_ids"].shape[-1]:].tolist()


GREEDY = rm.Sampling(24, temperature=0)
SAMPLED = rm.Sampling(24, temperature=1.0, top_p=0.9, top_k=50)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sampling, seed", [(GREEDY, None), (SAMPLED, 3), (SAMPLED, 4)], ids=["greedy", "seed3", "seed4"])
def test_same_tokens_as_generate(loaded, name, sampling, seed):
    model, _, inputs = loaded[name]
    expected = plain_tokens(model, inputs, sampling, seed)
    assert expected   # (a sampled answer may end early, at an end token: the stop must match too)
    assert fast_tokens(model, inputs, sampling, seed) == expected


def test_seeds_differ(loaded):
    """The sampled cases above are not greedy in disguise."""
    model, _, inputs = loaded["qwen2"]
    assert fast_tokens(model, inputs, SAMPLED, 3) != fast_tokens(model, inputs, SAMPLED, 4)


def test_repetition_penalty_from_the_generation_config(loaded):
    model, _, inputs = loaded["qwen2"]
    without = plain_tokens(model, inputs, GREEDY)
    model.generation_config.repetition_penalty = 1.5
    try:
        expected = plain_tokens(model, inputs, GREEDY)
        assert expected != without   # the penalty changes this answer
        assert fast_tokens(model, inputs, GREEDY) == expected
    finally:
        model.generation_config.repetition_penalty = None


@pytest.mark.parametrize("lag", [0, 8], ids=["each-token", "8-behind"])
def test_stops_at_the_end_token_like_generate(loaded, lag):
    """An end token mid-answer: the same tokens up to and including it, nothing after, whether the
    text is read token by token (CPU) or lags the device by 8 (CUDA, MPS)."""
    model, _, inputs = loaded["qwen2_5_vl"]
    end = plain_tokens(model, inputs, GREEDY)[6]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [end]
    try:
        expected = plain_tokens(model, inputs, GREEDY)
        got = fast_tokens(model, inputs, GREEDY, lag=lag)
    finally:
        model.generation_config.eos_token_id = saved
    assert len(expected) <= 7 and expected[-1] == end
    assert got == expected


def test_min_new_tokens_holds_back_the_end_token(loaded):
    model, _, inputs = loaded["qwen2"]
    end = plain_tokens(model, inputs, GREEDY)[2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [end]
    forced = rm.Sampling(20, temperature=0, min_new_tokens=20)
    try:
        expected = plain_tokens(model, inputs, forced)
        got = fast_tokens(model, inputs, forced, lag=8)
    finally:
        model.generation_config.eos_token_id = saved
    assert len(expected) == 20 and got == expected


def fused_against_exact(model, inputs, compile_layers: bool, steps: int = 12) -> float:
    """Worst relative difference between the fused step's logits and the exact step's, feeding both
    the exact step's greedy tokens; the greedy choices must agree."""
    import torch

    length = inputs["input_ids"].shape[-1]
    with torch.inference_mode():
        prompt = model(**inputs, use_cache=True)
        exact = rm.FastDecoder(model, prompt.past_key_values, length, steps, fused=False)
        fused = rm.FastDecoder(model, prompt.past_key_values, length, steps, fused=True,
                               compile_layers=compile_layers)
        token, worst = prompt.logits[:, -1].argmax(-1), 0.0
        for slot in range(length, length + steps):
            a, b = exact.logits_at(token, slot), fused.logits_at(token, slot)
            worst = max(worst, float((a - b).abs().max() / a.abs().max()))
            assert int(a.argmax()) == int(b.argmax())
            token = a.argmax(-1)
    return worst


@pytest.mark.parametrize("name", MODELS)
def test_fused_step_computes_what_the_modules_compute(loaded, name):
    """The arithmetic the CUDA graph records (fused weights, masked attention over every slot),
    run here without a graph."""
    model, _, inputs = loaded[name]
    assert fused_against_exact(model, inputs, compile_layers=False) < 1e-5


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_layers_compute_what_the_modules_compute(loaded):
    model, _, inputs = loaded["qwen2"]
    assert fused_against_exact(model, inputs, compile_layers=True, steps=4) < 1e-5


def test_models_it_does_not_know_use_generate(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen3_omni"], "--prompt", "Hello", "--max_new_tokens", "4",
                      "--device", "cpu", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "🐢 Decoding with transformers' generate(): the fast decoder does not handle a qwen3_omni_moe_text decoder" \
        in result.stderr


def test_the_switch_and_what_it_says(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--max_new_tokens", "16",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu")
    fast, plain = run_tool(*args), run_tool(*args, "--no_fast_decode")
    assert fast.returncode == plain.returncode == 0, fast.stderr + plain.stderr
    assert fast.stdout == plain.stdout and fast.stdout.strip()
    assert "⚡ Fast decoding: a static KV cache, one step at a time" in fast.stderr
    assert "🐢 Decoding with transformers' generate() (--no_fast_decode)" in plain.stderr
    assert "16 new tokens" in fast.stderr and "16 new tokens" in plain.stderr


def test_compile_off_nvidia_gpus_says_so_and_answers_the_same(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--max_new_tokens", "8",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu")
    plain, compiled = run_tool(*args), run_tool(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert "⚠️ --compile is used on NVIDIA GPUs only" in compiled.stderr
    assert compiled.stdout == plain.stdout and compiled.stdout.strip()
