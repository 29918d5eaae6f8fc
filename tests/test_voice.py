"""--voice: a spoken conversation. The machines that run these tests have no microphone and no speakers, so
tests/fake_sound/sounddevice.py stands in for the hardware: it plays real recordings (questions spoken by
espeak-ng, in sample_data/) into the same callback a microphone stream calls, in real-time blocks with silence
around them, and logs what the tool hands the speakers. The voice detector (Silero VAD) and the tiny Omni run
as they do with real devices."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import run_multimodal as rm
from conftest import ROOT, SAMPLES, SCRIPT, assert_one_line_error, offline_env, run_tool

FAKE_SOUND = ROOT / "tests" / "fake_sound"
QUESTION, MORE = SAMPLES / "spoken_question.wav", SAMPLES / "spoken_more.wav"
REPLY = ("--seed", "3", "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu", "--dtype", "float32")
WINDOW_S = rm.VOICE_WINDOW / rm.AUDIO_SAMPLE_RATE


def speech_span(path) -> tuple[float, float]:
    """Where a recording's voice is (seconds): its samples above 2% of its peak, read without the detector."""
    import soundfile
    samples, rate = soundfile.read(path, dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.02 * np.abs(samples).max())
    return loud[0] / rate, loud[-1] / rate


def talk(model, mic: str, *flags, log=None, **env) -> subprocess.CompletedProcess:
    """python run_multimodal.py --voice, the simulated microphone hearing `mic` (FAKE_MIC's form); stdin stays open
    (its end would end the conversation), so the conversation ends when the microphone's stream does."""
    keys, held = os.pipe()
    try:
        return subprocess.run([sys.executable, str(SCRIPT), "--model_id", str(model), "--voice", *map(str, flags)],
                              stdin=keys, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=offline_env(PYTHONPATH=str(FAKE_SOUND), FAKE_MIC=mic, FAKE_LOG=str(log or ""),
                                              **env))
    finally:
        os.close(keys)
        os.close(held)


def turns_of(stderr: str) -> list[tuple[float, float, float]]:
    """Each turn's (start, end, how long the detector took to be sure) from its 🗣️ line."""
    import re
    return [(float(a), float(b), float(c)) for a, b, c in re.findall(
        r"You spoke (\d+\.\d+)-(\d+\.\d+) s; the detector was sure (\d+\.\d+) s later", stderr)]


def test_two_utterances_are_two_turns_found_where_they_were_spoken(tiny_models, tmp_path):
    """Two questions 4.5 s apart, from a 48 kHz microphone (a Mac's): two turns, each starting where its voice
    starts (within the detector's window and padding) and ending where it ends (within the detector's hangover),
    each told 0.5 s (--end_silence_ms' default) after its end; a reply printed and spoken for each, its samples
    reaching the speakers after the turn was heard."""
    log = tmp_path / "sound.log"
    result = talk(tiny_models["qwen2_5_omni"], f"{QUESTION}@0.5,{MORE}@5.0", "--max_speech_seconds", "1", *REPLY,
                  log=log, FAKE_MIC_RATE="48000")
    assert result.returncode == 0, result.stderr
    turns = turns_of(result.stderr)
    assert len(turns) == 2 and len([line for line in result.stdout.splitlines() if line.strip()]) == 2, result.stderr
    for (start, end, told), (path, at) in zip(turns, [(QUESTION, 0.5), (MORE, 5.0)]):
        first, last = speech_span(path)
        assert abs(start - (at + first)) <= WINDOW_S + rm.VOICE_PAD_MS / 1000, (start, at + first)
        assert 0 <= end - (at + last) <= 0.2, (end, at + last)
        assert abs(told - rm.DEFAULT_END_SILENCE_MS / 1000) <= WINDOW_S
    assert result.stderr.count("🔊 Played 1.0 s of speech") == 2 and "\r" not in result.stderr   # no status line
    lines = [line.split() for line in log.read_text().splitlines()]
    mic = [(float(wall), float(at)) for kind, wall, at in lines if kind == "mic"]
    sound = [float(wall) for kind, wall, peak in lines if kind == "out" and float(peak) > 0]
    for (start, end, told), next_start in zip(turns, [turns[1][0], None]):
        heard_at = next(wall for wall, at in mic if at >= end + told - 1e-6)
        played = [wall for wall in sound if wall > heard_at and (next_start is None or wall < heard_at + 3)]
        assert len(played) >= 0.8 / 0.02, len(played)   # most of the second of speech, in 20 ms blocks


def test_speaking_over_the_reply_stops_it_and_the_history_keeps_what_was_heard(tiny_models, tmp_path, monkeypatch,
                                                                              capsys):
    """--barge_in: a second question 2 s into a 4-second reply. The sound stops within 0.2 s of the voice's onset
    as the detector saw it (the simulated speakers' log, against the microphone's); the second question is a
    turn of its own and is answered; the history holds both questions (the recordings heard) and the first reply
    as far as it was heard, the second whole."""
    log = tmp_path / "sound.log"
    for name, value in dict(FAKE_MIC=f"{QUESTION}@0.5,{MORE}@4.5", FAKE_LOG=str(log), HF_HUB_OFFLINE="1").items():
        monkeypatch.setenv(name, value)
    import importlib.util
    spec = importlib.util.spec_from_file_location("sounddevice", FAKE_SOUND / "sounddevice.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)   # the hardware, for this test alone
    conversations, voice_loop = [], rm.voice_loop

    def keep(conversation, media, run_turn):   # a spy: the conversation, to read its history afterwards
        conversations.append(conversation)
        return voice_loop(conversation, media, run_turn)
    monkeypatch.setattr(rm, "voice_loop", keep)
    code = rm.main(["--model_id", str(tiny_models["qwen2_5_omni"]), "--voice", "--barge_in", "--max_speech_seconds",
                    "4", *REPLY])
    out, err = capsys.readouterr()
    assert code == 0, err
    import re
    barged = re.search(r"your voice at (\d+\.\d+) s \(detected at (\d+\.\d+) s\) stopped the reply", err)
    assert barged and len(turns_of(err)) == 2, err
    lines = [line.split() for line in log.read_text().splitlines()]
    detected = next(float(wall) for kind, wall, at in lines if kind == "mic" and float(at) >= float(barged[2]) - 1e-6)
    sound = [float(wall) for kind, wall, peak in lines if kind == "out" and float(peak) > 0]
    assert any(detected - 0.3 < wall < detected for wall in sound)              # it was speaking
    assert not any(detected + 0.2 < wall < detected + 1.0 for wall in sound)   # and then it was not
    record, messages = conversations[0].record, conversations[0].messages
    assert [entry["role"] for entry in record] == ["user", "assistant", "user", "assistant"]
    replies = [line for line in out.splitlines() if line.strip()]
    assert len(replies) == 2 and record[3]["text"] == replies[1].strip()
    assert record[1]["text"] and replies[0].startswith(record[1]["text"]) and len(record[1]["text"]) < len(replies[0])
    heard = [item["audio"] for message in messages if message["role"] == "user" for item in message["content"]]
    assert [round(len(samples) / rm.AUDIO_SAMPLE_RATE, 1) for samples in heard] == \
        [round(end - start, 1) for start, end, _ in turns_of(err)]


def test_qwen3_omni_talks_too(tiny_models, tmp_path):
    """The speaking Qwen3-Omni: two questions, two turns, each reply printed and played (the second turn from the
    conversation's cache)."""
    log = tmp_path / "sound.log"
    result = talk(tiny_models["qwen3_omni_speaking"], f"{QUESTION}@0.5,{MORE}@5.0", "--max_speech_seconds", "1",
                  *REPLY, log=log)
    assert result.returncode == 0, result.stderr
    assert len(turns_of(result.stderr)) == 2 and len([line for line in result.stdout.splitlines() if line.strip()]) == 2
    import re
    played = [float(seconds) for seconds in re.findall(r"🔊 Played (\d+\.\d) s of speech", result.stderr)]
    assert len(played) == 2 and min(played) >= 0.8 and "hears but does not speak" not in result.stderr
    sound = [float(peak) for kind, wall, peak in (line.split() for line in log.read_text().splitlines())
             if kind == "out"]
    assert sum(peak > 0 for peak in sound) >= 2 * 0.7 / 0.02   # most of each reply, in 20 ms blocks


def test_a_model_that_hears_but_cannot_speak_answers_in_text(tiny_models):
    """Qwen3-Omni without its talker: said once before loading, each turn answered in text."""
    result = talk(tiny_models["qwen3_omni"], f"{QUESTION}@0.3", *REPLY)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("hears but does not speak here: its replies come in text") == 1
    assert len(turns_of(result.stderr)) == 1 and "first words" in result.stderr and result.stdout.strip()
    assert "Played" not in result.stderr


def test_a_model_that_cannot_hear_is_refused_before_loading(tiny_models):
    result = talk(tiny_models["qwen2_5_vl"], f"{QUESTION}@0.3")
    assert_one_line_error(result, 2, "--voice", "cannot hear you", "Omni")
    assert "Loading" not in result.stderr


@pytest.mark.parametrize("missing, fragment", [
    ("sounddevice", "needs the sounddevice package"), ("portaudio", "PortAudio"), ("input", "no microphone"),
    ("output", "no audio output device"), ("silero_vad", "needs the silero-vad package")])
def test_a_missing_part_is_one_line_before_loading(tiny_models, tmp_path, missing, fragment):
    """No sounddevice, no PortAudio under it, no microphone, no speakers, no voice detector: one line naming
    --voice, before the model loads."""
    path, env = str(FAKE_SOUND), {}
    if missing in ("sounddevice", "portaudio", "silero_vad"):
        (tmp_path / f"{'sounddevice' if missing == 'portaudio' else missing}.py").write_text(
            "raise OSError('PortAudio library not found')\n" if missing == "portaudio" else
            f"raise ImportError('no {missing} here')\n")
        path = f"{tmp_path}{os.pathsep}{path}"
    else:
        env = {f"FAKE_NO_{missing.upper()}": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--model_id", str(tiny_models["qwen2_5_omni"]), "--voice"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=300,
                            env=offline_env(PYTHONPATH=path, **env))
    assert_one_line_error(result, 1, "--voice", fragment)
    assert "Loading" not in result.stderr


@pytest.mark.parametrize("flags, fragment", [
    (("--server", "http://localhost:8000/v1"), "--server with --voice"), (("--json",), "--json with --voice"),
    (("--output_audio", "reply.wav"), "--output_audio with --voice"), (("--interactive",), "--interactive with --voice"),
    (("--prompt", "Hi"), "--prompt with --voice"), (("--barge_in",), "--barge_in is about a spoken conversation"),
    (("--end_silence_ms", "700"), "--end_silence_ms is about a spoken conversation")])
def test_flags_that_contradict_a_spoken_conversation_are_refused(tiny_models, tmp_path, flags, fragment):
    voice = () if flags[0] in ("--barge_in", "--end_silence_ms") else ("--voice",)
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], *voice, *flags, cwd=tmp_path,
                      env=offline_env(PYTHONPATH=str(FAKE_SOUND)))
    assert_one_line_error(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
def test_at_a_terminal_a_status_line_says_what_it_is_doing_and_ctrl_d_leaves(tiny_models):
    """stdin and stderr a terminal: the status line, redrawn in place, says listening, hearing you and thinking;
    Ctrl-D leaves once the turn is answered."""
    import pty
    import select
    import time

    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, str(SCRIPT), "--model_id", str(tiny_models["qwen2_5_omni"]), "--voice",
                              "--max_speech_seconds", "0.5", *REPLY], stdin=terminal, stderr=terminal,
                             stdout=subprocess.PIPE, cwd=ROOT,
                             env=offline_env(PYTHONPATH=str(FAKE_SOUND), FAKE_MIC=f"{QUESTION}@0.5",
                                             FAKE_MIC_SECONDS="60"))
    os.close(terminal)
    seen, sent, deadline = b"", False, time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if select.select([controller], [], [], 0.2)[0]:
            try:
                seen += os.read(controller, 65536)
            except OSError:   # the child has gone
                break
        if "🗣️ You spoke".encode() in seen and not sent:
            os.write(controller, b"\x04")   # Ctrl-D
            sent = True
    child.wait(timeout=60)
    os.close(controller)
    text = seen.decode("utf-8", "replace")
    assert child.returncode == 0, text
    for state in ("listening", "hearing you", "thinking"):
        assert f"\r🎙️ {state}" in text, state
    assert "👋 Bye" in text and child.stdout.read().strip()
