"""Qwen3-Omni speaking: a tiny checkpoint of Qwen3-Omni-30B-A3B-Instruct's structure (the MoE thinker, the MoE
talker with its code predictor, code2wav), and the plans for the real one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import run_multimodal as rm
from conftest import CONFIGS, GREEDY, SAMPLE_IMAGE, WAV16, assert_one_line_error, run_tool

QWEN3 = CONFIGS / "Qwen--Qwen3-Omni-30B-A3B-Instruct"


def transformers_reply(model_dir, prompt: str, speaker: str, seconds: float, seed: int) -> tuple[str, np.ndarray]:
    """What transformers' own generate() says and speaks: greedy text, its sampled talker seeded, float32 on the
    CPU, with Qwen's spoken-reply system prompt, as a user of transformers would call it."""
    import torch
    from transformers import AutoProcessor, Qwen3OmniMoeForConditionalGeneration, set_seed

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "system", "content": [{"type": "text", "text": rm.SPEECH_SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    set_seed(seed)
    text_ids, wav = model.generate(**inputs, speaker=speaker, thinker_max_new_tokens=12, thinker_do_sample=False,
                                   thinker_eos_token_id=model.config.im_end_token_id,
                                   talker_max_new_tokens=int(seconds * 12.5))
    text = processor.tokenizer.decode(text_ids[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
    return text, wav.reshape(-1).float().numpy()


def test_qwen3_omni_speaks_what_transformers_generate_speaks(tiny_models, tmp_path):
    """--output_audio with Qwen3-Omni: the words and the 24 kHz samples transformers' generate() gives for the same
    question, voice and seed; the voice read from the config (Aiden), the length from --max_speech_seconds (12.5
    frames a second)."""
    import soundfile

    model = tiny_models["qwen3_omni_speaking"]
    result = run_tool("--model_id", model, "--prompt", "Say something", "--output_audio", tmp_path / "reply.wav",
                      "--speaker", "Aiden", "--max_speech_seconds", "2", "--seed", "3", "--temperature", "0",
                      "--max_new_tokens", "12", "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    samples, rate = soundfile.read(tmp_path / "reply.wav", dtype="float32")
    text, expected = transformers_reply(model, "Say something", "Aiden", 2, 3)
    assert result.stdout == text + "\n" and rate == 24000
    assert 0 < len(samples) == len(expected) <= 2 * 24000 and 0.01 < np.abs(expected).max() <= 1
    # a 16-bit WAV's rounding, and the float rounding of code2wav made in chunks (below)
    assert np.abs(samples - np.clip(expected, -1, 1)).max() <= 1 / 32767 + 1e-5


def test_a_voice_not_in_the_config_and_a_checkpoint_without_talker_are_refused_before_loading(tiny_models, tmp_path):
    result = run_tool("--model_id", tiny_models["qwen3_omni_speaking"], "--prompt", "Hi", "--output_audio",
                      tmp_path / "r.wav", "--speaker", "Nobody", cwd=tmp_path)
    assert_one_line_error(result, 2, "--speaker Nobody", "Aiden, Chelsie, Ethan")
    result = run_tool("--model_id", tiny_models["qwen3_omni"], "--prompt", "Hi", "--output_audio", tmp_path / "r.wav",
                      cwd=tmp_path)
    assert_one_line_error(result, 2, "--output_audio", "without its talker")
    assert "Loading" not in result.stderr and list(tmp_path.iterdir()) == []


PLANS = [   # --hardware, device, quantization, fits: Qwen3-Omni-30B-A3B speaking (all experts resident)
    ("mps:64", "mps", None, False),     # 69.5 GB in 16-bit; Metal leaves the experts in 16-bit
    ("mps:128", "mps", None, True),
    ("cuda:80", "cuda", None, True),
    ("cuda:141", "cuda", None, True),   # an H200
    ("cuda:48,48", "cuda", None, True),
]


@pytest.mark.parametrize("hardware, device, quantization, fits", PLANS)
def test_qwen3_omni_speaking_is_planned_part_by_part(hardware, device, quantization, fits):
    """The thinker, the talker (its code predictor inside) and code2wav counted apart, each in bfloat16, the
    talker's cache too; on a 64 GB Mac the plan says why Metal quantization cannot help."""
    result = run_tool("--model_id", QWEN3, "--dry_run", "--json", "--hardware", hardware, "--output_audio", "r.wav")
    assert result.returncode == (0 if fits else 1), result.stderr
    plan = json.loads(result.stdout)
    assert (plan["device"], plan["quantization"], plan["fits"]) == (device, quantization, fits)
    assert list(plan["components"]) == ["thinker", "talker", "code2wav"]
    assert plan["components"]["talker"]["parameters"] > 3e9 and plan["components"]["code2wav"]["parameters"] > 1e8
    assert all(part["bytes"] == part["parameters"] * 2 for part in plan["components"].values())
    if hardware == "mps:64":
        assert any(line.startswith("🍎 Metal quantization converts Linear layers only") for line in plan["reasons"])
    if hardware == "cuda:48,48":
        assert plan["gpus"] == [0, 1]


# --- the reply streamed, in this process, against transformers' generate() on the same inputs -----------------

TEXT_TOKENS = 16
SPEAKING = rm.Options(output_audio=rm.Path("reply.wav"), sampling=rm.Sampling(TEXT_TOKENS, temperature=0))


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    """(loaded, inputs): the tiny speaking Qwen3-Omni in float32 on the CPU, a picture and a recording in the
    prompt (the talker reads their hidden states), the runtime the tool decides for a spoken reply there."""
    info = rm.resolve_model(str(tiny_models["qwen3_omni_speaking"]))
    plan = rm.Plan("cpu", "float32", None, "", (), components=("thinker", "talker", "code2wav"))
    model, processor = rm.load_model(info, plan, rm.simulated_hardware("cpu:8"))
    runtime = rm.choose_runtime(model, "cpu", SPEAKING)
    assert (runtime.decoder, runtime.speaks) == ("step", "code2wav") and "the talker too" in runtime.reason
    plain = rm.choose_runtime(model, "cpu", dataclasses.replace(SPEAKING, fast_decode=False))
    assert plain.decoder == "generate" and "(--no_fast_decode)" in plain.reason
    media = rm.Media(images=[rm.load_image(str(SAMPLE_IMAGE))], audios=[rm.load_audio(str(WAV16))])
    messages = rm.build_messages("What do you see and hear?", rm.SPEECH_SYSTEM_PROMPT, media, "omni")
    inputs = rm.prepare_inputs(processor, messages, model.device, media)
    return rm.Loaded(model, processor, plan, 0.0, {}, runtime, rm.Speech("Ethan"),
                     predictor=rm.code_predictor_for(model, runtime)), inputs


def streamed(qwen3, frames: int, seed: int, monkeypatch, runtime=None, forced: bool = True) -> tuple[rm.Answer, list]:
    """The tool's spoken reply, `frames` long (`forced`) or at most, and the frames code2wav was given (seen by
    wrapping Code2WavChunks.add)."""
    import torch
    loaded, inputs = qwen3
    seen = []
    add = rm.Code2WavChunks.add

    def spy(self, all_frames, available, final):
        seen[:] = all_frames[0, :, :available].tolist()
        return add(self, all_frames, available, final)
    monkeypatch.setattr(rm.Code2WavChunks, "add", spy)
    speaking = dataclasses.replace(loaded, speech=rm.Speech("Ethan", max_codes=frames, min_codes=frames * forced),
                                   runtime=runtime or loaded.runtime)
    torch.manual_seed(seed)
    with torch.inference_mode():
        answer = rm.generate_answer(speaking, inputs, rm.Sampling(TEXT_TOKENS, temperature=0), rm.SHOW_NONE)
    return answer, seen


def generated(qwen3, frames: int, seed: int) -> tuple[str, list, np.ndarray]:
    """transformers' own generate() on the same inputs: its text, the frames its code2wav was given, its wave."""
    import torch
    loaded, inputs = qwen3
    model, seen = loaded.model, []
    decode = model.code2wav.chunked_decode

    def spy(codes, **kwargs):
        seen[:] = codes[0].tolist()
        return decode(codes, **kwargs)
    model.code2wav.chunked_decode = spy
    torch.manual_seed(seed)
    try:
        with torch.inference_mode():
            text_ids, wav = model.generate(**inputs, speaker="Ethan", thinker_max_new_tokens=TEXT_TOKENS,
                                           thinker_do_sample=False, thinker_eos_token_id=model.config.im_end_token_id,
                                           talker_max_new_tokens=frames, talker_min_new_tokens=frames)
    finally:
        del model.code2wav.chunked_decode
    text = loaded.processor.batch_decode(text_ids[:, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)[0]
    return text, seen, wav.reshape(-1).float().numpy()


# the fast decoder's steps (thinker, talker, code predictor), and each part's own forward (for what it cannot run)
STAGES = rm.Runtime("cpu", "stages", "", speaks="code2wav")


@pytest.mark.parametrize("seed, runtime", [(5, None), (11, None), (11, STAGES)], ids=["5", "11", "11-forward"])
def test_the_streamed_reply_is_generates(qwen3, seed, runtime, monkeypatch):
    """30 frames (2.4 s), the talker and its code predictor sampling with generate()'s settings from one seed:
    the same text, the same 16 codes in every frame, the same wave but for code2wav's chunks' float rounding;
    the first sound before the end."""
    answer, frames = streamed(qwen3, 30, seed, monkeypatch, runtime)
    text, expected, wave = generated(qwen3, 30, seed)
    assert answer.text == text
    assert len(frames) == 16 and len(frames[0]) == 29   # the 30th first code is the last: no frame follows it
    assert frames == expected
    assert answer.speech_figures["speech_codes"] == 29 and len(answer.wav) == len(wave)
    assert 0.01 < np.abs(wave).max() <= 1 and np.abs(answer.wav - wave).max() < 1e-5
    assert 0 < answer.first_audio_s < answer.end - answer.start


def test_on_a_mac_every_draw_is_made_on_the_cpu(qwen3, monkeypatch):
    """The thinker's, the talker's and the code predictor's samplers all come from the runtime (simulated Mac)."""
    loaded, _ = qwen3
    mac = rm.choose_runtime(loaded.model, "mps", SPEAKING)
    assert mac.decoder == "step" and mac.draw_on_cpu
    draws, init = [], rm.Sampler.__init__

    def spy(self, settings, draw_on_cpu=False):
        draws.append(draw_on_cpu)
        init(self, settings, draw_on_cpu)
    monkeypatch.setattr(rm.Sampler, "__init__", spy)
    speaking = dataclasses.replace(loaded, runtime=mac, predictor=rm.code_predictor_for(loaded.model, mac))
    _, frames = streamed((speaking, qwen3[1]), 12, 11, monkeypatch)
    assert draws == [True, True, True]   # the code predictor's (made with the runtime), the thinker's, the talker's
    assert frames == generated(qwen3, 12, 11)[1]


@pytest.mark.parametrize("context, close", [(rm.CODE2WAV_CONTEXT_FRAMES, True), (2, False)])
def test_code2wav_in_chunks_is_code2wav_over_the_whole_reply(qwen3, monkeypatch, context, close):
    """Random frames fed as a talker makes them (a few at a time): the chunks equal code2wav over all of them
    within float rounding; with too little context before each chunk they would not."""
    import torch
    code2wav = qwen3[0].model.code2wav
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, code2wav.config.codebook_size, (1, 16, 57), generator=generator)
    monkeypatch.setattr(rm, "CODE2WAV_CONTEXT_FRAMES", context)
    with torch.inference_mode():
        whole = code2wav(frames).reshape(-1).numpy()
        chunks = rm.Code2WavChunks(code2wav, 57)
        parts = [part for available in range(1, 58, 3)
                 for part in chunks.add(frames, min(available, 57), final=False)]
        parts += chunks.add(frames, 57, final=True)
    assert chunks.chunks_made == len(parts) > 4
    joined = np.concatenate(parts)
    assert len(joined) == len(whole)
    assert 0.01 < np.abs(whole).max() and (np.abs(joined - whole).max() < 1e-5) == close


def test_the_masked_step_a_cuda_graph_records_makes_the_same_frames(qwen3, monkeypatch):
    """On a GPU a frame of the code predictor is one CUDA graph over its masked step (all 16 slots, the position
    set on the device); run here without the graph, it draws the codes the filled-slots step draws."""
    plain = streamed(qwen3, 12, 3, monkeypatch)[1]
    frame = rm.CodePredictor._frame
    monkeypatch.setattr(rm.CodePredictor, "_frame", lambda self, masked: frame(self, masked=True))
    assert streamed(qwen3, 12, 3, monkeypatch)[1] == plain


def test_inside_a_cuda_graph_tokens_are_drawn_with_multinomials_distribution():
    """multinomial waits for the GPU, so a recorded frame races exponential variates: the same distribution."""
    import torch
    from transformers import LogitsProcessorList

    sampler = rm.Sampler((dataclasses.make_dataclass("Config", [("do_sample", bool)])(True), LogitsProcessorList(),
                          set()))
    sampler.race = True
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    drawn = np.bincount([int(sampler(None, logits)) for _ in range(20000)], minlength=4) / 20000
    assert np.abs(drawn - [0.5, 0.3, 0.2, 0.0]).max() < 0.015


def test_a_spoken_chat_reads_the_earlier_turns_from_the_cache(tiny_models, tmp_path):
    """Qwen3-Omni in a spoken chat, a recording in the first turn: the second turn computes only what the cache
    lacks (the thinker's keys and values, the talker's rows of the recording kept), and says and speaks what
    computing the whole conversation again says and speaks (seeded; the WAVs within a 16-bit step)."""
    import re

    import soundfile

    def spoken(folder, *flags):
        folder.mkdir()
        return run_tool("--model_id", tiny_models["qwen3_omni_speaking"], "--interactive", "--output_audio",
                        folder / "reply.wav", "--max_speech_seconds", "0.8", "--seed", "3", "--audio_path", WAV16,
                        *flags, *GREEDY, stdin="Say something\nSay more\n/stats\n")
    kept, fresh = spoken(tmp_path / "kept"), spoken(tmp_path / "fresh", "--no_kv_reuse")
    assert kept.returncode == fresh.returncode == 0, kept.stderr + fresh.stderr
    assert kept.stdout == fresh.stdout and len(kept.stdout.splitlines()) == 2
    for turn in (1, 2):
        ours, theirs = (soundfile.read(tmp_path / side / f"reply-{turn}.wav")[0] for side in ("kept", "fresh"))
        assert len(ours) == len(theirs) > 0 and np.abs(ours - theirs).max() <= 1 / 32767 + 1e-9
    assert re.search(r"prompt \d+ tokens \([1-9]\d* reused, \d+ computed\)", kept.stderr) and "reused" not in fresh.stderr


@pytest.mark.parametrize("ended", [False, True], ids=["budget", "talker-end"])
def test_codes_read_back_behind_the_device_change_nothing(qwen3, monkeypatch, ended):
    """On a GPU the talker runs QWEN3_CODES_LAG frames ahead of the codes read back (no wait for the GPU each
    frame), so where the speech ends is known late: the frames past it are made and dropped. Simulated here (a
    runtime with a lag, on the CPU): the same frames and wave as reading each code at once, whether the reply
    ends at the budget or where the talker ends it (its end code taken, for this test, as one it draws at frame
    6)."""
    loaded = qwen3[0]

    def reply(lag: int):
        return streamed(qwen3, 20, 7, monkeypatch, dataclasses.replace(loaded.runtime, lag=lag), forced=False)
    if ended:
        first = reply(0)[1][0]
        monkeypatch.setattr(loaded.model.talker.config, "codec_eos_token_id", first[6])
    (at_once, frames), (behind, late) = reply(0), reply(8)
    assert len(frames[0]) == (first.index(first[6]) if ended else 19) and late == frames
    assert np.array_equal(at_once.wav, behind.wav) and behind.speech_figures["speech_codes"] == len(frames[0])
