"""Fixtures: tiny random-weight checkpoints built once per session, and a way to run the
real script as a user does (a subprocess, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_multimodal.py"
SAMPLE_IMAGE = ROOT / "sample_data" / "sample_image.jpg"
SECOND_IMAGE = ROOT / "sample_data" / "coffee.jpg"
CONFIGS = Path(__file__).resolve().parent / "configs"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a user with no network: the Hub is never asked."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def default_signals() -> None:
    """For a child process (preexec_fn): Ctrl-C as a terminal gives it. A shell starts background
    jobs with SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt; a CI job
    may run as one."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tool(*args: str, env: dict | None = None, stdin: str | None = None,
             script: Path = SCRIPT, timeout: float = 600) -> subprocess.CompletedProcess:
    """python run_multimodal.py ARGS, as a user types it."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=env or offline_env(), input=stdin, timeout=timeout, cwd=ROOT)


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
    """qwen2 (text), qwen2_5_vl and qwen2_5_omni (full: thinker, talker, token2wav, voices)."""
    import tiny_models as builders

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build(root / name) for name, build in builders.BUILDERS.items()}


REAL_CONFIGS = ["Qwen--Qwen2.5-0.5B-Instruct", "Qwen--Qwen2.5-1.5B-Instruct", "Qwen--Qwen2.5-3B-Instruct",
                "Qwen--Qwen2.5-VL-3B-Instruct", "Qwen--Qwen2.5-Omni-3B"]


@pytest.fixture(scope="session")
def real_facts() -> dict:
    """ModelFacts of every real published config in tests/configs, counted on the meta device."""
    import json

    import run_multimodal as rm

    rm._quiet_libraries(debug=False)
    found = {}
    for name in REAL_CONFIGS:
        path = CONFIGS / name / "config.json"
        info = rm.model_info_from_config(name, json.loads(path.read_text()))
        found[name] = rm.model_facts(rm.load_config(rm.ModelInfo(str(path.parent), info.model_type, info.kind,
                                                                 info.inputs), False), info, False)
    return found
