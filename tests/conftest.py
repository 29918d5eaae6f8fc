"""Fixtures and the shared helpers: tiny random-weight checkpoints built once per session, the real
script run as a user runs it (a subprocess, offline), and the check of a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_multimodal.py"
SAMPLES = ROOT / "sample_data"
SAMPLE_IMAGE = SAMPLES / "sample_image.jpg"
SECOND_IMAGE = SAMPLES / "coffee.jpg"
WAV16, WAV44, FLAC, CLIP = (SAMPLES / "question_16k_mono.wav", SAMPLES / "question_44k_stereo.wav",
                            SAMPLES / "question.flac", SAMPLES / "cat_clip.mp4")
CONFIGS = Path(__file__).resolve().parent / "configs"

# The references run on the CPU in float32, so the exact comparisons do too (on a machine
# with a GPU the tool would otherwise pick it, and a GPU's float32 rounds differently).
GREEDY_ANY_DEVICE = ("--temperature", "0", "--dtype", "float32", "--max_new_tokens", "12")
GREEDY = (*GREEDY_ANY_DEVICE, "--device", "cpu")

# PyTorch's MPS allocator, word for word (aten/src/ATen/mps/MPSAllocator.mm), with a 16 GB Mac's figures
MPS_OUT_OF_MEMORY = ("MPS backend out of memory (MPS allocated: 9.06 GB, other allocations: 1.54 GB, max allowed: "
                     "10.67 GB). Tried to allocate 2.00 GB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 "
                     "to disable upper limit for memory allocations (may cause system failure).")

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a user with no network: the Hub is never asked."""
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **extra)


def default_signals() -> None:
    """For a child process (preexec_fn): Ctrl-C as a terminal gives it. A shell starts background
    jobs with SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt; a CI job
    may run as one."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tool(*args, env: dict | None = None, stdin: str | None = None, script: Path = SCRIPT,
             cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """python run_multimodal.py ARGS, as a user types it (stdin closed unless given)."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=env or offline_env(), input=stdin, timeout=timeout, cwd=cwd,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str,
                          alone: bool = False) -> str:
    """The run failed with `code`, its last stderr line (and only Error: line) holds every fragment,
    nothing went to stdout and no traceback was shown; `alone`: nothing else was said before it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    if alone:
        assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[-1]


def stat(stderr: str, name: str) -> int:
    """A number from the stats line: stat(stderr, "tokens ·") is the prompt's tokens."""
    import re

    return int(re.search(rf"(\d+) {name}", stderr).group(1))


def fake_hub_cache(root: Path, model_dir: Path, repo_id: str = "tiny/qwen2",
                   commit: str = "0123456789abcdef") -> tuple[Path, Path]:
    """(cache, snapshot): a Hugging Face cache laid out as a real download leaves it, holding model_dir."""
    import shutil

    cache = root / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache, snapshot


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """qwen2 (text), qwen2_5_vl, qwen2_5_omni (full: thinker, talker, token2wav, voices), qwen3_omni."""
    import tiny_models as builders

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build(root / name) for name, build in builders.BUILDERS.items()}


REAL_CONFIGS = ["Qwen--Qwen2.5-0.5B-Instruct", "Qwen--Qwen2.5-1.5B-Instruct", "Qwen--Qwen2.5-3B-Instruct",
                "Qwen--Qwen2.5-VL-3B-Instruct", "Qwen--Qwen2.5-Omni-3B", "Qwen--Qwen2.5-7B-Instruct"]


@pytest.fixture(scope="session")
def real_facts() -> dict:
    """ModelFacts of every real published config in tests/configs, counted on the meta device."""
    import dataclasses

    import run_multimodal as rm

    rm.quiet_libraries(debug=False)
    found = {}
    for name in REAL_CONFIGS:
        info = rm.resolve_model(str(CONFIGS / name))
        found[name] = rm.model_facts(rm.load_config(info, False), dataclasses.replace(info, model_id=name), False)
    return found


@pytest.fixture(scope="session")
def overflowing_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen2 whose activations overflow float16 (every weight finite in float16), and a damaged
    copy whose logits are NaN in every dtype."""
    import tiny_models as builders

    root = tmp_path_factory.mktemp("overflowing")
    return {"overflowing": builders.build_overflowing_qwen2(root / "overflowing", tiny_models["qwen2"]),
            "damaged": builders.build_overflowing_qwen2(root / "damaged", tiny_models["qwen2"], poison=True)}


# --- the fast loop: tests that start a child process are marked `subprocess` ------------------
# (python -m pytest -q tests -m "not subprocess" runs the rest, in one process, in under two minutes)

SPAWNING = {"run_tool", "Popen", "subprocess"}   # a test that uses one of these (or a helper or fixture that does)


def _names(code) -> set[str]:
    """The global names a function's code uses, its nested functions' and lambdas' included."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            names |= _names(constant)
    return names


def _spawns(function, namespace: dict, seen: set) -> bool:
    """Whether `function` starts a child process, itself or through a function of its module."""
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _names(code)
    called = [namespace[name] for name in names if callable(namespace.get(name))]
    return bool(names & SPAWNING) or any(_spawns(f, getattr(f, "__globals__", {}), seen) for f in called)


def pytest_configure(config):
    config.addinivalue_line("markers", "subprocess: runs the real script (or a server) in a child process")


def pytest_collection_modifyitems(items):
    for item in items:
        seen: set = set()
        functions = [item.function] + [definitions[-1].func for definitions in
                                        item._fixtureinfo.name2fixturedefs.values()]
        if any(_spawns(function, getattr(function, "__globals__", {}), seen) for function in functions):
            item.add_marker(pytest.mark.subprocess)
