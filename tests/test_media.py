"""Section 4, media in: pictures, recordings and clips decoded as the processors want them, what the
prompt amounts to before any tokenizer is loaded, the voices of a spoken reply, and a missing library."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile

import run_multimodal as rm
from conftest import CLIP, FLAC, SAMPLE_IMAGE, WAV16, WAV44, assert_one_line_error, offline_env, run_tool

QUESTION_SECONDS = 3.4


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


def test_long_recordings_are_heard_in_30_second_pieces():
    pieces = rm.audio_pieces(np.zeros(75 * 16000, dtype=np.float32), "test")
    assert [len(piece) / 16000 for piece in pieces] == [30, 30, 15]


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


def test_the_workload_and_the_media_read_back_from_messages():
    video = rm.load_video(str(CLIP), fps=2.0, with_audio=True)
    media = rm.Media(images=[rm.load_image(str(SAMPLE_IMAGE))], audios=[rm.load_audio(str(WAV16))], videos=[video],
                     use_audio_in_video=True)
    options = rm.Options(prompt="What is this?")
    workload = rm.workload_of(options, media)
    assert workload.image_sizes == ((451, 300),) and workload.videos == ((6, 452, 300),)
    assert workload.text_tokens == 7 + rm.CHAT_TEMPLATE_TOKENS   # 13 bytes, one token per 2
    assert len(workload.audio_seconds) == 2 and abs(workload.audio_seconds[0] - QUESTION_SECONDS) < 0.05
    again = rm.media_of(rm.build_messages("What is this?", "Be brief.", media, "omni"), True)
    assert again.images == media.images and again.videos == [video] and len(again.audios) == 1


def test_a_huge_picture_is_scaled_down_not_refused(tiny_models, tmp_path):
    from PIL import Image

    Image.new("RGB", (4000, 3000), (200, 120, 40)).save(tmp_path / "big.png")
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "What is this?", "--image_path",
                      "big.png", "--max_new_tokens", "3", "--temperature", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "🖼️ --image_path big.png: 4000 x 3000 pixels is scaled down to about 1.0 megapixels for the model " \
        "(--max_pixels 1003520)" in result.stderr
    # 1148 x 840 pixels after the processor's resize: 41 x 30 = 1230 visual tokens, + markers and text
    assert "prompt 1274 tokens" in result.stderr


class Payload:
    """Unpickling this creates a file: what a malicious pickle could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return (Path.touch, (self.marker,))


def test_a_speaker_file_that_runs_code_is_refused(tiny_models, tmp_path):
    import torch

    folder = tmp_path / "omni"
    shutil.copytree(tiny_models["qwen2_5_omni"], folder)
    marker = tmp_path / "code_ran"
    voices = torch.load(folder / "spk_dict.pt", weights_only=True)
    torch.save({**voices, "payload": Payload(marker)}, folder / "spk_dict.pt")
    result = run_tool("--model_id", folder, "--prompt", "hi", "--output_audio", "reply.wav", cwd=tmp_path)
    assert_one_line_error(result, 1, f"Error: --output_audio: {folder / 'spk_dict.pt'} holds more than voices "
                          "(objects or code that PyTorch will not load safely), so it was not loaded; use a checkpoint "
                          "from a source you trust", alone=True)
    assert not marker.exists() and not (tmp_path / "reply.wav").exists()


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
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Hi", flag,
                      str(tmp_path / value) if flag == "--output_audio" else value,
                      env=offline_env(PYTHONPATH=str(blockers)))
    assert_one_line_error(result, 1, f"Error: {flag} needs the {package} package: pip install {package} "
                                     "(or pip install -r requirements.txt)", alone=True)
    assert not (tmp_path / "reply.wav").exists()
