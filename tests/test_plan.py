"""Section 7, the plan: exact memory per component, fit checks against a device's budget, the policy
(device, dtype, quantization) on simulated machines and the real published configs, the dry run and
the refusal. The pure functions run here; the dry run and the refusal run as a user runs them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import run_multimodal as rm
from conftest import CONFIGS, GREEDY_ANY_DEVICE, ROOT, SAMPLE_IMAGE, SECOND_IMAGE, offline_env, run_tool
from test_hardware import H100, T4, linux, mac

GB = rm.GB
OMNI, VL = "Qwen--Qwen2.5-Omni-3B", "Qwen--Qwen2.5-VL-3B-Instruct"
Q05, Q15, Q3 = "Qwen--Qwen2.5-0.5B-Instruct", "Qwen--Qwen2.5-1.5B-Instruct", "Qwen--Qwen2.5-3B-Instruct"
Q7 = "Qwen--Qwen2.5-7B-Instruct"
SPEECH = rm.Options(output_audio=ROOT / "reply.wav")


def spec(text: str, cpu_bf16: bool = True, ram_gb: float = 64) -> rm.Hardware:
    """A --hardware machine, with the CPU facts pinned so that the test does not depend on this CPU."""
    hw = rm.simulated_hardware(text)
    if hw.apple_silicon:
        return hw
    ram = hw.ram_total if text.startswith("cpu") else int(ram_gb * GB)
    return dataclasses.replace(hw, cpu_bf16=cpu_bf16, ram_total=ram, ram_available=ram)


# --- sizes -------------------------------------------------------------------------

def test_full_omni_weights_match_the_published_checkpoint(real_facts):
    omni = real_facts[OMNI]
    full = rm.estimate_memory(omni, rm.loading_components(omni, speech=True), "bfloat16", None, SPEECH, rm.Workload())
    assert full.parameters == 5_537_120_640
    # bf16 thinker and talker, float32 token2wav: the published checkpoint is 11.97 GB (decimal).
    assert full.weights_bytes == (4_703_464_448 + 384_604_928) * 2 + 449_051_264 * 4 == 11_972_343_808
    assert abs(full.weights_bytes / 11.97e9 - 1) < 0.01
    assert full.components["token2wav"] == (449_051_264, 449_051_264 * 4)   # float32 whatever the dtype


def test_thinker_alone_without_speech(real_facts):
    omni = real_facts[OMNI]
    assert rm.loading_components(omni, speech=False) == ("thinker",)
    plan = rm.choose_plan(spec("cuda:80"), omni, rm.Options())
    assert list(plan.estimate.components) == ["thinker"] and plan.components == ("thinker",)
    assert plan.estimate.parameters == 4_703_464_448
    assert plan.estimate.weights_bytes == 4_703_464_448 * 2
    speech = rm.choose_plan(spec("cuda:80"), omni, SPEECH)
    assert list(speech.estimate.components) == ["thinker", "talker", "token2wav"]
    assert speech.tier == "medium"


def test_kv_cache_counts_prompt_media_and_new_tokens(real_facts):
    facts = real_facts[Q3]   # 36 layers x 2 KV heads x 128 dims x (K and V)
    assert facts.kv_elements_per_token == 36 * 2 * 128 * 2
    options, workload = rm.Options(sampling=rm.Sampling(1000)), rm.Workload(text_tokens=24)
    estimate = rm.estimate_memory(facts, ("model",), "bfloat16", None, options, workload)
    assert estimate.context_tokens == 1024
    assert estimate.kv_cache_bytes == 1024 * 18432 * 2
    longer = rm.estimate_memory(facts, ("model",), "bfloat16", None, rm.Options(sampling=rm.Sampling(9000)), workload)
    assert longer.kv_cache_bytes == 9024 * 18432 * 2


def test_four_bit_keeps_the_output_head_in_the_compute_dtype(real_facts):
    facts = real_facts[Q15]
    packed = facts.quantizable["model"]
    assert packed == 1_310_253_056   # every Linear of the 28 layers; the tied 151936 x 1536 head is not
    estimate = rm.estimate_memory(facts, ("model",), "bfloat16", "4bit", rm.Options(), rm.Workload())
    assert estimate.weights_bytes == int(packed * (0.5 + 4 / 64) + (facts.total - packed) * 2)


@pytest.mark.parametrize("width, height, max_pixels, tokens", [
    (451, 300, rm.DEFAULT_MAX_PIXELS, 22 * 32 // 4 + 2),      # the sample photo: 308 x 448 after resizing
    (448, 448, rm.DEFAULT_MAX_PIXELS, 16 * 16 + 2),
    (4000, 3000, rm.DEFAULT_MAX_PIXELS, 30 * 41 + 2),        # 12 MP photo: 840 x 1148, under 1280 tokens
    (4000, 3000, 256 * 28 * 28, 13 * 18 + 2),
    (20, 20, rm.DEFAULT_MAX_PIXELS, 4 + 2),                   # scaled up to the 56 x 56 minimum
])
def test_visual_tokens(real_facts, width, height, max_pixels, tokens):
    assert rm.image_tokens(real_facts[VL].vision, width, height, max_pixels) == tokens


def test_visual_tokens_match_the_real_processor(tiny_models):
    """The estimate counts what the processor, loaded the way a run loads it, really produces."""
    from PIL import Image

    info = rm.resolve_model(str(tiny_models["qwen2_5_vl"]))
    plan = rm.Plan("cpu", "float32", None, "small", ())
    hw = rm.simulated_hardware("cpu:8")
    for max_pixels in (rm.DEFAULT_MAX_PIXELS, 100_000):
        model, processor = rm.load_model(info, plan, hw, False, max_pixels)
        vision = rm.VisionFacts(model.config.vision_config.patch_size, model.config.vision_config.spatial_merge_size,
                                model.config.vision_config.hidden_size)
        for image in (rm.load_image(str(SAMPLE_IMAGE)), rm.load_image(str(SECOND_IMAGE)),
                      Image.new("RGB", (4000, 3000)), Image.new("RGB", (20, 20))):
            inputs = rm.prepare_inputs(processor, rm.build_messages("Hi", None, rm.Media(images=[image]), "multimodal"),
                                       "cpu")
            seen = int((inputs["input_ids"] == model.config.image_token_id).sum())
            assert rm.image_tokens(vision, *image.size, max_pixels) == seen + 2, (image.size, max_pixels)


def test_more_new_tokens_and_larger_images_cost_memory(real_facts):
    workload = rm.Workload(image_sizes=((4000, 3000),))
    small = rm.choose_plan(spec("cuda:80"), real_facts[VL], rm.Options(max_pixels=256 * 28 * 28), workload)
    large = rm.choose_plan(spec("cuda:80"), real_facts[VL], rm.Options(), workload)
    assert (small.estimate.media_tokens, large.estimate.media_tokens) == (236, 1232)
    assert large.estimate.kv_cache_bytes - small.estimate.kv_cache_bytes == 996 * 18432 * 2
    assert large.estimate.activation_bytes > small.estimate.activation_bytes


# --- budgets and placement ------------------------------------------------------------

def needing(nbytes: int) -> rm.Estimate:
    return rm.Estimate({"model": (0, nbytes)}, 0, 0, 0, 0)


def test_budgets():
    assert rm.metal_budget(spec("mps:16")) == (int(16 * GB * 2 / 3), "Metal's working-set limit (~67% of RAM)")
    assert rm.metal_budget(spec("mps:64"))[0] == 48 * GB
    real_mac = dataclasses.replace(spec("mps:16"), metal_budget=11 * GB)
    assert rm.metal_budget(real_mac) == (11 * GB, "Metal's working-set limit")
    assert rm.place(spec("cuda:24"), "cuda", needing(20 * GB)) == \
        rm.Placement(True, 24 * GB - GB // 2, "free memory of cuda:0", (0,))
    assert rm.place(spec("cpu:32"), "cpu", needing(33 * GB)) == rm.Placement(False, 32 * GB, "available RAM")


def test_several_gpus_are_checked_with_accelerates_own_placement(real_facts):
    """Layers are not split across GPUs: accelerate's infer_auto_device_map, which device_map="auto"
    runs while loading, decides; added-up free memory alone would say yes too often."""
    facts = real_facts[Q3]   # 6.17 GB of bf16 weights in 36 layers and a 0.6 GB embedding
    roomy = rm.choose_plan(spec("cuda:4,4"), facts, rm.Options())
    assert (roomy.device, roomy.gpus, roomy.quantization, roomy.fits) == ("cuda", (0, 1), None, True)
    tight = spec("cuda:4,4")
    tight = dataclasses.replace(tight, cuda=tuple(dataclasses.replace(gpu, free_bytes=int(3.2 * GB))
                                                  for gpu in tight.cuda))
    summed = rm.estimate_memory(facts, ("model",), "bfloat16", None, rm.Options(), rm.Workload())
    assert summed.total < 2 * 3.2 * GB                                   # adds up ...
    assert rm.choose_plan(tight, facts, rm.Options()).quantization == "4bit"   # ... but the layers do not fit


def test_placement_arguments_follow_the_plan():
    two = spec("cuda:24,24")
    spread = rm.Plan("cuda", "bfloat16", None, "large", (), gpus=(0, 1))
    assert rm.device_map_for(spread, two, "text") == {
        "device_map": "auto", "max_memory": {0: two.cuda[0].free_bytes, 1: two.cuda[1].free_bytes,
                                             "cpu": two.ram_available}}
    assert "cpu" not in rm.device_map_for(spread, two, "omni")["max_memory"]   # never offloaded to the CPU
    one = rm.Plan("cuda", "bfloat16", None, "medium", (), gpus=(1,))
    assert rm.device_map_for(one, two, "omni") == {"device_map": {"": "cuda:1"}}
    assert rm.device_map_for(one, spec("cuda:24"), "text") == {"device_map": "auto"}
    assert rm.device_map_for(rm.Plan("cpu", "float32", None, "small", ()), two, "text") == {}


# --- the policy ---------------------------------------------------------------------

@pytest.mark.parametrize("name, tier", [(Q05, "small"), (Q15, "small"), (Q3, "medium"), (VL, "medium"),
                                        (OMNI, "medium")])
def test_real_configs_fall_in_the_guides_tiers(real_facts, name, tier):
    facts = real_facts[name]
    assert rm.size_tier(sum(facts.parameters[c] for c in rm.loading_components(facts, False))) == tier


@pytest.mark.parametrize("parameters, tier", [
    (int(2.5e9), "small"), (int(2.5e9) + 1, "medium"),
    (int(6.5e9), "medium"), (int(6.5e9) + 1, "large"),
    (7_615_616_512, "large"),   # Qwen2.5-7B-Instruct
])
def test_tier_boundaries(parameters, tier):
    assert rm.size_tier(parameters) == tier


SMALL, MEDIUM, LARGE = 1_543_714_304, 4_703_464_448, 7_615_616_512


def facts(parameters: int) -> rm.ModelFacts:
    """A text model of that many parameters with Qwen2.5-3B's cache shape."""
    return rm.ModelFacts(model_id="test/model", kind="text", parameters={"model": parameters},
                         quantizable={"model": parameters * 9 // 10}, kv_elements_per_token=2 * 36 * 2 * 128,
                         num_layers=36, hidden_size=2048, intermediate_size=11008)


def macos(hw: rm.Hardware, version: tuple = (15, 1)) -> rm.Hardware:
    return dataclasses.replace(hw, macos=version, metal_kernels=True)


POLICY = [
    # hardware, parameters, device, dtype, quantization
    (macos(mac(8)), SMALL, "mps", "bfloat16", None),
    (macos(mac(8)), MEDIUM, "mps", "bfloat16", "4bit"),    # the guide: CPU; Metal 4-bit fits the GPU
    (macos(mac(8)), LARGE, "mps", "bfloat16", "8bit"),     # fits nowhere: the first of the ladder, refused
    (macos(mac(16)), SMALL, "mps", "bfloat16", None),
    (macos(mac(16)), MEDIUM, "mps", "bfloat16", None),
    (macos(mac(16)), LARGE, "mps", "bfloat16", "8bit"),
    (macos(mac(32)), MEDIUM, "mps", "bfloat16", None),
    (macos(mac(32)), LARGE, "mps", "bfloat16", None),
    (macos(mac(64)), LARGE, "mps", "bfloat16", None),
    (macos(mac(16), (13, 5)), MEDIUM, "mps", "float16", None),      # bfloat16 needs macOS 14
    (dataclasses.replace(macos(mac(32)), ram_available=32 * GB, metal_kernels=False), SMALL, "mps", "bfloat16", None),
    (mac(16, mps=False), SMALL, "cpu", "float32", None),
    (linux(False, H100), SMALL, "cuda", "bfloat16", None),
    (linux(False, H100), LARGE, "cuda", "bfloat16", None),
    (linux(False, T4), MEDIUM, "cuda", "float16", None),
    (linux(True), MEDIUM, "cpu", "bfloat16", None),
    (linux(False), MEDIUM, "cpu", "float32", None),
]


@pytest.mark.parametrize("hw, parameters, device, dtype, quantization", POLICY)
def test_policy(hw, parameters, device, dtype, quantization):
    plan = rm.choose_plan(hw, facts(parameters), rm.Options())
    assert (plan.device, plan.dtype, plan.quantization) == (device, dtype, quantization)
    assert plan.quantizer == ("metal" if quantization else "")


def test_reasons_use_the_guides_words():
    plan = rm.choose_plan(macos(mac(16)), facts(MEDIUM), rm.Options())
    assert plan.reasons[0] == "🚀 Medium model with sufficient RAM - using MPS"
    plan = rm.choose_plan(mac(8, mps=False), facts(MEDIUM), rm.Options())
    assert plan.reasons[0] == "💻 MPS is not available - using CPU"
    assert rm.choose_device(macos(mac(8)), "medium", rm.Options()) == \
        ("cpu", "💻 Medium model needs 16 GB of RAM for MPS (this Mac has 8.0 GB) - using CPU")   # before Metal
    no_kernels = dataclasses.replace(mac(24), ram_available=24 * GB, macos=(15, 1))
    plan = rm.choose_plan(no_kernels, facts(LARGE), rm.Options())
    assert plan.reasons[0] == "💻 Large model: the size policy keeps it off MPS in 16-bit below 32 GB of RAM (this Mac has " \
                              "24.0 GB)"
    assert plan.reasons[3].startswith("💡 8-bit quantization would fit on MPS (") and \
        plan.reasons[3].endswith("): pip install kernels to use it")
    assert (plan.device, plan.dtype, plan.quantization) == ("cpu", "bfloat16", None)   # float32's 30.5 GB: no


def test_a_16_gb_mac_counts_as_16_gb():
    # psutil reports 17179869184 bytes for a 16 GB Mac: exactly the threshold.
    assert rm.choose_plan(mac(16), facts(MEDIUM), rm.Options()).device == "mps"


@pytest.mark.parametrize("options, device, dtype, says", [
    (rm.Options(force_cpu=True), "cpu", "float32", "--force_cpu"),
    (rm.Options(device="cpu"), "cpu", "float32", "--device cpu"),
    (rm.Options(dtype="float16"), "mps", "float16", "--dtype float16"),
    (rm.Options(device="mps"), "mps", "bfloat16", "--device mps"),
])
def test_flags_override_the_policy_and_say_so(options, device, dtype, says):
    plan = rm.choose_plan(macos(mac(8)), facts(LARGE), options)
    assert (plan.device, plan.dtype) == (device, dtype)
    assert any(says in reason for reason in plan.reasons)


def test_bitsandbytes_is_never_tried_on_apple_silicon_metal_is():
    plan = rm.choose_plan(macos(mac(16)), facts(MEDIUM), rm.Options(quantize="4bit"))
    assert (plan.device, plan.quantization, plan.quantizer) == ("mps", "4bit", "metal")
    assert plan.reasons[2:4] == ("🍎 Skipping quantization on Apple Silicon (bitsandbytes not compatible)",
                                 "🗜️ 4bit Metal quantization on MPS (MLX's kernels through transformers' MetalConfig; "
                                 "the weights are quantized as they load)")
    plan = rm.choose_plan(mac(16, mps=False), facts(MEDIUM), rm.Options(quantize="4bit"))
    assert plan.quantization is None
    assert plan.reasons[2:4] == ("🍎 Skipping quantization on Apple Silicon (bitsandbytes not compatible)",
                                 "💡 MPS will provide GPU acceleration instead")


def test_quantization_on_cuda_and_not_on_the_cpu():
    assert rm.choose_plan(linux(False, H100), facts(LARGE), rm.Options(quantize="4bit")).quantization == "4bit"
    assert rm.choose_plan(linux(False, H100), facts(LARGE), rm.Options(quantize="8bit")).quantization == "8bit"
    plan = rm.choose_plan(linux(True), facts(LARGE), rm.Options(quantize="8bit"))
    assert plan.quantization is None and "needs a CUDA GPU or Apple Silicon" in plan.reasons[2]


def test_quantize_on_the_cpu_is_skipped_with_a_note(tiny_models):
    """Chosen automatically, the CPU skips quantization with a note (a script stays portable);
    --quantize with --device cpu is a contradiction, refused (test_cli_errors.py)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the tool would quantize")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--quantize", "4bit",
                      *GREEDY_ANY_DEVICE)
    assert result.returncode == 0, result.stderr
    assert "⚠️ Skipping --quantize 4bit: quantization needs a CUDA GPU or Apple Silicon" in result.stderr


def test_the_plans_to_retry_with_are_fit_checked(real_facts):
    options, workload, omni = rm.Options(), rm.Workload(), real_facts[OMNI]
    on_gpu = rm.choose_plan(spec("cuda:24", cpu_bf16=False), omni, options)
    cpu = rm.retry_plan(spec("cuda:24", cpu_bf16=False), omni, options, workload, on_gpu, overflowed=False)
    assert (cpu.device, cpu.dtype, cpu.quantization, cpu.fits) == ("cpu", "float32", None, True)   # 64 GB of RAM
    assert cpu.reasons[-1].endswith("(available RAM): fits")
    small = spec("cuda:24", cpu_bf16=False, ram_gb=12)
    assert rm.retry_plan(small, omni, options, workload, on_gpu, overflowed=False).dtype == "bfloat16"   # halved
    with pytest.raises(rm.RunError, match=r"memory ran out on the GPU in bfloat16, and Qwen--Qwen2.5-Omni-3B needs "
                                          r"about \d+\.\d+ GB to retry .* which has 6\.00 GB of RAM available"):
        rm.retry_plan(spec("cuda:24", ram_gb=6), omni, options, workload, on_gpu, overflowed=False)
    # The logits overflowed: a wider dtype on the same device where it fits
    half = rm.choose_plan(spec("cuda:24"), omni, rm.Options(dtype="float16"))
    wider = rm.retry_plan(spec("cuda:24"), omni, options, workload, half, overflowed=True)
    assert (wider.device, wider.dtype) == ("cuda", "bfloat16")
    old_mac = rm.simulated_hardware("mps:32:macos13.5")
    mac_half = rm.choose_plan(old_mac, omni, options)
    assert (mac_half.device, mac_half.dtype) == ("mps", "float16")
    assert rm.retry_plan(old_mac, omni, options, workload, mac_half, overflowed=True).dtype == "float32"
    with pytest.raises(rm.RunError, match="turned NaN or infinite in float32, .* the checkpoint looks damaged"):
        rm.retry_plan(spec("cuda:24"), omni, options, workload, dataclasses.replace(half, dtype="float32"), True)


# --- when the first choice does not fit ---------------------------------------------

PLANS = [
    # spec, model, speech, device, dtype, quantization, fits
    ("mps:16", OMNI, False, "mps", "bfloat16", None, True),     # the thinker fits Metal's 10.7 GB
    ("mps:16", OMNI, True, "mps", "bfloat16", "8bit", True),    # speaking: the thinker alone quantized by Metal
    ("mps:16:m1", OMNI, True, "mps", "bfloat16", "8bit", True),
    ("mps:8", OMNI, True, "mps", "bfloat16", "8bit", False),    # even a 4-bit thinker and 16/32-bit speech: no
    ("mps:32", OMNI, True, "mps", "bfloat16", None, True),
    ("mps:16:macos13.5", OMNI, False, "mps", "float16", None, True),
    ("mps:8", Q15, False, "mps", "bfloat16", None, True),
    ("mps:8", Q3, False, "mps", "bfloat16", "8bit", True),      # the guide's CPU, but Metal 8-bit fits the GPU
    ("mps:8", OMNI, False, "mps", "bfloat16", "4bit", True),
    ("mps:16", Q7, False, "mps", "bfloat16", "8bit", True),     # a 7B on a 16 GB Mac: on its GPU
    ("mps:32", Q7, False, "mps", "bfloat16", None, True),       # on a 32 GB Mac, 16-bit as the guide says
    ("mps:4", OMNI, False, "mps", "bfloat16", "8bit", False),
    ("cuda:24", OMNI, True, "cuda", "bfloat16", None, True),
    ("cuda:12", VL, False, "cuda", "bfloat16", None, True),
    ("cuda:8", VL, False, "cuda", "bfloat16", "4bit", True),    # 7.5 GB of bf16 weights: 4-bit instead
    ("cuda:8", OMNI, False, "cuda", "bfloat16", "4bit", True),
    ("cuda:4,4", Q3, False, "cuda", "bfloat16", None, True),     # spread over two GPUs
    ("cuda:2", Q3, False, "cpu", "bfloat16", None, True),       # even 4-bit is too big for 1.5 GB
    ("cpu:4", Q05, False, "cpu", "bfloat16", None, True),
    ("cpu:4", Q3, False, "cpu", "bfloat16", None, False),
    ("cpu:16", OMNI, False, "cpu", "bfloat16", None, True),
]


@pytest.mark.parametrize("hardware, model, speech, device, dtype, quantization, fits", PLANS)
def test_plans_for_every_config(real_facts, hardware, model, speech, device, dtype, quantization, fits):
    plan = rm.choose_plan(spec(hardware), real_facts[model], SPEECH if speech else rm.Options())
    assert (plan.device, plan.dtype, plan.quantization, plan.fits) == (device, dtype, quantization, fits)
    assert plan.estimate.total == (plan.estimate.weights_bytes + plan.estimate.kv_cache_bytes
                                   + plan.estimate.activation_bytes)
    if fits:
        assert plan.estimate.total <= plan.budget_bytes


def test_the_tier_policy_comes_first_and_the_switch_is_explained(real_facts):
    plan = rm.choose_plan(spec("cuda:8"), real_facts[VL], rm.Options())
    assert plan.reasons[0] == "🚀 NVIDIA GPU found (simulated 8 GB GPU) - using CUDA"
    assert plan.reasons[2].startswith("📐 Needs about 7.62 GB on the GPU (weights 6.99 GB")
    assert plan.reasons[2].endswith("of 7.50 GB (free memory of cuda:0): does not fit")
    assert plan.reasons[3] == "⚠️ Too big for the GPU in bfloat16: using the GPU with 4bit quantization instead"
    assert plan.reasons[-1].endswith(": fits")


def test_four_bit_needs_bitsandbytes_installed(real_facts):
    hw = dataclasses.replace(spec("cuda:8", ram_gb=64), bitsandbytes=False)
    plan = rm.choose_plan(hw, real_facts[VL], rm.Options())
    assert (plan.device, plan.quantization) == ("cpu", None)
    assert any(r.startswith("💡 4-bit quantization would fit on the GPU") and r.endswith("pip install bitsandbytes "
               "to use it") for r in plan.reasons)


def test_a_cpu_without_bf16_takes_bfloat16_only_when_float32_does_not_fit(real_facts):
    plan = rm.choose_plan(spec("cpu:16", cpu_bf16=False), real_facts[Q3], rm.Options())
    assert (plan.dtype, plan.fits) == ("float32", True)
    plan = rm.choose_plan(spec("cpu:8", cpu_bf16=False), real_facts[Q3], rm.Options())
    assert (plan.dtype, plan.fits) == ("bfloat16", True)
    assert "slow: this CPU lacks native bf16" in plan.reasons[-2]


def test_forcing_a_device_warns_instead_of_switching(real_facts):
    plan = rm.choose_plan(spec("cuda:8"), real_facts[VL], rm.Options(device="cuda"))
    assert (plan.device, plan.quantization, plan.fits) == ("cuda", None, False)
    assert plan.reasons[-1].startswith("⚠️ Going ahead on the GPU because you asked for it")


def test_the_refusal_names_the_figures_and_the_options_that_fit_the_case(real_facts):
    hw = spec("cpu:8", cpu_bf16=False)
    plan = rm.choose_plan(hw, real_facts[OMNI], rm.Options(), rm.Workload(image_sizes=((451, 300),)))
    message = rm.does_not_fit_message(real_facts[OMNI], plan, hw)
    assert message.startswith("Qwen--Qwen2.5-Omni-3B needs about 18.9")
    # 17.5 GB of weights for 8 GB: shorter answers or smaller pictures would not help
    assert message.endswith("on the CPU in float32 (weights 17.52 GB) but there is 8.00 GB (available RAM); try a "
                            "smaller model such as Qwen/Qwen2.5-1.5B-Instruct, Qwen's own 4-bit checkpoint of it (AWQ or "
                            "GPTQ) on an NVIDIA GPU, a serving engine (vLLM, SGLang) on a machine with more GPU memory")
    # the weights fit, a long answer's KV cache does not: then shorter answers are the way (and the cache is
    # counted up to the model's window, 32,768 tokens, not to the 200,000 asked for)
    plan = rm.choose_plan(spec("cpu:4"), real_facts[Q15], rm.Options(sampling=rm.Sampling(200_000)))
    assert not plan.fits and plan.estimate.context_tokens == 32_768
    assert rm.does_not_fit_message(real_facts[Q15], plan, spec("cpu:4")).endswith(
        "try a smaller model such as Qwen/Qwen2.5-1.5B-Instruct, fewer --max_new_tokens")
    plan = rm.choose_plan(spec("cuda:4"), real_facts[Q15], rm.Options(sampling=rm.Sampling(200_000), device="cuda"))
    assert not plan.fits and plan.proceeds and rm.does_not_fit_message(real_facts[Q15], plan, spec("cuda:4")).endswith(
        "fewer --max_new_tokens, --device to force it anyway")


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(st.builds(lambda gb: f"mps:{gb}", st.integers(4, 192)),
                      st.builds(lambda gbs: "cuda:" + ",".join(map(str, gbs)),
                                st.lists(st.integers(2, 141), min_size=1, max_size=4)),
                      st.builds(lambda gb: f"cpu:{gb}", st.integers(2, 512))),
       model=st.sampled_from([Q05, Q15, Q3, VL, OMNI]), device=st.sampled_from(["auto", "mps", "cuda", "cpu"]),
       dtype=st.sampled_from(["auto", "float16", "bfloat16", "float32"]),
       quantize=st.sampled_from(["none", "4bit", "8bit"]), speech=st.booleans(),
       max_new_tokens=st.integers(1, 200_000), images=st.lists(st.tuples(st.integers(56, 8000), st.integers(56, 8000)),
                                                               max_size=3))
def test_the_plan_never_picks_a_device_the_machine_lacks(real_facts, spec, model, device, dtype, quantize, speech,
                                                           max_new_tokens, images):
    hw = rm.simulated_hardware(spec)
    kinds = {"cpu", spec.split(":")[0]}
    if device != "auto" and device not in kinds:
        return   # refused before planning (check_device_available), tested in test_cli_errors.py
    facts = real_facts[model]
    options = rm.Options(device=device, dtype=dtype, quantize=quantize, sampling=rm.Sampling(max_new_tokens),
                         output_audio=ROOT / "r.wav" if speech and facts.kind == "omni" else None)
    plan = rm.choose_plan(hw, facts, options, rm.Workload(image_sizes=tuple(images) if facts.vision else ()))
    assert plan.device in kinds
    assert set(plan.gpus) <= set(range(len(hw.cuda)))
    assert plan.quantizer in ({"": "", "cuda": "bitsandbytes", "mps": "metal"}[plan.device] if plan.quantization
                              else "",)   # bitsandbytes on CUDA only, never on a Mac; Metal on MPS only
    assert plan.device != "mps" or dtype != "auto" or plan.dtype == "bfloat16"   # macOS 26: bfloat16 on MPS


# --- the dry run, as a user runs it ------------------------------------------------------

def test_dry_run_json_on_a_folder_with_only_config_json(tmp_path):
    folder = tmp_path / "omni"
    folder.mkdir()
    shutil.copy(CONFIGS / OMNI / "config.json", folder / "config.json")
    result = run_tool("--model_id", folder, "--dry_run", "--json", "--hardware", "mps:16",
                      "--image_path", SAMPLE_IMAGE, "--prompt", "What is in this picture?")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["device"], plan["dtype"], plan["quantization"], plan["fits"]) == ("mps", "bfloat16", None, True)
    assert plan["mac"] == {"chip": "M3", "macos": "26.0"}
    assert plan["components"] == {"thinker": {"parameters": 4_703_464_448, "bytes": 4_703_464_448 * 2}}
    assert plan["parameters"] == 4_703_464_448 and plan["weights_bytes"] == 4_703_464_448 * 2
    assert plan["media_tokens"] == 178
    assert plan["estimated_bytes"] == plan["weights_bytes"] + plan["kv_cache_bytes"] + plan["activation_bytes"]
    assert plan["budget_bytes"] == int(16 * GB * 2 / 3)
    assert plan["reasons"][0] == "🚀 Medium model with sufficient RAM - using MPS"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]   # nothing downloaded or written
    assert "✅ Dry run: no weights were loaded" in result.stderr


def test_a_spoken_reply_is_planned_with_talker_and_token2wav(tiny_models, tmp_path):
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--dry_run", "--json", "--output_audio",
                      tmp_path / "never_written.wav")
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)["components"]) == ["thinker", "talker", "token2wav"]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_that_fits_nowhere_exits_1_with_the_figures():
    result = run_tool("--model_id", CONFIGS / OMNI, "--dry_run", "--hardware", "mps:4")
    assert result.returncode == 1
    assert "does NOT fit" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"❌ A real run would stop here: {CONFIGS / OMNI} needs about 5.74 GB on MPS in 8bit Metal")


def test_a_real_run_prints_the_plan_it_follows(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Hi", "--image_path", SAMPLE_IMAGE,
                      "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    fit = [line for line in result.stderr.splitlines() if line.startswith("📐")]
    assert len(fit) == 1 and fit[0].endswith("(available RAM): fits")


def test_a_real_run_that_fits_nowhere_stops_before_loading(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hi", script=ROOT / "tests" / "oom_wrapper.py",
                      env=offline_env(SIMULATED_RAM_GB="0.1"))
    assert result.returncode == 1
    assert "[oom_wrapper] from_pretrained" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "needs about 0.25 GB on the CPU" in last and "0.10 GB (available RAM)" in last


# --- Apple Silicon, as the field reports it --------------------------------------------------

@pytest.mark.parametrize("hardware, dtype, says", [
    ("mps:16", "bfloat16", "🔢 bfloat16 on MPS: Qwen was trained in bfloat16 and its activations overflow float16 "
                           "(the same memory)"),
    ("mps:16:macos13.5", "float16", "🔢 float16 on MPS for memory efficiency"),
    ("mps:16:m1:macos13.5", "float16", "⚠️ bfloat16 needs macOS 14 on MPS and this Mac has macOS 13.5: float16 can "
                                       "overflow with Qwen; an answer that does is redone in float32"),
])
def test_bfloat16_on_mps_from_macos_14(hardware, dtype, says):
    result = run_tool("--model_id", CONFIGS / OMNI, "--dry_run", "--json", "--hardware", hardware, "--prompt", "Hi")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["device"], plan["dtype"]) == ("mps", dtype) and says in plan["reasons"]
    assert plan["mac"]["macos"] == ("13.5" if "13.5" in hardware else "26.0")


def test_vision_needs_macos_13_2_on_mps(real_facts):
    plan = rm.choose_plan(rm.simulated_hardware("mps:32:macos13.1"), real_facts[VL], rm.Options())
    assert plan.device == "cpu" and plan.reasons[0] == (
        "💻 Vision models need macOS 13.2 or later on MPS (Conv3d), and this Mac has macOS 13.1 - using CPU")
    assert rm.choose_plan(rm.simulated_hardware("mps:32:macos13.1"), real_facts[Q3], rm.Options()).device == "mps"


def test_metal_weights_are_counted_with_their_group_scales_and_biases(real_facts):
    facts = real_facts[Q7]
    plan = rm.choose_plan(rm.simulated_hardware("mps:16"), facts, rm.Options())
    packed, rest = facts.quantizable["model"], facts.total - facts.quantizable["model"]
    # 8 bits a weight, and a bfloat16 scale and bias per 64 weights; the embedding and head stay bfloat16
    assert plan.estimate.weights_bytes == int(packed * (1 + 4 / 64) + rest * 2)
    assert plan.reasons[:3] == (
        "💻 Large model: the size policy keeps it off MPS in 16-bit below 32 GB of RAM (this Mac has 16.0 GB)",
        "🔢 bfloat16 on MPS: Qwen was trained in bfloat16 and its activations overflow float16 (the same memory)",
        "🗜️ 8bit Metal quantization on MPS (MLX's kernels through transformers' MetalConfig; the weights are "
        "quantized as they load)")
    four = rm.estimate_memory(facts, ("model",), "bfloat16", "4bit", rm.Options(), rm.Workload(), "metal")
    assert four.weights_bytes == int(packed * (0.5 + 4 / 64) + rest * 2)


# --- checkpoints saved quantized ------------------------------------------------------------

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def omni_7b() -> dict:
    """Qwen2.5-Omni-7B's shape, derived from the published Omni-3B config with the 7B thinker's sizes (Qwen2.5-7B's
    language model; vision and audio towers project to its 3584) and the 7B talker's embedding and MLP width."""
    config = json.loads((CONFIGS / OMNI / "config.json").read_text())
    thinker = config["thinker_config"]
    thinker["text_config"].update(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                  num_hidden_layers=28, num_key_value_heads=4, vocab_size=152064)
    thinker["vision_config"]["out_hidden_size"] = thinker["audio_config"]["output_dim"] = 3584
    config["talker_config"].update(embedding_size=3584, intermediate_size=18944)
    return config


def saved(tmp_path, name: str, config: dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_awq_omni_7b_counts_its_4_bit_bytes_on_a_24_gb_gpu(tmp_path):
    folder = saved(tmp_path, "Qwen2.5-Omni-7B-AWQ", {**omni_7b(), "quantization_config": {
        **AWQ, "modules_to_not_convert": ["visual", "audio_tower", "talker", "token2wav"]}})
    result = run_tool("--model_id", folder, "--dry_run", "--json", "--hardware", "cuda:24", "--prompt", "Hi")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["device"], plan["dtype"], plan["quantization"], plan["quantizer"]) == ("cuda", "float16", "4bit", "awq")
    info = rm.resolve_model(str(folder))
    facts = rm.model_facts(rm.load_config(info, False), info, False)
    packed = facts.quantizable["thinker"]    # the language model's Linear layers; the towers stay 16-bit
    assert packed == 6_525_417_472 and facts.parameters["thinker"] == 8_931_813_888
    assert plan["weights_bytes"] == int(packed * (0.5 + 2.5 / 128) + (facts.parameters["thinker"] - packed) * 2)
    assert plan["weights_bytes"] < 8.3e9   # against 17.9 GB in bfloat16
    assert f"🗜️ {folder} is saved quantized (AWQ 4-bit, groups of 128): it runs on the GPU with gptqmodel" in \
        plan["reasons"]


def test_a_gptq_checkpoint_without_an_nvidia_gpu_is_refused_with_what_would_work(tmp_path):
    folder = saved(tmp_path, "Qwen2.5-7B-Instruct-GPTQ-Int4", {
        **json.loads((CONFIGS / Q7 / "config.json").read_text()), "quantization_config": GPTQ})
    result = run_tool("--model_id", folder, "--dry_run", "--hardware", "mps:16", "--prompt", "Hi")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"❌ A real run would stop here: {folder} is saved quantized (GPTQ 4-bit), which runs on NVIDIA GPUs only, and "
        "this machine has none; use Qwen/Qwen2.5-7B-Instruct (on a Mac with --quantize 4bit, which quantizes it for "
        "Metal as it loads), a smaller model such as Qwen/Qwen2.5-1.5B-Instruct, or a serving engine (vLLM, SGLang) on "
        "a machine with an NVIDIA GPU")


def test_an_fp8_checkpoint_off_nvidia_gpus_is_counted_as_it_loads(real_facts, tmp_path):
    folder = saved(tmp_path, "Qwen2.5-7B-Instruct-FP8", {
        **json.loads((CONFIGS / Q7 / "config.json").read_text()),
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}})
    result = run_tool("--model_id", folder, "--dry_run", "--json", "--hardware", "cpu:64", "--prompt", "Hi")
    plan = json.loads(result.stdout)
    assert (plan["device"], plan["quantization"]) == ("cpu", None)
    assert plan["weights_bytes"] == real_facts[Q7].total * rm.DTYPE_BYTES[plan["dtype"]]
    assert plan["reasons"][0].endswith("without an NVIDIA GPU transformers dequantizes it to 16-bit while loading")
    on_gpu = json.loads(run_tool("--model_id", folder, "--dry_run", "--json", "--hardware", "cuda:24", "--prompt",
                                 "Hi").stdout)
    assert (on_gpu["quantization"], on_gpu["quantizer"]) == ("8bit", "fp8")


@pytest.mark.parametrize("name, config, args, says", [
    ("Qwen2.5-7B-Instruct-4bit", {"quantization": {"group_size": 64, "bits": 4}}, (),
     "an MLX checkpoint (MLX 4-bit, mlx-lm's format), which transformers cannot load; run it with mlx-lm or mlx-vlm "
     "(pip install mlx-vlm), or use Qwen/Qwen2.5-7B-Instruct"),
    ("Qwen2.5-7B-Instruct-AWQ", {"quantization_config": AWQ}, ("--quantize", "4bit"),
     "is already quantized (AWQ 4-bit); drop --quantize"),
])
def test_checkpoints_that_cannot_load_as_asked_are_refused_before_loading(tmp_path, name, config, args, says):
    folder = saved(tmp_path, name, {**json.loads((CONFIGS / Q7 / "config.json").read_text()), **config})
    result = run_tool("--model_id", folder, "--dry_run", "--hardware", "cuda:24", "--prompt", "Hi", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_a_mac_before_macos_12_3_has_no_mps_to_plan_for(real_facts):
    """PyTorch's MPS backend needs macOS 12.3: an older Mac is planned on its CPU, and says why."""
    hw = rm.simulated_hardware("mps:32:macos12.1")
    assert not hw.mps_available
    plan = rm.choose_plan(hw, real_facts[Q15], rm.Options())
    assert plan.device == "cpu" and plan.reasons[0] == "💻 MPS is not available - using CPU"
    assert rm.simulated_hardware("mps:32:macos12.3").mps_available


def test_a_forced_device_that_does_not_fit_goes_ahead_only_where_memory_can_run_out(real_facts):
    """Forcing an accelerator goes ahead (running out of memory there falls back to the CPU, fit-checked);
    forcing the CPU past its RAM does not: nothing catches the system's out-of-memory killer."""
    gpu = rm.choose_plan(spec("cuda:8"), real_facts[VL], rm.Options(device="cuda"))
    assert (gpu.fits, gpu.proceeds) == (False, True) and gpu.reasons[-1].startswith("⚠️ Going ahead on the GPU")
    cpu = rm.choose_plan(spec("cpu:4"), real_facts[VL], rm.Options(device="cpu"))
    assert (cpu.fits, cpu.proceeds) == (False, False) and not any("Going ahead" in line for line in cpu.reasons)


def test_a_dry_run_says_what_a_forced_run_would_do():
    forced = run_tool("--model_id", CONFIGS / VL, "--dry_run", "--hardware", "cuda:8", "--device", "cuda",
                      "--prompt", "Hi")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.strip().endswith("✅ Dry run: no weights were loaded; a real run would go ahead on the GPU as "
                                          "asked, and fall back to the CPU if memory runs out")
    refused = run_tool("--model_id", CONFIGS / VL, "--dry_run", "--hardware", "cpu:4", "--device", "cpu", "--prompt", "Hi")
    assert refused.returncode == 1 and "❌ A real run would stop here" in refused.stderr.strip().splitlines()[-1]


def test_a_spoken_conversation_on_a_16_gb_mac_runs_on_its_gpu_the_thinker_quantized_alone(real_facts):
    """Qwen2.5-Omni-3B speaking (--voice: its cache counted up to the context window) on the simulated 16 GB Mac:
    MPS, the thinker in 8-bit Metal, the talker in bfloat16 and token2wav in float32, within Metal's 10.7 GB;
    Metal is told to leave the talker, token2wav and the output head alone. (Never run on a real Mac.)"""
    result = run_tool("--model_id", CONFIGS / OMNI, "--dry_run", "--json", "--hardware", "mps:16", "--voice")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["device"], plan["dtype"], plan["quantization"], plan["fits"]) == ("mps", "bfloat16", "8bit", True)
    facts = real_facts[OMNI]
    assert plan["components"]["talker"]["bytes"] == facts.parameters["talker"] * 2
    assert plan["components"]["token2wav"]["bytes"] == facts.parameters["token2wav"] * 4
    assert plan["components"]["thinker"]["bytes"] < facts.parameters["thinker"] * 2 * 0.6
    assert plan["context_tokens"] == facts.context_window and plan["estimated_bytes"] <= plan["budget_bytes"]
    assert any("the thinker alone: the talker and token2wav keep 16 and 32 bits" in line for line in plan["reasons"])
    speaking = rm.choose_plan(spec("mps:16"), facts, SPEECH)
    assert rm.metal_skips(speaking) == ["lm_head", "talker", "token2wav"]
    assert rm.metal_skips(rm.choose_plan(spec("mps:8"), real_facts["Qwen--Qwen2.5-3B-Instruct"], rm.Options())) is None
