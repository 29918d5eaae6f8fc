"""Section 6, the hardware: what is detected, the machines --hardware describes, and the devices a run
may ask for."""

from __future__ import annotations

import pytest

import run_multimodal as rm

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


def test_hardware_specs():
    assert rm.parse_hardware_spec("cuda:24,24") == ("cuda", (24.0, 24.0), {})
    assert rm.parse_hardware_spec("MPS:16:M1") == ("mps", (16.0,), {"chip": "M1"})
    for bad in ("gpu:8", "mps", "mps:", "mps:16,16", "cuda:x", "cpu:-4", "cuda:24,", "cpu:0"):
        with pytest.raises(Exception, match="is not a hardware spec"):
            rm.parse_hardware_spec(bad)
    apple = rm.simulated_hardware("mps:16")
    assert (apple.apple_silicon, apple.mps_available, apple.ram_total, apple.cuda) == (True, True, 16 * GB, ())
    two = rm.simulated_hardware("cuda:24,48")
    assert [gpu.total_bytes for gpu in two.cuda] == [24 * GB, 48 * GB]


def test_the_report_uses_the_guides_words():
    assert rm.describe_hardware(mac(16))[:2] == ["🍎 Apple Silicon detected with MPS support",
                                                 "📊 System RAM: 16.0 GB (8.0 GB available)"]
    assert rm.describe_hardware(linux(True, H100))[1] == "🟢 CUDA GPU 0: NVIDIA H100 80GB HBM3, 80.0 GB (79.0 GB free)"


def test_unavailable_devices_are_usage_errors():
    with pytest.raises(rm.UsageError, match="--device cuda: no CUDA GPU"):
        rm.check_device_available(mac(16), rm.Options(device="cuda"))
    with pytest.raises(rm.UsageError, match="--device mps: MPS is not available"):
        rm.check_device_available(linux(True, H100), rm.Options(device="mps"))
    rm.check_device_available(linux(True, H100), rm.Options(device="cuda"))


# --- Apple Silicon: the chip and macOS a simulated Mac names -------------------------------

@pytest.mark.parametrize("spec, chip, macos, bf16", [
    ("mps:16", "M3", (26, 0), True),             # the guide's machine: an M3 on a current macOS
    ("mps:16:m1", "M1", (26, 0), False),          # no FEAT_BF16 on the M1's CPU
    ("mps:16:macos13.5", "M3", (13, 5), True),
    ("mps:16:m1:macos13.5", "M1", (13, 5), False),
    ("mps:16:macos13.5:m1", "M1", (13, 5), False),
])
def test_a_simulated_mac_names_its_chip_and_macos(spec, chip, macos, bf16):
    hw = rm.simulated_hardware(spec)
    assert (hw.chip, hw.macos, hw.cpu_bf16, hw.mps_bf16) == (chip, macos, bf16, macos >= (14, 0))
    assert f"🍎 Apple {chip} on macOS {'.'.join(map(str, macos))}" in rm.describe_hardware(hw)


@pytest.mark.parametrize("bad", ["mps:16:m1:m2", "mps:16:x", "cuda:24:m1", "mps:16:macos", "cpu:8:macos14"])
def test_a_macs_qualifiers_are_checked(bad):
    with pytest.raises(Exception, match="is not a hardware spec; use mps:16"):
        rm.parse_hardware_spec(bad)


def test_bfloat16_on_mps_needs_macos_14():
    old = rm.simulated_hardware("mps:16:macos13.5")
    with pytest.raises(rm.UsageError, match="--dtype bfloat16: MPS runs bfloat16 from macOS 14 on, and this Mac has "
                                            "macOS 13.5; use --dtype float16 or float32, or update macOS"):
        rm.check_device_available(old, rm.Options(device="mps", dtype="bfloat16"))
    rm.check_device_available(rm.simulated_hardware("mps:16"), rm.Options(device="mps", dtype="bfloat16"))
