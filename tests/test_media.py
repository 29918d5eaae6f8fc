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


# --- what phones and other programs write ----------------------------------------------------

def test_heic_and_avif_photos_are_read_like_any_picture(tiny_models, tmp_path):
    """An iPhone's HEIC (pillow-heif's own encoder writes it here) and an AVIF: the answer is plain transformers'
    on the same decoded picture."""
    from PIL import Image
    from pillow_heif import register_heif_opener

    from references import reference_answer

    register_heif_opener()
    source = Image.open(SAMPLE_IMAGE).convert("RGB")
    for name in ("photo.heic", "photo.avif"):
        source.save(tmp_path / name)
        picture = rm.load_image(str(tmp_path / name))
        assert picture.mode == "RGB" and picture.size == source.size
    expected, tokens = reference_answer(tiny_models["qwen2_5_vl"], "vl", "What is this?", [tmp_path / "photo.heic"])
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "What is this?", "--image_path",
                      tmp_path / "photo.heic", "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu",
                      "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and f"prompt {tokens} tokens" in result.stderr


def test_a_heic_photo_without_pillow_heif_names_the_package(tiny_models, tmp_path):
    from PIL import Image
    from pillow_heif import register_heif_opener

    register_heif_opener()
    Image.open(SAMPLE_IMAGE).convert("RGB").save(tmp_path / "photo.heic")
    blockers = tmp_path / "blockers"
    blockers.mkdir()
    (blockers / "pillow_heif.py").write_text("raise ImportError('no pillow_heif here')\n")
    result = run_tool("--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Hi", "--image_path", "photo.heic",
                      cwd=tmp_path, env=offline_env(PYTHONPATH=str(blockers)))
    assert_one_line_error(result, 1, "Error: --image_path photo.heic: a HEIC/HEIF photo, which needs the pillow-heif "
                                     "package: pip install pillow-heif")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_and_32_bit_pictures_are_scaled_to_8_bits_not_clipped(tmp_path, mode):
    """A greyscale ramp saved in 16 or 32 bits (PNG, TIFF) keeps its ramp: a plain convert() would clip it to
    white from the 256th level on."""
    from PIL import Image

    ramp = np.tile(np.linspace(0, 1, 256), (16, 1))
    values = {"I;16": (ramp * 65535).astype(np.uint16), "I": (ramp * 65535).astype(np.int32),
              "F": ramp.astype(np.float32)}[mode]
    path = tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif")   # PNG holds 16 bits; TIFF 32
    Image.fromarray(values).save(path)
    picture = np.asarray(rm.load_image(str(path)))
    row = picture[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all() and len(set(row)) > 200


def write_clip(path, seconds: float, rate: int, size: tuple[int, int], rotation: int = 0, sound: bool = False) -> None:
    """A clip written with PyAV: a white bar down its left edge, a display rotation as phones record one."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        picture = np.zeros((height, width, 3), np.uint8)
        picture[:, :width // 8] = 255
        for _ in range(int(seconds * rate)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_portrait_phone_video_is_turned_upright(tmp_path):
    """A phone held upright records landscape frames and a display rotation of -90 degrees (90 clockwise): the
    frames come out as it shows them, tall, the bar that was down the left edge now along the top."""
    write_clip(tmp_path / "portrait.mov", 1, 10, (96, 64), rotation=-90)
    frames = rm.load_video(str(tmp_path / "portrait.mov"), fps=2.0, with_audio=False).frames
    assert frames.shape[1:] == (96, 64, 3)
    assert frames[0, :8].mean() > 200 and frames[0, 20:].mean() < 30


def test_a_long_video_is_refused_before_it_is_decoded_and_frames_are_scaled_as_they_come(tiny_models):
    """At 2 frames a second a 2-minute 720p clip is about 92,000 tokens: refused from its length in the header
    (240 frames) before its frames are decoded, against the tiny model's 4,096; at 0.05 a second it fits, each
    frame scaled to the per-frame budget as it is decoded (memory for 6 frames, not for the file)."""
    import tempfile

    info = rm.resolve_model(str(tiny_models["qwen2_5_vl"]))
    with tempfile.TemporaryDirectory() as folder:
        clip = f"{folder}/long.mp4"
        write_clip(clip, 120, 1, (1280, 720))
        with pytest.raises(rm.UsageError, match=r"--video_path long\.mp4: 240 frames at --fps 2 are about "
                                                r"[\d,]+ tokens, and .* reads at most 4,096; lower --fps"):
            rm.load_video(clip, 2.0, False, "--video_path", budget=rm.video_budget(info, rm.Options(), "--video_path long.mp4"))
        video = rm.load_video(clip, 0.05, False, budget=rm.video_budget(info, rm.Options(fps=0.05), "--video_path"))
    assert video.frames.shape[0] == 6 and video.size[0] * video.size[1] <= rm.VIDEO_MAX_PIXELS


def test_voice_memos_and_other_sound_files_pyav_reads(tmp_path):
    """An iPhone voice memo (AAC in M4A), ALAC, and Opus: decoded through PyAV when libsndfile cannot."""
    import av

    reference = rm.load_audio(str(WAV16))
    for name, codec in (("memo.m4a", "aac"), ("lossless.m4a", "alac"), ("voice.webm", "libopus")):
        with av.open(str(tmp_path / name), "w") as container:
            stream = container.add_stream(codec, rate=48000 if codec == "libopus" else 16000)
            frame = av.AudioFrame.from_ndarray((reference * 32767).astype(np.int16)[None, :], format="s16",
                                               layout="mono")
            frame.sample_rate = 16000
            resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=stream.rate)
            for out in resampler.resample(frame) + resampler.resample(None):
                for packet in stream.encode(out):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        decoded = rm.load_audio(str(tmp_path / name))
        n = min(len(decoded), len(reference))
        assert abs(len(decoded) - len(reference)) < 0.2 * 16000, name   # AAC pads to its frames of 1024
        lag = int(np.argmax(np.correlate(decoded[:16000], reference[:16000], "full"))) - 15999   # codec delay
        shifted = decoded[max(lag, 0):n] if lag >= 0 else decoded[:n]
        m = min(len(shifted), n - max(-lag, 0))
        assert np.corrcoef(shifted[:m], reference[max(-lag, 0):max(-lag, 0) + m])[0, 1] > 0.95, name


def test_a_wav_written_to_a_pipe_is_accepted_and_a_cut_one_is_not(tmp_path):
    """ffmpeg writing to a pipe cannot know the sizes and leaves 0xFFFFFFFF in the header: the whole recording
    is read. A header that promises more than the file holds is a download cut short."""
    data = bytearray(WAV16.read_bytes())
    data[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    data[40:44] = (0xFFFFFFFF).to_bytes(4, "little")   # the data chunk's size
    (tmp_path / "piped.wav").write_bytes(bytes(data))
    assert np.array_equal(rm.load_audio(str(tmp_path / "piped.wav")), rm.load_audio(str(WAV16)))
    (tmp_path / "cut.wav").write_bytes(WAV16.read_bytes()[:50_000])
    with pytest.raises(rm.UsageError, match="the file is cut short"):
        rm.load_audio(str(tmp_path / "cut.wav"))


def test_a_picture_past_the_size_limit_is_refused_before_decoding(tmp_path):
    """A PNG whose header says 20,000 x 20,000 pixels (400 megapixels, 1.2 GB decoded) and holds nothing after:
    refused from its header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2,
                                                                                          0, 0, 0)) + chunk(b"IEND", b""))
    with pytest.raises(rm.UsageError, match="20000 x 20000 is more than 256 megapixels"):
        rm.load_image(str(tmp_path / "huge.png"))


def test_media_from_a_pipe_and_from_stdin(tiny_models, tmp_path):
    """`<(...)` and /dev/stdin: read whole once, then decoded as a file is; the answer is the file's."""
    import subprocess
    import sys

    from conftest import SCRIPT

    args = ["--model_id", str(tiny_models["qwen2_5_vl"]), "--prompt", "What is this?", "--temperature", "0",
            "--max_new_tokens", "6", "--device", "cpu"]
    from_file = run_tool(*args, "--image_path", SAMPLE_IMAGE)
    from_stdin = subprocess.run([sys.executable, str(SCRIPT), *args, "--image_path", "/dev/stdin"],
                                input=SAMPLE_IMAGE.read_bytes(), capture_output=True, env=offline_env(), timeout=300)
    from_pipe = subprocess.run(["bash", "-c", f'"{sys.executable}" "{SCRIPT}" "$@" --audio_path <(cat "{WAV16}")', "-",
                                *map(str, args), "--model_id", str(tiny_models["qwen2_5_omni"])],
                               capture_output=True, env=offline_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert from_file.returncode == from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.decode() == from_file.stdout and from_file.stdout.strip()
    assert from_pipe.returncode == 0, from_pipe.stderr.decode()
