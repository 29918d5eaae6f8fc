"""Section 11, an answer: the real script, run as a user runs it, on tiny random-weight checkpoints
saved to disk. Expected answers come from plain transformers on the same checkpoint, so a test fails if
the tool changes the prompt, the chat template, the media, the decoding or the printing."""

from __future__ import annotations

import numpy as np
import soundfile

import run_multimodal as rm
from conftest import (CLIP, FLAC, GREEDY, GREEDY_ANY_DEVICE, SAMPLE_IMAGE, SECOND_IMAGE, WAV16, WAV44, run_tool,
                      stat)
from references import reference_answer, reference_thinker


def assert_answered(result, expected: str, prompt_tokens: int) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert stat(result.stderr, "tokens ·") == prompt_tokens    # "prompt N tokens ·"
    assert "Traceback" not in result.stderr


def test_text_only_greedy_answer_is_exactly_transformers(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--seed", "0", *GREEDY)
    assert expected.strip()   # a real answer, not only whitespace
    assert_answered(result, expected, prompt_tokens)
    assert "🎯 Greedy decoding (--temperature 0)" in result.stderr
    assert "📈 cpu:" in result.stderr and "12 new tokens" in result.stderr
    assert "media decoded" not in result.stderr   # there was none
    assert "Loading weights" not in result.stderr and "[transformers]" not in result.stderr   # library noise


def test_system_prompt_reaches_the_template(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat",
                                               system_prompt="Answer like a pirate.")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat",
                      "--system_prompt", "Answer like a pirate.", *GREEDY)
    assert_answered(result, expected, prompt_tokens)


def test_prompt_from_stdin(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "-", *GREEDY, stdin="Hello cat\n")
    assert_answered(result, expected, prompt_tokens)


def test_no_stream_prints_the_same_answer_once(tiny_models):
    streamed = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", *GREEDY)
    at_once = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--no_stream", *GREEDY)
    assert at_once.returncode == streamed.returncode == 0
    assert at_once.stdout == streamed.stdout


def test_seeded_sampling_repeats(tiny_models):
    args = ("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--temperature", "1.0",
            "--top_k", "50", "--max_new_tokens", "12", "--dtype", "float32", "--device", "cpu")
    first, second = run_tool(*args, "--seed", "7"), run_tool(*args, "--seed", "7")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "🎲 Sampling: temperature 1.0, top_k 50" in first.stderr


def test_force_cpu(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--force_cpu", *GREEDY_ANY_DEVICE)
    assert_answered(result, expected, prompt_tokens)
    assert "🔧 --force_cpu: using the CPU" in result.stderr


def test_automatic_choice_on_this_machine(tiny_models):
    """No flags: the device and dtype the policy picks for this machine's real hardware."""
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--max_new_tokens", "4")
    assert result.returncode == 0, result.stderr
    info = rm.resolve_model(str(tiny_models["qwen2"]))
    facts = rm.model_facts(rm.load_config(info, False), info, False)
    plan = rm.choose_plan(rm.detect_hardware(), facts, rm.Options())
    assert all(reason in result.stderr for reason in plan.reasons[:2])   # device and dtype; then the fit
    assert plan.fits and "(available RAM): fits" in result.stderr
    assert f"📈 {plan.device}:" in result.stderr
    assert "🧠 " in result.stderr and "99.9 K parameters" in result.stderr


def test_one_image_vl(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Describe this image",
                                               [SAMPLE_IMAGE])
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Describe this image",
                      "--image_path", SAMPLE_IMAGE, *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    assert prompt_tokens > 150   # the 451x300 photo is 176 visual tokens


def test_two_images_vl(tiny_models):
    images = [SAMPLE_IMAGE, SECOND_IMAGE]
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Compare them", images)
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Compare them",
                      "--image_path", images[0], "--image_path", images[1], *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    one = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Compare them", images[:1])[1]
    assert prompt_tokens > one


def test_text_only_question_to_a_vl_model(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "Hello")
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Hello", *GREEDY)
    assert_answered(result, expected, prompt_tokens)


def test_omni_loads_only_the_thinker_and_sees_the_image(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_omni"], "omni", "What is this?",
                                               [SAMPLE_IMAGE])
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "What is this?",
                      "--image_path", SAMPLE_IMAGE, *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    assert "loading the thinker only (243.9 K)" in result.stderr
    assert "1.6 M parameters" in result.stderr   # thinker + talker + token2wav, counted but not loaded


def test_omni_text_only(tiny_models):
    expected, prompt_tokens = reference_answer(tiny_models["qwen2_5_omni"], "omni", "Explain quantum computing")
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Explain quantum computing",
                      *GREEDY)
    assert_answered(result, expected, prompt_tokens)


def test_image_and_audio_in_text_out_is_exactly_transformers(tiny_models):
    model = tiny_models["qwen2_5_omni"]
    expected, prompt_tokens = reference_thinker(model, "Answer the question.", [SAMPLE_IMAGE], [WAV44])
    result = run_tool("--model_id", model, "--prompt", "Answer the question.", "--image_path", SAMPLE_IMAGE,
                      "--audio_path", WAV44, *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    assert prompt_tokens > 178 + 85   # the photo's 176 and the question's 85 tokens, with markers
    assert "media decoded in" in result.stderr and "loading the thinker only" in result.stderr


def test_two_recordings_in_one_prompt(tiny_models):
    model = tiny_models["qwen2_5_omni"]
    expected, prompt_tokens = reference_thinker(model, "Compare them.", [], [WAV16, FLAC])
    result = run_tool("--model_id", model, "--prompt", "Compare them.", "--audio_path", WAV16,
                      "--audio_path", FLAC, *GREEDY)
    assert_answered(result, expected, prompt_tokens)
    one = run_tool("--model_id", model, "--prompt", "Compare them.", "--audio_path", WAV16, *GREEDY)
    assert stat(result.stderr, "tokens ·") - stat(one.stderr, "tokens ·") == rm.audio_tokens(3.4)


def test_video_with_its_sound_track(tiny_models):
    model = tiny_models["qwen2_5_omni"]
    args = ("--model_id", model, "--prompt", "What happens?", "--video_path", CLIP, *GREEDY)
    pictures = run_tool(*args)
    both = run_tool(*args, "--use_audio_in_video")
    assert pictures.returncode == both.returncode == 0, both.stderr
    assert pictures.stdout.strip() and both.stdout.strip()
    track = rm.load_video(str(CLIP), 2.0, True).audio
    # The sound track adds exactly its audio tokens and their two markers, as the plan counts them.
    assert stat(both.stderr, "tokens ·") - stat(pictures.stderr, "tokens ·") == rm.audio_tokens(len(track) / 16000)
    # The plan counted the video's tokens before loading: 3 pairs of frames at 300 x 452.
    text_only = run_tool("--model_id", model, "--prompt", "What happens?", *GREEDY)
    assert rm.video_tokens(rm.VisionFacts(14, 2, 32), 6, 452, 300, rm.DEFAULT_MAX_PIXELS) == \
        stat(pictures.stderr, "tokens ·") - stat(text_only.stderr, "tokens ·")


def test_qwen3_omni_hears_and_sees_with_the_same_flags(tiny_models):
    """A tiny qwen3_omni_moe checkpoint: image + audio in, text out, exactly plain transformers'."""
    import soxr
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

    model_dir = tiny_models["qwen3_omni"]
    processor = AutoProcessor.from_pretrained(model_dir)
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    samples, rate = soundfile.read(FLAC, dtype="float32", always_2d=True)
    sound = soxr.resample(samples.mean(axis=1), rate, 16000).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"},
                                             {"type": "text", "text": "Answer the question."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(SAMPLE_IMAGE).convert("RGB")], audio=[sound],
                       return_tensors="pt")
    output = thinker.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)

    result = run_tool("--model_id", model_dir, "--prompt", "Answer the question.", "--image_path", SAMPLE_IMAGE,
                      "--audio_path", FLAC, *GREEDY)
    assert_answered(result, expected, inputs["input_ids"].shape[-1])
    assert "(qwen3_omni_moe)" in result.stderr


def test_qwen3_omni_video_with_sound_runs(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen3_omni"], "--prompt", "What happens?", "--video_path", CLIP,
                      "--use_audio_in_video", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_spoken_reply_is_a_24k_wav(tiny_models, tmp_path):
    reply = tmp_path / "reply.wav"
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Answer the question.",
                      "--audio_path", WAV16, "--image_path", SAMPLE_IMAGE, "--output_audio", reply,
                      "--max_speech_seconds", "1", "--speaker", "Ethan", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()   # the text answer still comes on stdout
    samples, rate = soundfile.read(reply)
    assert rate == 24000 and samples.ndim == 1 and 0 < len(samples) <= 24000
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0
    assert f"🔊 Wrote {len(samples) / 24000:.1f} s of speech to {reply}" in result.stderr
    assert "real-time factor" in result.stderr
    assert "loading the thinker only" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reply.wav"]   # no temporary file left


def test_verbose_prints_the_stages(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "Hello cat", "--verbose", *GREEDY)
    assert result.returncode == 0, result.stderr
    stages = [line for line in result.stderr.splitlines() if line.startswith("⏱️")]
    assert len(stages) == 1 and "encoding and prefill" in stages[0] and "decode" in stages[0] \
        and "(11 tokens, the first of them after " in stages[0]
