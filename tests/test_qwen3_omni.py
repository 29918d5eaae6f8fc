"""Qwen3-Omni speaking: a tiny checkpoint of Qwen3-Omni-30B-A3B-Instruct's structure (the MoE thinker, the MoE
talker with its code predictor, code2wav), and the plans for the real one."""

from __future__ import annotations

import json

import numpy as np
import pytest

import run_multimodal as rm
from conftest import CONFIGS, assert_one_line_error, run_tool

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
    assert 0 < len(samples) == len(expected) <= 2 * 24000
    assert np.abs(samples - np.clip(expected, -1, 1)).max() <= 1 / 32767 + 1e-6   # a 16-bit WAV's rounding


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
