"""Sections 15 and 16: the self-test, and run()/main() as a user meets them: usage errors answer at once
(no torch imported), --debug shows the traceback, and Ctrl-C, SIGTERM and a closed stdout end a run
cleanly with their exit codes, keeping the answer so far."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPT, default_signals, offline_env, run_tool


def heavy_modules_after(*args: str) -> str:
    """Run main(ARGS) in a fresh interpreter; which heavy modules did it import?"""
    code = ("import sys, run_multimodal\n"
            "try:\n    run_multimodal.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                            env=offline_env())
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [
    ["--help"],
    ["--prompt", "hi", "--max_new_tokens", "0"],
    ["--prompt", "hi", "--device", "tpu"],
    ["--prompt", ""],
    ["--prompt", "hi", "--image_path", "missing.jpg"],
    ["--prompt", "hi", "--model_id", "./no/such/folder"],
])
def test_help_and_usage_errors_do_not_import_torch(args):
    assert heavy_modules_after(*args) == "[]"


def test_debug_shows_the_traceback():
    result = run_tool("--prompt", "hi", "--image_path", "missing.jpg", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_self_test_runs_offline():
    result = run_tool("--self_test")
    assert result.returncode == 0, result.stderr
    assert "✅ Self-test passed" in result.stderr
    assert "8 new tokens" in result.stderr
    assert "Its answer on stdout comes from random weights: gibberish is what a working installation prints" \
        in result.stderr
    assert result.stdout.strip()


# --- interrupts ------------------------------------------------------------------------

def start(*args, folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=offline_env(), cwd=folder,
                            preexec_fn=default_signals)


LONG = ("--prompt", "Tell me a long story", "--max_new_tokens", "3500", "--temperature", "0", "--device", "cpu")


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("signum, code, says", [(signal.SIGINT, 130, "⏹️ Interrupted"),
                                                (signal.SIGTERM, 143, "⏹️ Terminated")], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "no_stream"])
def test_a_signal_keeps_what_was_generated(tiny_models, tmp_path, signum, code, says, stream):
    child = start("--model_id", tiny_models["qwen2"], *LONG, *([] if stream else ["--no_stream"]), folder=tmp_path)
    if stream:
        first = child.stdout.read(1)   # the answer has started
        assert first
        time.sleep(0.3)
    else:
        while "Fast decoding" not in child.stderr.readline().decode():   # loaded; the answer is under way
            pass
        time.sleep(0.5)
        first = b""
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    stdout, stderr = first + stdout, stderr.decode()
    assert child.returncode == code, stderr
    assert stderr.rstrip().endswith(says) and "Traceback" not in stderr and "Error" not in stderr
    assert len(stdout.decode(errors="replace").strip()) > 5 and stdout.endswith(b"\n")   # the partial answer
    assert "📈" not in stderr   # no finished-answer line


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_signal_during_a_spoken_reply_leaves_no_file(tiny_models, tmp_path):
    child = start("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Say something long", "--output_audio",
                  "reply.wav", "--max_new_tokens", "3000", "--temperature", "0", "--device", "cpu", folder=tmp_path)
    assert child.stdout.read(1)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr.decode()
    assert list(tmp_path.iterdir()) == []   # neither reply.wav nor a temporary part of it


def test_a_closed_pipe_ends_quietly(tiny_models, tmp_path):
    """`python run_multimodal.py ... | head -c 10`: the reader goes away; the tool stops, says nothing."""
    child = start("--model_id", tiny_models["qwen2"], *LONG, folder=tmp_path)
    assert len(child.stdout.read(10)) == 10
    child.stdout.close()
    _, stderr = child.communicate(timeout=120)
    stderr = stderr.decode()
    assert child.returncode == 141, stderr
    assert "Traceback" not in stderr and "Error" not in stderr and "Exception ignored" not in stderr
    assert "📈" not in stderr   # it stopped instead of generating the rest into nowhere


def test_a_closed_or_non_utf8_stdin_is_one_line(tiny_models):
    """`--prompt -` with stdin closed (`<&-`) or holding bytes that are not UTF-8 text; and no --prompt with
    stdin closed (no terminal to chat at)."""
    from conftest import assert_one_line_error

    def closed_stdin():
        os.close(0)
    args = [sys.executable, str(SCRIPT), "--model_id", str(tiny_models["qwen2"])]
    closed = subprocess.run([*args, "--prompt", "-"], capture_output=True, text=True, env=offline_env(),
                            preexec_fn=closed_stdin, timeout=120)
    assert_one_line_error(closed, 2, "Error: --prompt -: stdin is closed; pipe the prompt in, or give it as --prompt "
                                     "TEXT", alone=True)
    binary = subprocess.run([*args, "--prompt", "-"], input=b"\xff\xfe\x00 hello", capture_output=True,
                            env=offline_env(), timeout=120)
    assert binary.returncode == 2 and binary.stdout == b""
    assert binary.stderr.decode().strip() == "Error: --prompt -: stdin is not UTF-8 text (invalid start byte at byte " \
                                             "0); convert it first (iconv)"
    nothing = subprocess.run(args, capture_output=True, text=True, env=offline_env(), preexec_fn=closed_stdin,
                             timeout=120)
    assert_one_line_error(nothing, 2, "Error: --prompt is required", alone=True)
