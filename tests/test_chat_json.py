"""A conversation (--interactive, scripted through a pipe) and machine-readable output (--json),
run as a user runs them, on the tiny checkpoints; answers checked against plain transformers."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import time

import pytest

from conftest import SAMPLE_IMAGE, SCRIPT, SECOND_IMAGE, default_signals, fake_hub_cache, offline_env, run_tool
from test_end_to_end import GREEDY

CHAT = ("--interactive", *GREEDY)


def reference_chat(model_dir, turns: list[tuple[str, list]]) -> list[str]:
    """Plain transformers, turn after turn, each answer added to the history: greedy, float32, CPU."""
    import torch
    from PIL import Image
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages, answers = [], []
    for text, images in turns:
        content = [{"type": "image", "image": Image.open(path).convert("RGB")} for path in images]
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        answers.append(answer)
    return answers


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


def test_mistakes_in_a_chat_are_error_lines_and_the_chat_goes_on(tiny_models, tmp_path):
    model = tiny_models["qwen2_5_vl"]
    expected = reference_chat(model, [("Hello cat", [])])
    script = (f"/bogus\n/image {tmp_path}/missing.jpg\n/audio {SAMPLE_IMAGE}\n/save {tmp_path}/no/such/folder.json\n"
              "/stats\n/help\nHello cat\n")
    result = run_tool("--model_id", model, *CHAT, stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: /bogus: unknown command; /help lists them",
        f"Error: /image {tmp_path}/missing.jpg: file not found; check the path",
        f"Error: /audio: {model} cannot take audio",
        f"Error: /save {tmp_path}/no/such/folder.json: give a file in a folder that exists",
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


def test_json_is_the_only_thing_on_stdout_and_has_every_field(tiny_models):
    model = tiny_models["qwen2_5_vl"]
    expected = reference_chat(model, [("Describe it", [SAMPLE_IMAGE])])[0]
    result = run_tool("--model_id", model, "--prompt", "Describe it", "--image_path", SAMPLE_IMAGE, "--json",
                      "--seed", "11", *GREEDY)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)   # nothing but the object
    assert record["text"] == expected and record["audio_path"] is None
    plan = record["plan"]
    assert (plan["device"], plan["dtype"], plan["fits"], plan["media_tokens"]) == ("cpu", "float32", True, 178)
    assert plan["components"]["model"]["parameters"] == 183_520
    stats = record["stats"]
    assert set(stats) >= {"load_s", "prompt_tokens", "new_tokens", "ttft_s", "decode_tokens_per_s",
                          "peak_memory_bytes", "device"}
    assert (stats["new_tokens"], stats["device"]) == (12, "cpu")
    assert stats["prompt_tokens"] == 220 and stats["ttft_s"] > 0 and stats["decode_tokens_per_s"] > 0
    assert stats["peak_memory_bytes"] > 0
    repro = record["reproducibility"]
    import accelerate
    import torch
    import transformers
    assert repro == {
        "model_id": str(model), "revision": None, "path": str(model), "dtype": "float32",
        "device_map": {"": "cpu"}, "seed": 11, "sampling": {"max_new_tokens": 12, "do_sample": False},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__}}
    assert "📈 cpu:" in result.stderr   # the people's lines still go to stderr


def test_json_records_the_hub_revision(tiny_models, tmp_path):
    cache, snapshot = fake_hub_cache(tmp_path, tiny_models["qwen2"])
    result = run_tool("--model_id", "tiny/qwen2", "--prompt", "Hello cat", "--json", *GREEDY,
                      env=offline_env(HF_HUB_CACHE=str(cache)))
    assert result.returncode == 0, result.stderr
    repro = json.loads(result.stdout)["reproducibility"]
    assert (repro["model_id"], repro["revision"], repro["path"]) == ("tiny/qwen2", "0123456789abcdef", str(snapshot))


def test_verbose_prints_the_stages(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--verbose", *GREEDY)
    assert result.returncode == 0, result.stderr
    stages = [line for line in result.stderr.splitlines() if line.startswith("⏱️")]
    assert len(stages) == 1 and "encoding and prefill" in stages[0] and "decode" in stages[0] \
        and "(11 tokens, the first of them after " in stages[0]


@pytest.mark.parametrize("flag", ["--json", "--dry_run"])
def test_interactive_refuses_one_shot_flags(tiny_models, flag):
    result = run_tool("--model_id", tiny_models["qwen2"], "--interactive", flag)
    assert result.returncode == 2
    assert result.stderr == f"Error: {flag} works with one --prompt, not with --interactive\n"


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
