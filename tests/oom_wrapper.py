"""run_multimodal.py with memory running out where a GPU of another size would run out.

Used by test_memory_fallback.py. Environment:
  SIMULATED_GPU_GB=8   a CUDA GPU of that size is present (we have none here): loading onto
                       it raises torch.OutOfMemoryError, as a real one would for a model too big
  SIMULATED_GPU_FITS=1 ... unless the model fits it: then it "loads on the GPU" (on the CPU, in
                       the GPU's place; the tool believes its plan)
  OOM_AT_GENERATE=N    the first N forward passes of a model (the prompt, in generate() or in the
                       tool's fast decoder) raise torch.OutOfMemoryError
  SIMULATED_RAM_GB=0.1 the machine has that much RAM available
Every from_pretrained of a model prints "[oom_wrapper] from_pretrained" on stderr.
The tool itself runs unchanged; only transformers' entry points and the hardware are wrapped.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

import run_multimodal as rm  # noqa: E402

gpu_gb = os.environ.get("SIMULATED_GPU_GB")
ram_gb = os.environ.get("SIMULATED_RAM_GB")
real_detect = rm.detect_hardware


def detect_simulated():
    hw = real_detect()
    if gpu_gb:
        gpu = rm.CudaDevice("Simulated GPU", int(gpu_gb) * rm.GB, int(gpu_gb) * rm.GB, bf16=True)
        hw = rm.dataclasses.replace(hw, cuda=(gpu,))
    if ram_gb:
        hw = rm.dataclasses.replace(hw, ram_available=int(float(ram_gb) * rm.GB))
    return hw


rm.detect_hardware = detect_simulated
real_from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__


def from_pretrained(cls, *args, **kwargs):
    print("[oom_wrapper] from_pretrained", file=sys.stderr)
    if gpu_gb and kwargs.get("device_map") is not None:   # bound for the (simulated) GPU
        if not os.environ.get("SIMULATED_GPU_FITS"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        kwargs.pop("device_map")
    return real_from_pretrained(cls, *args, **kwargs)


transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
if gpu_gb:
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    torch.cuda.set_device = lambda *args, **kwargs: None

if os.environ.get("OOM_AT_GENERATE"):
    # The first N forward passes of any loaded model (the prompt, whether generate() or the tool's
    # fast decoder runs it) raise; later ones run.
    real_call = torch.nn.Module.__call__
    raised = []

    def call(self, *args, **kwargs):
        if len(raised) < int(os.environ["OOM_AT_GENERATE"]) and isinstance(self, transformers.PreTrainedModel):
            raised.append(1)
            print("[oom_wrapper] out of memory in a forward pass", file=sys.stderr)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real_call(self, *args, **kwargs)

    torch.nn.Module.__call__ = call

sys.exit(rm.main())
