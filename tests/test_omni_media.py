"""Qwen2.5-Omni's other senses: audio and video in, a spoken reply out. The real script on the tiny
full Omni checkpoint (thinker, talker, token2wav, two voices) with the real sample recordings and clip."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile

import run_multimodal as rm
from conftest import ROOT, SAMPLE_IMAGE, run_tool
from test_end_to_end import GREEDY, stat

DATA = ROOT / "sample_data"
WAV16, WAV44, FLAC, CLIP = (DATA / "question_16k_mono.wav", DATA / "question_44k_stereo.wav",
                            DATA / "question.flac", DATA / "cat_clip.mp4")
QUESTION_SECONDS = 3.4


def reference_thinker(model_dir, prompt: str, images=(), audio_files=()) -> tuple[str, int]:
    """(answer, prompt tokens) from plain transformers: the Omni thinker, greedy, float32, on the CPU.
    Audio is read with soundfile, downmixed and resampled with soxr, as Qwen's own loaders do."""
    import soxr
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    pictures = [Image.open(path).convert("RGB") for path in images]
    sounds = []
    for path in audio_files:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        sounds.append(soxr.resample(samples.mean(axis=1), rate, 16000).astype(np.float32))
    content = [{"type": "image"} for _ in pictures] + [{"type": "audio"} for _ in sounds]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=pictures or None, audio=sounds or None, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[-1]
    return processor.tokenizer.decode(output[0, prompt_tokens:], skip_special_tokens=True), prompt_tokens


def one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return result.stderr.strip()


# --- audio decoding ------------------------------------------------------------------

def test_every_sample_recording_becomes_the_same_16k_mono_signal():
    reference = rm.load_audio(str(WAV16))
    assert reference.dtype == np.float32 and reference.ndim == 1
    assert abs(len(reference) / 16000 - QUESTION_SECONDS) < 0.05
    for path in (WAV44, FLAC):   # 44.1 kHz stereo WAV, 44.1 kHz mono FLAC: resampled and downmixed
        other = rm.load_audio(str(path))
        assert abs(len(other) - len(reference)) <= 2, path
        n = min(len(other), len(reference))
        assert np.corrcoef(other[:n], reference[:n])[0, 1] > 0.99, path


def test_mp3_and_ogg_are_read(tmp_path):
    samples = rm.load_audio(str(WAV16))
    for fmt, name in (("MP3", "q.mp3"), ("OGG", "q.ogg")):
        path = tmp_path / name
        try:
            soundfile.write(path, samples, 16000, format=fmt)
        except (soundfile.LibsndfileError, TypeError, ValueError):
            pytest.skip(f"this libsndfile cannot write {fmt}")
        decoded = rm.load_audio(str(path))
        assert abs(len(decoded) - len(samples)) < 0.1 * 16000, fmt


def test_video_frames_and_sound_track():
    video = rm.load_video(str(CLIP), fps=2.0, with_audio=True)
    assert video.frames.shape == (6, 300, 452, 3)   # 3 s at 2 frames a second
    assert video.size == (452, 300)
    assert 2.0 < len(video.audio) / 16000 < 3.2     # "Here is a short clip of a cat."
    pictures = rm.load_video(str(CLIP), fps=1.0, with_audio=False)
    assert pictures.frames.shape[0] == 4 and pictures.audio is None   # 3 frames, padded to a pair


def test_audio_token_estimate_matches_the_processor(tiny_models):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_models["qwen2_5_omni"])
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    for seconds in (QUESTION_SECONDS, 12.0, 29.99):
        media = rm.Media(audios=[np.zeros(int(seconds * 16000), dtype=np.float32)])
        inputs = rm.prepare_inputs(processor, rm.build_messages("Hi", None, media, "omni"), "cpu", media)
        assert int((inputs["input_ids"] == audio_id).sum()) == rm.audio_tokens(seconds) - 2, seconds


# --- end to end ------------------------------------------------------------------------

def test_image_and_audio_in_text_out_is_exactly_transformers(tiny_models):
    model = tiny_models["qwen2_5_omni"]
    expected, prompt_tokens = reference_thinker(model, "Answer the question.", [SAMPLE_IMAGE], [WAV44])
    result = run_tool("--model_id", model, "--prompt", "Answer the question.", "--image_path", SAMPLE_IMAGE,
                      "--audio_path", WAV44, *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert stat(result.stderr, "tokens ·") == prompt_tokens
    assert prompt_tokens > 178 + 85   # the photo's 176 and the question's 85 tokens, with markers
    assert "media decoded in" in result.stderr and "loading the thinker only" in result.stderr


def test_two_recordings_in_one_prompt(tiny_models):
    model = tiny_models["qwen2_5_omni"]
    expected, prompt_tokens = reference_thinker(model, "Compare them.", [], [WAV16, FLAC])
    result = run_tool("--model_id", model, "--prompt", "Compare them.", "--audio_path", WAV16,
                      "--audio_path", FLAC, *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    one = run_tool("--model_id", model, "--prompt", "Compare them.", "--audio_path", WAV16, *GREEDY)
    assert stat(result.stderr, "tokens ·") - stat(one.stderr, "tokens ·") == rm.audio_tokens(QUESTION_SECONDS)


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


def test_a_spoken_reply_is_planned_with_talker_and_token2wav(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--dry_run", "--json", "--output_audio",
                      "/tmp/never_written.wav")
    assert result.returncode == 0, result.stderr
    import json
    assert list(json.loads(result.stdout)["components"]) == ["thinker", "talker", "token2wav"]
    assert not os.path.exists("/tmp/never_written.wav")


# --- what cannot work is said before loading -----------------------------------------

@pytest.mark.parametrize("model, args, message", [
    ("qwen2_5_vl", ("--audio_path", WAV16),
     "--audio_path: {model} is a vision-language model and cannot hear audio; drop --audio_path or use an Omni "
     "model such as Qwen/Qwen2.5-Omni-3B"),
    ("qwen2_5_vl", ("--output_audio", "reply.wav"),
     "--output_audio: {model} is a vision-language model and cannot speak; drop --output_audio or use an Omni "
     "model such as Qwen/Qwen2.5-Omni-3B"),
    ("qwen2", ("--video_path", CLIP),
     "--video_path: {model} is a text-only model and cannot watch video; drop --video_path or use an Omni model "
     "such as Qwen/Qwen2.5-Omni-3B"),
    ("qwen2_5_omni", ("--use_audio_in_video",), "--use_audio_in_video needs a --video_path whose sound track to use"),
    ("qwen2_5_omni", ("--speaker", "Ethan"), "--speaker is about the spoken reply; add --output_audio reply.wav"),
    ("qwen2_5_omni", ("--output_audio", "{tmp}/reply.wav", "--speaker", "Bob"),
     "--speaker Bob: not a voice of {model}; choose one of Chelsie, Ethan"),
    ("qwen2_5_omni", ("--output_audio", "{tmp}/missing/reply.wav"),
     "--output_audio {tmp}/missing/reply.wav: the folder {tmp}/missing does not exist; create it first"),
    ("qwen2_5_omni", ("--output_audio", "{tmp}"), "--output_audio {tmp}: this is a folder; give a file name such "
                                                  "as reply.wav"),
])
def test_impossible_requests_are_refused_before_loading(tiny_models, tmp_path, model, args, message):
    path = tiny_models[model]
    args = [str(a).format(tmp=tmp_path) for a in args]
    result = run_tool("--model_id", path, "--prompt", "Hi", *args)
    assert one_line_error(result) == "Error: " + message.format(model=path, tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []


def silent_video(path) -> None:
    """A 1 s MPEG-4 clip with pictures and no sound track, written with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for shade in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), shade * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def bad_media(tmp_path):
    """Files that look like media and are not."""
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not a recording\n" * 20)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(CLIP.read_bytes()[:4000])
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("not a video\n" * 50)
    thin = tmp_path / "thin.png"
    from PIL import Image
    Image.new("RGB", (402, 2)).save(thin)
    silent = tmp_path / "silent.mp4"
    silent_video(silent)
    return {"empty": empty, "text": text, "truncated": truncated, "not_video": not_video, "folder": tmp_path,
            "thin": thin, "silent": silent}


@pytest.mark.parametrize("flag, which, says", [
    ("--audio_path", "empty", "the file is empty; give an audio file"),
    ("--audio_path", "text", "not a readable audio file (WAV, FLAC, OGG or MP3); check that the file is a "
                             "complete recording"),
    ("--audio_path", "folder", "this is a folder; give an audio file"),
    ("--video_path", "truncated", "not a readable video (MP4, MOV, WebM, ...); check that the file is complete"),
    ("--video_path", "not_video", "not a readable video (MP4, MOV, WebM, ...); check that the file is complete"),
    ("--video_path", "empty", "the file is empty; give a video file"),
    ("--video_path", "silent", "this video has no sound track; drop --use_audio_in_video or this video"),
    ("--image_path", "thin", "402 x 2 pixels is too long and thin for Qwen's image processor (at most 200:1); "
                             "crop it"),
])
def test_bad_media_is_one_line(tiny_models, bad_media, tmp_path, flag, which, says):
    output = tmp_path / "reply.wav"
    extra = ["--use_audio_in_video"] if which == "silent" else []
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Hi", flag, bad_media[which],
                      "--output_audio", output, *extra)
    assert one_line_error(result) == f"Error: {flag} {bad_media[which]}: {says}"
    assert not output.exists()


# --- Qwen3-Omni: the same flags, the thinker alone ----------------------------------------

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
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert stat(result.stderr, "tokens ·") == inputs["input_ids"].shape[-1]
    assert "(qwen3_omni_moe)" in result.stderr


def test_qwen3_omni_video_with_sound_runs(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen3_omni"], "--prompt", "What happens?", "--video_path", CLIP,
                      "--use_audio_in_video", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_qwen3_omni_does_not_speak_yet(tiny_models, tmp_path):
    result = run_tool("--model_id", tiny_models["qwen3_omni"], "--prompt", "Hi", "--output_audio",
                      tmp_path / "reply.wav")
    assert one_line_error(result) == ("Error: --output_audio: speaking with qwen3_omni_moe models is not supported "
                                      "yet (their text answers are); drop --output_audio or use Qwen/Qwen2.5-Omni-3B")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, module, package", [
    ("--video_path", CLIP, "av", "av"),
    ("--audio_path", WAV16, "soxr", "soxr"),
    ("--output_audio", "reply.wav", "soundfile", "soundfile"),
])
def test_a_missing_media_library_is_named(tiny_models, tmp_path, flag, value, module, package):
    """A partial install: the flag's library cannot be imported (shadowed here by a module that fails)."""
    blockers = tmp_path / "blockers"
    blockers.mkdir()
    (blockers / f"{module}.py").write_text(f"raise ImportError('no {module} here')\n")
    from conftest import offline_env
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Hi", flag,
                      str(tmp_path / value) if flag == "--output_audio" else value,
                      env=offline_env(PYTHONPATH=str(blockers)))
    assert one_line_error(result, code=1) == (f"Error: {flag} needs the {package} package: pip install {package} "
                                              "(or pip install -r requirements.txt)")
    assert not (tmp_path / "reply.wav").exists()
