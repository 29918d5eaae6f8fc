"""Section 9, the decoding engine, against transformers' own generate(): the same tokens on the CPU in
float32 (greedy, seeded sampling, a repetition penalty, an early end token, text and pictures), and
the fused step's arithmetic against the model's modules."""

from __future__ import annotations

import shutil

import pytest

import run_multimodal as rm
from conftest import SAMPLE_IMAGE

MODELS = ["qwen2", "qwen2_5_vl", "qwen2_5_omni", "qwen3_omni"]   # Qwen3-Omni's: q/k norms, a mixture of experts


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """name -> (model, processor, inputs): float32 on the CPU; the VL and Omni prompts carry a picture."""
    found = {}
    for name in MODELS:
        info = rm.resolve_model(str(tiny_models[name]))
        omni = name in ("qwen2_5_omni", "qwen3_omni")
        plan = rm.Plan("cpu", "float32", None, "", (), components=("thinker",) if omni else ())
        model, processor = rm.load_model(info, plan, rm.simulated_hardware("cpu:8"))
        media = rm.Media() if name == "qwen2" else rm.Media(images=[rm.load_image(str(SAMPLE_IMAGE))])
        messages = rm.build_messages("Describe the picture, please", None, media, info.kind)
        found[name] = (model, processor, rm.prepare_inputs(processor, messages, model.device, media))
    return found


def fast_tokens(model, inputs, sampling: rm.Sampling, seed: int | None = None, lag: int = 0) -> list[int]:
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

    assert rm.choose_runtime(model, "cpu", rm.Options(sampling=sampling)).decoder == "step"
    if seed is not None:
        torch.manual_seed(seed)
    collect = Collect()
    with torch.inference_mode():
        rm.fast_generate(rm.Runtime("cpu", "step", "", lag=lag), model, inputs, sampling, collect, {})
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


def against_the_models_own_steps(model, inputs, masked: bool, compile_layers: bool = False, steps: int = 12) -> float:
    """Worst relative difference between the fast step's logits and generate()'s own at each step, fed
    generate()'s greedy tokens; the greedy choices must agree."""
    import torch

    length = inputs["input_ids"].shape[-1]
    with torch.inference_mode():
        reference = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        prompt = model(**inputs, use_cache=True)
        fast = rm.FastDecoder(model, prompt.past_key_values, length, steps, masked, compile_layers=compile_layers)
        tokens, worst = reference.sequences[0, length:], 0.0
        for i in range(1, len(reference.logits)):
            expected, got = reference.logits[i].float(), fast.logits_at(tokens[i - 1:i], length + i - 1)
            worst = max(worst, float((expected - got).abs().max() / expected.abs().max()))
            assert int(expected.argmax()) == int(got.argmax())
    return worst


@pytest.mark.parametrize("masked", [False, True], ids=["filled-slots", "masked-all-slots"])
@pytest.mark.parametrize("name", MODELS)
def test_the_step_computes_what_the_model_computes(loaded, name, masked):
    """Both steps: attention over the filled slots (off CUDA) and the CUDA graph's arithmetic (all slots
    under a mask), run here without a graph, against the model's own forward inside generate()."""
    model, _, inputs = loaded[name]
    assert against_the_models_own_steps(model, inputs, masked) < 1e-5


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_layers_compute_what_the_model_computes(loaded):
    model, _, inputs = loaded["qwen2"]
    assert against_the_models_own_steps(model, inputs, masked=True, compile_layers=True, steps=4) < 1e-5


def test_a_step_dispatches_at_most_16_operations_a_layer():
    """MPS pays tens of microseconds for each dispatched operation: bench/count_step_ops.py counts a step of
    the real Qwen2.5-0.5B config (its last line is the figure)."""
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "count_step_ops.py")], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    per_layer, rest = result.stdout.strip().splitlines()[-1].split(" ops per layer per token (")
    assert float(per_layer) <= 16 and rest.endswith(", 24 layers)"), result.stdout


def test_a_draw_on_the_cpu_repeats_generates_seeded_answer(loaded):
    """On MPS sampled tokens are drawn on the CPU (MPS's multinomial can pick impossible tokens): from the
    processed scores, with the CPU's seeded generator, so the answer is generate()'s on the CPU."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    model, _, inputs = loaded["qwen2"]

    class Collect(BaseStreamer):
        tokens: list = []

        def put(self, value):
            self.tokens = self.tokens + value.reshape(-1).tolist()

        def end(self):
            pass

    for seed in (3, 4):
        collect = Collect()
        torch.manual_seed(seed)
        with torch.inference_mode():
            rm.fast_generate(rm.Runtime("mps", "step", "", lag=8, draw_on_cpu=True), model, inputs, SAMPLED, collect, {})
        assert collect.tokens[inputs["input_ids"].shape[-1]:] == plain_tokens(model, inputs, SAMPLED, seed)


def test_logits_that_overflow_are_caught_not_shown(overflowing_models):
    """float16 overflows in the tiny checkpoint's first layer: the step's logits are NaN, and the decoder
    stops with NonFiniteLogits instead of printing an answer drawn from them; float32 decodes as generate()."""
    import torch

    info = rm.resolve_model(str(overflowing_models["overflowing"]))
    for dtype, overflows in (("float16", True), ("float32", False)):
        model, tokenizer = rm.load_model(info, rm.Plan("cpu", dtype, None, "", ()), rm.simulated_hardware("cpu:8"))
        inputs = rm.prepare_inputs(tokenizer, rm.build_messages("Hello cat", None, rm.Media(), "text"), "cpu")
        with torch.inference_mode():
            logits = model(**inputs).logits
        assert bool(torch.isfinite(logits).all()) is not overflows
        if overflows:
            with pytest.raises(rm.NonFiniteLogits):
                fast_tokens(model, inputs, GREEDY)
        else:
            assert fast_tokens(model, inputs, GREEDY) == plain_tokens(model, inputs, GREEDY)
