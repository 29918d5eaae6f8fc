"""Section 10, a spoken reply, against transformers' own Qwen2.5-Omni generate() on the tiny random-weight
checkpoint, float32 on the CPU: the talker's codes are generate()'s, token2wav's ODE over the whole reply
is transformers' token2wav bit for bit, and the chunks made as the codes come differ from it only by
float rounding in the mel and by the vocoder's seams in the wave. Then what a user of --play sees."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import run_multimodal as rm
from conftest import GREEDY, SAMPLE_IMAGE, assert_one_line_error, run_tool

PROMPT = "Describe the picture, please"
TEXT_TOKENS = 24
SPEAKING = rm.Options(output_audio=rm.Path("reply.wav"), sampling=rm.Sampling(TEXT_TOKENS, temperature=0))


@pytest.fixture(scope="module")
def omni(tiny_models):
    """(loaded, inputs): the whole tiny Omni (thinker, talker, token2wav) in float32 on the CPU, a picture in
    the prompt, the runtime the tool decides for a spoken reply there."""
    info = rm.resolve_model(str(tiny_models["qwen2_5_omni"]))
    plan = rm.Plan("cpu", "float32", None, "", (), components=("thinker", "talker", "token2wav"))
    model, processor = rm.load_model(info, plan, rm.simulated_hardware("cpu:8"))
    runtime = rm.choose_runtime(model, "cpu", SPEAKING)
    assert (runtime.decoder, runtime.speaks) == ("step", "token2wav") and "the talker too" in runtime.reason
    plain = rm.choose_runtime(model, "cpu", dataclasses.replace(SPEAKING, fast_decode=False))
    assert not plain.fast and "for the text and the spoken reply (--no_fast_decode)" in plain.reason
    media = rm.Media(images=[rm.load_image(str(SAMPLE_IMAGE))])
    messages = rm.build_messages(PROMPT, rm.SPEECH_SYSTEM_PROMPT, media, "omni")
    inputs = rm.prepare_inputs(processor, messages, model.device, media)
    voice = rm.Speech("Chelsie")
    return rm.Loaded(model, processor, plan, 0.0, {}, runtime, voice, rm.token2wav_for(model, voice, runtime)), inputs


def tool_reply(omni, codes: int, seed: int, monkeypatch, runtime: rm.Runtime | None = None) -> tuple[rm.Answer, list[int]]:
    """The tool's spoken reply (greedy text, the talker sampling as generate() does by default) and the
    codes token2wav was given, seen by wrapping SpeechChunks.add (which still runs)."""
    import torch
    loaded, inputs = omni
    seen = []
    add = rm.SpeechChunks.add

    def spy(self, all_codes, available, final):
        seen[:] = all_codes[0, :available].tolist()
        return add(self, all_codes, available, final)
    monkeypatch.setattr(rm.SpeechChunks, "add", spy)
    speaking = dataclasses.replace(loaded, speech=rm.Speech("Chelsie", max_codes=codes, min_codes=codes),
                                   runtime=runtime or loaded.runtime)
    torch.manual_seed(seed)
    with torch.inference_mode():
        answer = rm.generate_answer(speaking, inputs, rm.Sampling(TEXT_TOKENS, temperature=0), rm.SHOW_NONE)
    return answer, seen


def talker_attention_mask(talker, args, kwargs):
    """The talker's attention mask, as transformers up to 5.17 passed it at every step. Later versions'
    generate() drops a mask of all ones, and Qwen2.5-Omni's talker reads its positions (the prompt's
    pictures, rope deltas) and adds its codec pad/bos embeddings only when it gets one: without it, the
    talker runs on other positions and inputs than the ones it was trained with."""
    import torch
    if kwargs.get("attention_mask") is None:
        cache, new = kwargs.get("cache"), (kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None
                                           else kwargs["input_ids"]).shape[1]
        done = cache.get_seq_length() if cache is not None else 0
        kwargs["attention_mask"] = torch.ones((1, done + new), dtype=torch.long)
    return args, kwargs


def plain_reply(omni, codes: int, seed: int) -> tuple[str, list[int], np.ndarray]:
    """transformers' generate() with the same settings: its text, the codes its token2wav was given, its wave."""
    import torch
    loaded, inputs = omni
    model, seen = loaded.model, []
    hook = model.token2wav.register_forward_pre_hook(lambda module, args: seen.extend(args[0][0].tolist()))
    mask = model.talker.register_forward_pre_hook(talker_attention_mask, with_kwargs=True)
    # pictures go to the thinker by name: un-prefixed, generate() hands them to the talker too, which rejects them
    pictures = {f"thinker_{key}" if key == "pixel_values" else key: value for key, value in inputs.items()}
    torch.manual_seed(seed)
    try:
        with torch.inference_mode():
            text_ids, wav = model.generate(**pictures, speaker="Chelsie", thinker_max_new_tokens=TEXT_TOKENS,
                                           thinker_do_sample=False, talker_max_new_tokens=codes,
                                           talker_min_new_tokens=codes)
    finally:
        hook.remove()
        mask.remove()
    text = loaded.processor.batch_decode(text_ids[:, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)[0]
    return text, seen, wav.reshape(-1).float().numpy()


@pytest.mark.parametrize("seed", [5, 11, 1])
def test_the_talker_draws_generates_codes(omni, seed, monkeypatch):
    """100 codes (2 s of speech), sampled with generate()'s talker settings from the same seed."""
    answer, codes = tool_reply(omni, 100, seed, monkeypatch)
    text, expected, _ = plain_reply(omni, 100, seed)
    assert answer.text == text and len(expected) == 100
    assert codes == expected
    assert answer.speech_figures["speech_codes"] == 100
    assert len(answer.wav) == 100 * 2 * rm.SPEECH_HOP   # two mel frames a code, 240 samples a frame
    assert 0 < answer.first_audio_s < answer.end - answer.start


def test_on_a_mac_the_talkers_codes_are_drawn_on_the_cpu_too(omni, monkeypatch):
    """MPS's multinomial can draw tokens of probability zero, so on a Mac every sampled token is drawn on the
    CPU, the talker's codes as well as the thinker's text (their samplers come from the runtime). Simulated:
    the runtime a Mac decides, run on this CPU; the seeded codes are generate()'s."""
    loaded, _ = omni
    mac = rm.choose_runtime(loaded.model, "mps", SPEAKING)
    assert mac.draw_on_cpu and "each sampled token drawn on the CPU" in mac.reason
    draws, init = [], rm.Sampler.__init__

    def spy(self, settings, draw_on_cpu=False):
        draws.append(draw_on_cpu)
        init(self, settings, draw_on_cpu)
    monkeypatch.setattr(rm.Sampler, "__init__", spy)
    answer, codes = tool_reply(omni, 60, 11, monkeypatch, runtime=mac)
    assert draws == [True, True]   # the thinker's sampler, then the talker's
    assert codes == plain_reply(omni, 60, 11)[1]


def solved_at_once(token2wav, code):
    """The whole reply's mel from one solve over all its codes (from a reply's noise), and our vocoder's wave."""
    mel = token2wav.solve(rm.SpeechChunks(token2wav, code.shape[1]).noise, code)
    return mel, token2wav.vocode(mel)


def test_the_whole_reply_solved_at_once_is_transformers_token2wav(omni, monkeypatch):
    """Our ODE loop (speaker encoding computed once) over all the codes, then our vocoder call, is transformers'
    token2wav with the same noise: its noise is torch.randn from the global generator seeded 0, ours
    from our own generator seeded 0."""
    import torch
    loaded, _ = omni
    _, codes = tool_reply(omni, 60, 5, monkeypatch)
    model, voice = loaded.model, loaded.model.speaker_map["Chelsie"]
    code = torch.tensor([codes])
    with torch.inference_mode():
        _, wave = solved_at_once(loaded.token2wav, code)
        torch.manual_seed(0)
        theirs = model.token2wav(code, conditioning=voice["cond"].float().expand(1, -1),
                                 reference_mel=voice["ref_mel"].float().expand(1, -1, -1))
    assert torch.equal(wave, theirs.reshape(-1).float())


def test_chunks_made_as_the_codes_come_match_the_whole(omni, monkeypatch):
    """Each chunk's window carries the DiT's whole reach (two blocks back, one ahead), so its mel is the
    whole solve's up to rounding; the vocoder's seams (20 frames of overlap, trimmed) stay small."""
    import torch
    loaded, _ = omni
    answer, codes = tool_reply(omni, 100, 5, monkeypatch)
    code = torch.tensor([codes])
    with torch.inference_mode():
        mel, wave = solved_at_once(loaded.token2wav, code)
        wave = wave.numpy()
        chunked = rm.SpeechChunks(loaded.token2wav, len(codes))
        pieces = chunked.add(code, 60, final=False) + chunked.add(code, 100, final=True)
    assert len(pieces) >= 3   # several chunks, not one
    assert torch.linalg.norm(chunked.mel - mel) <= 1e-5 * torch.linalg.norm(mel)
    assert np.array_equal(np.concatenate(pieces), answer.wav)   # what the tool made as the codes came
    assert len(answer.wav) == len(wave)
    assert np.linalg.norm(answer.wav - wave) <= 1e-3 * np.linalg.norm(wave)


def test_the_reply_is_said_as_it_streams(tiny_models, tmp_path):
    """--verbose shows when the first audio came and the talker's and token2wav's shares; --json records them."""
    import json
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Say something", "--output_audio",
                      tmp_path / "reply.wav", "--max_speech_seconds", "1", "--verbose", "--json", *GREEDY)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    stats = record["stats"]
    assert 0 < stats["first_audio_s"] < stats["ttft_s"] + stats["decode_s"] + stats["speech_s"]
    assert stats["speech_codes"] == 50 and stats["talker_ms_per_code"] > 0 and stats["token2wav_s"] > 0
    assert f"first audio {stats['first_audio_s']:.2f} s" in result.stderr and "talker 50 codes" in result.stderr


def test_play_without_a_sound_device_says_so_before_loading(tiny_models, tmp_path):
    """Here: no PortAudio (or no sounddevice, or no output device): one line naming --play and the way out."""
    result = run_tool("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Say something", "--play", cwd=tmp_path)
    assert_one_line_error(result, 1, "--play", "--output_audio reply.wav")
    assert "Loading" not in result.stderr and list(tmp_path.iterdir()) == []


def test_a_run_is_widened_backwards_to_a_recorded_length_only_where_it_fits():
    """A window or vocoder run over `length` frames ending at `end` starts earlier when that makes it a
    length recorded as a CUDA graph (the smallest that fits), never before the first frame."""
    widened = rm.widened
    graphs = {48: None, 96: None, 168: None, 264: None}
    assert widened(graphs, 100, 300) == 300 - 168
    assert widened(graphs, 96, 300) == 300 - 96
    assert widened(graphs, 100, 150) == 50     # 168 frames would start before the first: as it is
    assert widened(graphs, 300, 400) == 100    # longer than any recorded: as it is
    assert widened({}, 40, 60) == 20
