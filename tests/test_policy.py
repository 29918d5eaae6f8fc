"""The decisions, as pure functions of simulated hardware and the real published configs."""

from __future__ import annotations

import json

import pytest

import run_multimodal as rm
from conftest import CONFIGS

GB = rm.GB


def mac(ram_gb: int, mps: bool = True, bf16: bool = False) -> rm.Hardware:
    return rm.Hardware(system="Darwin", machine="arm64", cpu_count=8, cpu_bf16=bf16, ram_total=ram_gb * GB,
                       ram_available=ram_gb * GB // 2, mps_built=True, mps_available=mps,
                       metal_budget=int(ram_gb * GB * 0.67) if mps else None)


def linux(bf16: bool, *gpus: rm.CudaDevice) -> rm.Hardware:
    return rm.Hardware(system="Linux", machine="x86_64", cpu_count=16, cpu_bf16=bf16, ram_total=64 * GB,
                       ram_available=60 * GB, cuda=tuple(gpus))


H100 = rm.CudaDevice("NVIDIA H100 80GB HBM3", 80 * GB, 79 * GB, bf16=True)
T4 = rm.CudaDevice("Tesla T4", 16 * GB, 15 * GB, bf16=False)


# --- exact sizes from the real configs ---------------------------------------------

def test_exact_parameter_counts_match_the_published_sizes(real_facts):
    # configs/SOURCES.md: 0.494 B, 1.544 B, 3.086 B, 3.755 B; Omni 5.537 B = 4.703 + 0.385 + 0.449
    assert real_facts["Qwen--Qwen2.5-0.5B-Instruct"].total == 494_032_768
    assert real_facts["Qwen--Qwen2.5-1.5B-Instruct"].total == 1_543_714_304
    assert real_facts["Qwen--Qwen2.5-3B-Instruct"].total == 3_085_938_688
    assert real_facts["Qwen--Qwen2.5-VL-3B-Instruct"].total == 3_754_622_976
    omni = real_facts["Qwen--Qwen2.5-Omni-3B"]
    assert omni.total == 5_537_120_640
    assert omni.parameters == {"thinker": 4_703_464_448, "talker": 384_604_928, "token2wav": 449_051_264}
    assert rm.loading_components(omni, speech=False) == ("thinker",)


def test_tied_embeddings_are_counted_once(real_facts):
    # Qwen2.5-0.5B ties lm_head to the 151936 x 896 embedding; counted twice it would be 0.630 B.
    assert real_facts["Qwen--Qwen2.5-0.5B-Instruct"].total == 630_167_424 - 151_936 * 896


@pytest.mark.parametrize("name, tier", [
    ("Qwen--Qwen2.5-0.5B-Instruct", "small"),
    ("Qwen--Qwen2.5-1.5B-Instruct", "small"),
    ("Qwen--Qwen2.5-3B-Instruct", "medium"),
    ("Qwen--Qwen2.5-VL-3B-Instruct", "medium"),
    ("Qwen--Qwen2.5-Omni-3B", "medium"),
])
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


# --- the policy table --------------------------------------------------------------

SMALL, MEDIUM, LARGE = 1_543_714_304, 4_703_464_448, 7_615_616_512


def facts(parameters: int) -> rm.ModelFacts:
    """A text model of that many parameters with Qwen2.5-3B's cache shape."""
    return rm.ModelFacts(model_id="test/model", kind="text", parameters={"model": parameters},
                         quantizable={"model": parameters * 9 // 10}, kv_elements_per_token=2 * 36 * 2 * 128,
                         num_layers=36, hidden_size=2048, intermediate_size=11008)

POLICY = [
    # hardware, parameters, device, dtype
    (mac(8), SMALL, "mps", "float16"),
    (mac(8), MEDIUM, "cpu", "float32"),
    (mac(8), LARGE, "cpu", "float32"),
    (mac(16), SMALL, "mps", "float16"),
    (mac(16), MEDIUM, "mps", "float16"),
    (mac(16), LARGE, "cpu", "float32"),
    (mac(16, bf16=True), LARGE, "cpu", "bfloat16"),   # M2 and later have native bf16
    (mac(32), MEDIUM, "mps", "float16"),
    (mac(32), LARGE, "mps", "float16"),
    (mac(64), LARGE, "mps", "float16"),
    (mac(16, mps=False), SMALL, "cpu", "float32"),
    (linux(False, H100), SMALL, "cuda", "bfloat16"),
    (linux(False, H100), LARGE, "cuda", "bfloat16"),
    (linux(False, T4), MEDIUM, "cuda", "float16"),
    (linux(True), MEDIUM, "cpu", "bfloat16"),
    (linux(False), MEDIUM, "cpu", "float32"),
]


@pytest.mark.parametrize("hw, parameters, device, dtype", POLICY)
def test_policy(hw, parameters, device, dtype):
    plan = rm.choose_plan(hw, facts(parameters), rm.Request())
    assert (plan.device, plan.dtype, plan.quantization) == (device, dtype, None)


def test_reasons_use_the_guides_words():
    plan = rm.choose_plan(mac(16), facts(MEDIUM), rm.Request())
    assert plan.reasons[0] == "🚀 Medium model with sufficient RAM - using MPS"
    assert rm.describe_hardware(mac(16))[:2] == ["🍎 Apple Silicon detected with MPS support",
                                                 "📊 System RAM: 16.0 GB (8.0 GB available)"]
    plan = rm.choose_plan(mac(8), facts(MEDIUM), rm.Request())
    assert plan.reasons[0] == "💻 Medium model needs 16 GB of RAM for MPS (this Mac has 8.0 GB) - using CPU"


def test_a_16_gb_mac_counts_as_16_gb():
    # psutil reports 17179869184 bytes for a 16 GB Mac: exactly the threshold.
    assert rm.choose_plan(mac(16), facts(MEDIUM), rm.Request()).device == "mps"


@pytest.mark.parametrize("request_, device, dtype, says", [
    (rm.Request(force_cpu=True), "cpu", "float32", "--force_cpu"),
    (rm.Request(device="cpu"), "cpu", "float32", "--device cpu"),
    (rm.Request(dtype="bfloat16"), "cpu", "bfloat16", "--dtype bfloat16"),
    (rm.Request(device="mps"), "mps", "float16", "--device mps"),
])
def test_flags_override_the_policy_and_say_so(request_, device, dtype, says):
    plan = rm.choose_plan(mac(8), facts(LARGE), request_)
    assert (plan.device, plan.dtype) == (device, dtype)
    assert any(says in reason for reason in plan.reasons)


def test_quantization_is_never_tried_on_apple_silicon():
    plan = rm.choose_plan(mac(16), facts(MEDIUM), rm.Request(quantize="4bit"))
    assert plan.quantization is None
    assert plan.reasons[2:4] == ("🍎 Skipping quantization on Apple Silicon (bitsandbytes not compatible)",
                                 "💡 MPS will provide GPU acceleration instead")


def test_quantization_on_cuda_and_not_on_the_cpu():
    assert rm.choose_plan(linux(False, H100), facts(LARGE), rm.Request(quantize="4bit")).quantization == "4bit"
    assert rm.choose_plan(linux(False, H100), facts(LARGE), rm.Request(quantize="8bit")).quantization == "8bit"
    plan = rm.choose_plan(linux(True), facts(LARGE), rm.Request(quantize="8bit"))
    assert plan.quantization is None and "needs a CUDA GPU" in plan.reasons[2]


def test_out_of_memory_fallback_plan_uses_the_cpus_dtype():
    plan = rm.choose_plan(mac(16), facts(MEDIUM), rm.Request())
    fallback = rm.cpu_plan(mac(16), plan, "why")
    assert (fallback.device, fallback.dtype, fallback.quantization) == ("cpu", "float32", None)
    assert rm.cpu_plan(linux(True, H100), plan, "why").dtype == "bfloat16"


def test_unavailable_devices_are_usage_errors():
    with pytest.raises(rm.UsageError, match="--device cuda: no CUDA GPU"):
        rm.check_device_available(mac(16), rm.Request(device="cuda"))
    with pytest.raises(rm.UsageError, match="--device mps: MPS is not available"):
        rm.check_device_available(linux(True, H100), rm.Request(device="mps"))
    rm.check_device_available(linux(True, H100), rm.Request(device="cuda"))


# --- detection helpers ---------------------------------------------------------------

@pytest.mark.parametrize("system, machine, cpuinfo, sysctl, native", [
    ("Linux", "x86_64", "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile", "", True),
    ("Linux", "x86_64", "flags\t\t: fpu avx2 amx_bf16 amx_tile", "", True),
    ("Linux", "x86_64", "flags\t\t: fpu sse4_2 avx2 fma", "", False),
    ("Linux", "aarch64", "Features\t: fp asimd sve bf16 i8mm", "", True),
    ("Linux", "aarch64", "Features\t: fp asimd", "", False),
    ("Darwin", "arm64", "", "1\n", True),    # M2 and later
    ("Darwin", "arm64", "", "0\n", False),   # M1
    ("Darwin", "arm64", "", "", False),
    ("Windows", "AMD64", "", "", False),
])
def test_native_bf16_detection(system, machine, cpuinfo, sysctl, native):
    assert rm.cpu_has_native_bf16(system, machine, cpuinfo, sysctl) is native


def test_model_kinds_from_real_configs():
    def info(name):
        path = CONFIGS / name / "config.json"
        return rm.model_info_from_config(name, json.loads(path.read_text()))

    omni = info("Qwen--Qwen2.5-Omni-3B")
    assert (omni.kind, omni.inputs) == ("omni", {"text", "image", "video", "audio"})
    vl = info("Qwen--Qwen2.5-VL-3B-Instruct")
    assert (vl.kind, vl.inputs) == ("multimodal", {"text", "image", "video"})
    text = info("Qwen--Qwen2.5-3B-Instruct")
    assert (text.kind, text.inputs) == ("text", {"text"})


@pytest.mark.parametrize("exc, oom", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 9.1 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (MemoryError(), True),
    (type("OutOfMemoryError", (RuntimeError,), {})("boom"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_errors_are_recognised(exc, oom):
    assert rm.is_out_of_memory(exc) is oom


def test_sampling_flags():
    assert rm.Sampling(16).generate_kwargs() == {"max_new_tokens": 16}
    greedy = rm.Sampling(16, temperature=0).generate_kwargs()
    assert greedy["do_sample"] is False
    assert rm.Sampling(16, temperature=0.7, top_k=20).generate_kwargs() == {
        "max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_k": 20}


def test_parameter_counts_for_people():
    assert [rm.format_count(n) for n in (5_537_120_640, 243_872, 183_456_000, 12)] == \
        ["5.54 B", "243.9 K", "183.5 M", "12"]
