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
    record = json.loads(saved.read_text())
    for message in record["messages"]:   # each answer's figures: checked in test_a_chat_says_what_it_reused...
        assert message.pop("prompt_tokens", 0) >= 0 and message.pop("reused_tokens", 0) >= 0
    assert record == {"model_id": str(model), "messages": [
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



# --- what a chat keeps between its turns ---------------------------------------------------

import run_multimodal as rm  # noqa: E402

TURNS = {   # four turns each; a picture or a recording in the first, another in the third
    "qwen2": [("Hello cat", []), ("Tell me more", []), ("Why?", []), ("And then?", [])],
    "qwen2_5_vl": [("What is in this picture?", ["image"]), ("Tell me more", []),
                   ("And in this one?", ["image2"]), ("Which do you like?", [])],
    "qwen2_5_omni": [("What did you hear?", ["audio"]), ("Tell me more", []), ("And this?", ["image"]),
                     ("Thanks", [])],
}


def converse(model_name: str, tiny_models, reuse: bool, runtime_device: str = "cpu") -> tuple[list, list, list]:
    """The tiny model answering TURNS in-process, greedily in float32 on the CPU, with or without the cache kept
    between turns: (answers, each turn's first logits, each turn's reused token count)."""
    import torch

    from conftest import WAV16

    info = rm.resolve_model(str(tiny_models[model_name]))
    plan = rm.Plan("cpu", "float32", None, "", (), components=("thinker",) if info.kind == "omni" else ())
    model, processor = rm.load_model(info, plan, rm.simulated_hardware("cpu:8"))
    sampling = rm.Sampling(10, temperature=0)
    loaded = rm.Loaded(model, processor, plan, 0.0, {}, rm.choose_runtime(model, runtime_device,
                                                                          rm.Options(sampling=sampling)))
    files = {"image": lambda: rm.load_image(str(SAMPLE_IMAGE)), "image2": lambda: rm.load_image(str(SECOND_IMAGE)),
             "audio": lambda: rm.load_audio(str(WAV16))}
    chat, messages, answers, logits, reused = rm.ChatCache() if reuse else None, [], [], [], []
    first = rm.prefill

    def spy(*args, **kwargs):
        out, delta = first(*args, **kwargs)
        logits.append(out.logits[0, -1].float().clone())
        return out, delta
    rm.prefill = spy
    try:
        for text, attached in TURNS[model_name]:
            turn = rm.Media(images=[files[n]() for n in attached if n.startswith("image")],
                            audios=[files[n]() for n in attached if n == "audio"])
            messages.append(rm.build_messages(text, None, turn, info.kind)[-1])
            media = rm.media_of(messages, False)
            inputs = rm.prepare_inputs(processor, messages, model.device, media, chat.pictures if chat else None)
            with torch.inference_mode():
                answer = rm.generate_answer(loaded, inputs, sampling, rm.SHOW_NONE, chat=chat)
            answers.append(answer.text)
            reused.append(chat.reused if chat else 0)
            messages.append({"role": "assistant", "content": answer.text if info.kind == "text"
                             else [{"type": "text", "text": answer.text}]})
    finally:
        rm.prefill = first
    return answers, logits, reused


@pytest.mark.parametrize("model_name", list(TURNS))
def test_every_turn_from_the_cache_is_what_a_fresh_prefill_of_the_history_gives(tiny_models, model_name):
    """Four turns, a picture or a recording in the first and another in the third: the tokens equal those of
    a prefill of the whole history at every turn, the first logits within float32 rounding; from the second
    turn on most of the prompt comes from the cache."""
    fresh, fresh_logits, _ = converse(model_name, tiny_models, reuse=False)
    kept, kept_logits, reused = converse(model_name, tiny_models, reuse=True)
    assert kept == fresh and all(answer.strip() for answer in fresh)
    for a, b in zip(kept_logits, fresh_logits):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    assert reused[0] == 0 and all(count > 20 for count in reused[1:]), reused


def test_an_interrupted_answer_stays_in_the_cache_as_in_the_history(tiny_models):
    """Ctrl-C after three tokens (raised where the answer's tokens are handed on, as the signal would): the cache
    holds the prompt and the tokens whose keys it computed, each layer alike; the next turn goes on from it and
    answers as a fresh prefill of that history would."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    info = rm.resolve_model(str(tiny_models["qwen2"]))
    plan = rm.Plan("cpu", "float32", None, "", ())
    model, tokenizer = rm.load_model(info, plan, rm.simulated_hardware("cpu:8"))
    sampling = rm.Sampling(10, temperature=0)
    runtime = rm.choose_runtime(model, "cpu", rm.Options(sampling=sampling))

    class CtrlC(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            if len(self.tokens) == 3:
                raise KeyboardInterrupt
            self.tokens += value.reshape(-1).tolist() if self.tokens or value.numel() == 1 else []

        def end(self):
            pass
    chat, messages = rm.ChatCache(), [{"role": "user", "content": "Hello cat"}]
    inputs = rm.prepare_inputs(tokenizer, messages, "cpu")
    streamer = CtrlC()
    with torch.inference_mode(), pytest.raises(KeyboardInterrupt):
        rm.fast_generate(runtime, model, inputs, sampling, streamer, {}, chat)
    prompt = inputs["input_ids"][0].tolist()
    assert chat.ids == prompt + streamer.tokens   # the three shown: the step of each of them ran
    assert {keys.shape[-2] for keys, _ in rm._cache_layers(chat.cache, len(chat.cache))} == {len(chat.ids)}
    messages += [{"role": "assistant", "content": tokenizer.decode(streamer.tokens, skip_special_tokens=True)},
                 {"role": "user", "content": "Go on"}]
    loaded = rm.Loaded(model, tokenizer, plan, 0.0, {}, runtime)
    inputs = rm.prepare_inputs(tokenizer, messages, "cpu")
    with torch.inference_mode():
        kept = rm.generate_answer(loaded, inputs, sampling, rm.SHOW_NONE, chat=chat).text
        fresh = rm.generate_answer(loaded, inputs, sampling, rm.SHOW_NONE).text
    assert kept == fresh and chat.reused >= len(prompt)


def test_the_generate_path_keeps_the_cache_too(tiny_models):
    """--no_fast_decode: transformers' generate() continues from the chat's cache where the new tokens are text,
    and the answers are a fresh prefill's."""
    fresh, _, _ = converse("qwen2_5_vl", tiny_models, reuse=False)
    first = rm.choose_runtime

    def generate_runtime(model, device, options):
        return first(model, device, rm.dataclasses.replace(options, fast_decode=False))
    rm.choose_runtime = generate_runtime
    try:
        kept, _, reused = converse("qwen2_5_vl", tiny_models, reuse=True)
    finally:
        rm.choose_runtime = first
    assert kept == fresh and reused[1] > 20 and reused[3] > 20


def test_a_chat_says_what_it_reused_and_saves_it(tiny_models, tmp_path):
    """The stats line (/stats) and --verbose say each turn's reused tokens; /save records them; --no_kv_reuse
    computes everything again and answers the same; after /clear a question without a picture is answered
    as in a new chat (the picture's positions are not carried over)."""
    model = tiny_models["qwen2_5_vl"]
    saved = tmp_path / "chat.json"
    script = f"/image {SAMPLE_IMAGE}\nDescribe it\nTell me more\n/stats\n/save {{}}\n/clear\nHello cat\n"
    kept = run_tool("--model_id", model, *CHAT, "--verbose", stdin=script.format(saved))
    fresh = run_tool("--model_id", model, *CHAT, "--no_kv_reuse", stdin=script.format(tmp_path / "again.json"))
    assert kept.returncode == fresh.returncode == 0, kept.stderr + fresh.stderr
    expected = reference_chat(model, [("Describe it", [SAMPLE_IMAGE]), ("Tell me more", [])])
    assert kept.stdout == fresh.stdout == "\n".join(expected + reference_chat(model, [("Hello cat", [])])) + "\n"
    record = json.loads(saved.read_text())["messages"]
    assert record[1]["reused_tokens"] == 0 and record[3]["reused_tokens"] > 20
    assert f"({record[3]['reused_tokens']} reused, " in kept.stderr and "reused" not in fresh.stderr


def test_a_spoken_chat_keeps_the_thinkers_cache_and_speaks_each_turn(tiny_models, tmp_path):
    """The tiny Omni in a chat with --output_audio: a WAV a turn (reply-1.wav, reply-2.wav), the second turn
    reading its first from the cache; the same words and the same speech as computing the whole conversation
    at every turn (seeded)."""
    import soundfile

    def spoken(folder, *flags):
        folder.mkdir()
        return run_tool("--model_id", tiny_models["qwen2_5_omni"], "--interactive", "--output_audio",
                        folder / "reply.wav", "--max_speech_seconds", "0.4", "--seed", "3", *flags, *GREEDY,
                        stdin="Say something\nSay more\n/stats\n")
    kept, fresh = spoken(tmp_path / "kept"), spoken(tmp_path / "fresh", "--no_kv_reuse")
    assert kept.returncode == fresh.returncode == 0, kept.stderr + fresh.stderr
    assert kept.stdout == fresh.stdout and len(kept.stdout.splitlines()) == 2
    for turn in (1, 2):
        ours, theirs = (soundfile.read(tmp_path / side / f"reply-{turn}.wav")[0] for side in ("kept", "fresh"))
        assert len(ours) > 0 and (ours == theirs).all()
    import re
    assert re.search(r"prompt \d+ tokens \([1-9]\d* reused, \d+ computed\)", kept.stderr) and "reused" not in fresh.stderr


def test_what_the_processor_made_of_each_picture_and_recording_is_remembered_exactly(tiny_models):
    """A chat's memo: the second time, each picture and recording comes from it (the processor's own image
    processor and feature extractor are not called), and the inputs are the same tensors a fresh call makes."""
    import torch
    from transformers import AutoProcessor

    from conftest import WAV16

    processor = AutoProcessor.from_pretrained(tiny_models["qwen2_5_omni"])
    long, picture = rm.load_audio(str(WAV16)), rm.load_image(str(SAMPLE_IMAGE))
    messages = rm.build_messages("", None, rm.Media(audios=[long], images=[picture]), "omni")
    messages += [{"role": "assistant", "content": [{"type": "text", "text": "A cat"}]},
                 rm.build_messages("And this?", None, rm.Media(audios=[long[:20000].copy()]), "omni")[-1]]
    media, memo = rm.media_of(messages, False), {}
    fresh = rm.prepare_inputs(processor, messages, "cpu", media)
    rm.prepare_inputs(processor, messages, "cpu", media, memo)
    owners = {name: type(getattr(processor, name)) for name in ("image_processor", "feature_extractor")}
    originals, counted = {name: owner.__call__ for name, owner in owners.items()}, dict.fromkeys(owners, 0)

    def counting(name):   # a spy: the processor's own parts still run, counted
        def call(self, *args, **kwargs):
            counted[name] += 1
            return originals[name](self, *args, **kwargs)
        return call
    for name, owner in owners.items():
        owner.__call__ = counting(name)
    try:
        kept = rm.prepare_inputs(processor, messages, "cpu", media, memo)
        rm.prepare_inputs(processor, messages, "cpu", media)
    finally:
        for name, owner in owners.items():
            owner.__call__ = originals[name]
    assert counted == {"image_processor": 1, "feature_extractor": 1}   # the call without the memo alone
    assert sorted(kept.keys()) == sorted(fresh.keys()) and len(fresh["input_features"]) == 2
    assert all(torch.equal(kept[key], fresh[key]) for key in fresh.keys())
