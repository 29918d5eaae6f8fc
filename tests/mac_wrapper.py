"""run_multimodal.py on a simulated Apple Silicon Mac: we have none, so the hardware is mocked and
nothing else. Used by the tests of the Mac's paths. Environment:
  MAC_SPEC=mps:16:m1:macos13.5   the Mac (as --hardware describes one), detected as if it were real
  MPS_OOM_AT_LOAD=1              loading onto MPS raises PyTorch's MPS out-of-memory error, word for word
  MAC_KERNELS=1                  transformers sees the kernels package (Metal quantization's), so that its
                                 own MetalConfig is reached and refuses, as it does without an MPS device
Loading onto MPS loads on the CPU instead (the tool believes its plan); torch.mps's memory calls are
answered, and each prints a "[mac_wrapper] ..." line on stderr.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
import transformers.utils  # noqa: E402

import run_multimodal as rm  # noqa: E402
from conftest import MPS_OUT_OF_MEMORY  # noqa: E402

rm.detect_hardware = lambda: rm.dataclasses.replace(rm.simulated_hardware(os.environ["MAC_SPEC"]), simulated="")
torch.mps.set_per_process_memory_fraction = lambda fraction: print(f"[mac_wrapper] memory fraction {fraction}",
                                                                   file=sys.stderr)
torch.mps.current_allocated_memory = lambda: 123 * 1024**2
if os.environ.get("MAC_KERNELS"):
    transformers.utils.is_kernels_available = lambda *args, **kwargs: True
real_from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__


def from_pretrained(cls, *args, **kwargs):
    if kwargs.get("device_map") == {"": "mps"}:
        print("[mac_wrapper] from_pretrained onto mps", file=sys.stderr)
        if os.environ.get("MPS_OOM_AT_LOAD"):
            raise RuntimeError(MPS_OUT_OF_MEMORY)
        kwargs.pop("device_map")
    return real_from_pretrained(cls, *args, **kwargs)


transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
sys.exit(rm.main())
