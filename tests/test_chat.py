"""Section 14, the chat (--interactive), scripted through a pipe and at a pseudo-terminal; answers
checked against plain transformers turn after turn."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import time

import pytest

from conftest import GREEDY, SAMPLE_IMAGE, SCRIPT, SECOND_IMAGE, default_signals, offline_env, run_tool
from references import reference_chat

CHAT = ("--interactive", *GREEDY)


def test_two_turn_chat_with_an_image_in_the_second_turn(tiny_models, tmp_path):
    model = tiny_models["qwen2_5_vl"]
    expected = reference_chat(model, [("Hello cat", []), ("What is in this picture?", [SECOND_IMAGE])])
    saved = tmp_path / "chat.json"
    script = f"Hello cat\n/image {SECOND_IMAGE}\nWhat is in this picture?\n/save {saved}\n"
    result = run_tool("--model_id", model, *CHAT, stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n" + expected[1] + "\n"
    assert f"📎 {SECOND_IMAGE} will go with your next message" in result.stderr
    assert json.loads(saved.read_text()) == {"model_id": str(model), "messages": [
        {"role": "user", "text": "Hello cat", "attachments": []},
        {"role": "assistant", "text": expected[0], "attachments": []},
        {"role": "user", "text": "What is in this picture?", "attachments": [str(SECOND_IMAGE)]},
        {"role": "assistant", "text": expected[1], "attachments": []},
    ]}
    assert "Traceback" not in result.stderr and result.stderr.rstrip().endswith("👋 Bye")


def test_clear_forgets_the_conversation(tiny_models):
    model = tiny_models["qwen2_5_vl"]
    first = reference_chat(model, [("Hello cat", [])])[0]
    fresh = reference_chat(model, [("Describe it", [SAMPLE_IMAGE])])[0]   # no "Hello cat" before it
    script = f"Hello cat\n/clear\n/image {SAMPLE_IMAGE}\nDescribe it\n"
    result = run_tool("--model_id", model, *CHAT, stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == first + "\n" + fresh + "\n"
    assert "🧹 Cleared: a new conversation" in result.stderr


def test_a_failed_turn_is_forgotten_with_its_media(tiny_models):
    """A question the model cannot read (past its context window) is one Error: line; its picture goes with
    it, so the next question is answered as if it had never been asked."""
    model = tiny_models["qwen2_5_vl"]
    fresh = reference_chat(model, [("Hello cat", [])])[0]
    script = f"/image {SAMPLE_IMAGE}\n{'hello cat ' * 2000}\nHello cat\n"
    result = run_tool("--model_id", model, *CHAT, stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == fresh + "\n"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: --prompt: the prompt is")


def test_mistakes_in_a_chat_are_error_lines_and_the_chat_goes_on(tiny_models, tmp_path):
    model = tiny_models["qwen2_5_vl"]
    expected = reference_chat(model, [("Hello cat", [])])
    script = (f"/bogus\n/image {tmp_path}/missing.jpg\n/audio {SAMPLE_IMAGE}\n/save {tmp_path}/no/such/folder.json\n"
              "/image\n/stats\n/help\nHello cat\n")
    result = run_tool("--model_id", model, *CHAT, stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: /bogus: unknown command; /help lists them",
        f"Error: /image {tmp_path}/missing.jpg: file not found; check the path",
        f"Error: /audio: {model} cannot take audio",
        f"Error: /save {tmp_path}/no/such/folder.json: give a file in a folder that exists",
        "Error: /image needs a file: /image PATH",
    ]
    assert "No answer yet" in result.stderr and "Commands: /image PATH" in result.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(platform.system() == "Windows", reason="SIGINT to a child process")
def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tiny_models):
    """SIGINT during a long answer: the answer stops, the session answers the next line, exit 0."""
    args = [sys.executable, str(SCRIPT), "--model_id", str(tiny_models["qwen2"]), "--interactive", "--temperature",
            "0", "--max_new_tokens", "2500", "--device", "cpu", "--verbose"]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=offline_env(), text=True, bufsize=1, preexec_fn=default_signals)
    child.stdin.write("Tell me a long story\n")
    child.stdin.flush()
    first = child.stdout.read(1)   # the answer has started
    assert first
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    child.stdin.write("Hello cat\n")
    child.stdin.close()
    stdout = child.stdout.read()
    stderr = child.stderr.read()
    child.wait(timeout=120)
    assert child.returncode == 0, stderr
    assert stderr.count("⏹️ Stopped; the answer so far stays in the conversation") == 1
    assert stderr.count("⏱️ load") == 1          # one finished answer: the second
    assert stdout.endswith("\n")   # (the first character was read above)
    assert "Traceback" not in stderr and stderr.rstrip().endswith("👋 Bye")


@pytest.mark.skipif(platform.system() == "Windows", reason="a pseudo-terminal")
def test_no_prompt_at_a_terminal_starts_a_chat(tiny_models):
    """No --prompt and stdin a terminal: a chat with a prompt; Ctrl-D leaves it."""
    import os
    import pty

    expected = reference_chat(tiny_models["qwen2_5_vl"], [("Hello cat", [])])[0]
    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, str(SCRIPT), "--model_id", str(tiny_models["qwen2_5_vl"]), *GREEDY],
                             stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=offline_env(),
                             text=True)
    os.close(terminal)
    os.write(controller, b"Hello cat\n")
    stdout = child.stdout.readline()      # the answer, streamed
    os.write(controller, b"\x04")         # Ctrl-D
    stderr = child.stderr.read()
    child.wait(timeout=60)
    os.close(controller)
    assert child.returncode == 0, stderr
    assert stdout == expected + "\n"
    assert "💬 Chat" in stderr and stderr.count("you> ") == 2 and stderr.rstrip().endswith("👋 Bye")


def test_bytes_that_are_not_text_are_an_error_line_and_the_chat_goes_on(tiny_models):
    """A line of binary bytes in a piped chat: one Error: line, and the next message is answered as the first."""
    model = tiny_models["qwen2_5_vl"]
    fresh = reference_chat(model, [("Hello cat", [])])[0]
    result = subprocess.run([sys.executable, str(SCRIPT), "--model_id", str(model), *CHAT],
                            input=b"\xff\xfe\x00binary\n" + b"Hello cat\n", capture_output=True, env=offline_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == fresh + "\n"
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("Error: ")]
    assert errors == ["Error: that line is not UTF-8 text (invalid start byte at byte 0); convert it first (iconv)"]

