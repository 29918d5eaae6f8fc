"""How many operations one decoding step dispatches off CUDA (on the CPU, as on Apple Silicon, where each
dispatched operation costs tens of microseconds): the real Qwen2.5-0.5B-Instruct config with random
weights, the tool's FastDecoder step as the tool runs it off CUDA, counted with a TorchDispatchMode.
Metadata-only operations (views, reshapes, transposes) launch no kernel and are left out.

    python bench/count_step_ops.py [--config Qwen--Qwen2.5-0.5B-Instruct] [--dtype bfloat16] [--by_op]

The last line reads: <ops per layer> ops per layer per token (<total> in all, <layers> layers).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import run_multimodal as rm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="Qwen--Qwen2.5-0.5B-Instruct", help="a folder name in tests/configs")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--by_op", action="store_true", help="also list the operations of one step by name")
    args = parser.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import tiny_models

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            read = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor)}
            made = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            # A view, a reshape or a no-op `to` returns the storage it was given: no kernel runs.
            # An in-place operation (add_, index_copy_) returns its input too, but computes.
            if name.endswith("_") or not all(t.untyped_storage().data_ptr() in read for t in made):
                self.ops[name] += 1
            return out

    rm.quiet_libraries(debug=False)
    with tempfile.TemporaryDirectory() as folder:
        tiny_models.build_qwen2(Path(folder) / "m", full_size=True, config_name=args.config)
        info = rm.resolve_model(str(Path(folder) / "m"))
        model, tokenizer = rm.load_model(info, rm.Plan("cpu", args.dtype, None, "", ()), rm.simulated_hardware("cpu:64"))
    inputs = rm.prepare_inputs(tokenizer, rm.build_messages("Hello there", None, rm.Media(), "text"), model.device)
    length = inputs["input_ids"].shape[-1]
    runtime = rm.choose_runtime(model, "cpu", rm.Options(sampling=rm.Sampling(8, temperature=0)))
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        steps = rm.FastDecoder(model, out.past_key_values, length, 8, masked=runtime.graphs)
        token = out.logits[:, -1].argmax(-1)
        steps.logits_at(token, length)          # a first step, uncounted
        with Count() as count:
            steps.logits_at(token, length + 1)
    layers = len(model.get_decoder().layers)
    total = sum(count.ops.values())
    if args.by_op:
        for name, n in count.ops.most_common():
            print(f"{n:6d}  {name}")
    print(f"{args.config}, {args.dtype}, the '{runtime.decoder}' decoder, torch {torch.__version__}")
    print(f"{total / layers:.1f} ops per layer per token ({total} in all, {layers} layers)")


if __name__ == "__main__":
    main()
