"""Section 5, the model: where it is (a folder, the Hugging Face cache, the Hub), what it takes in, and
its exact size from config.json on the meta device."""

from __future__ import annotations

import json

import run_multimodal as rm
from conftest import CONFIGS, GREEDY, fake_hub_cache, offline_env, run_tool, stat
from references import reference_answer


def test_exact_parameter_counts_match_the_published_sizes(real_facts):
    # configs/SOURCES.md: 0.494 B, 1.544 B, 3.086 B, 3.755 B; Omni 5.537 B = 4.703 + 0.385 + 0.449
    assert real_facts["Qwen--Qwen2.5-0.5B-Instruct"].total == 494_032_768
    assert real_facts["Qwen--Qwen2.5-1.5B-Instruct"].total == 1_543_714_304
    assert real_facts["Qwen--Qwen2.5-3B-Instruct"].total == 3_085_938_688
    assert real_facts["Qwen--Qwen2.5-VL-3B-Instruct"].total == 3_754_622_976
    omni = real_facts["Qwen--Qwen2.5-Omni-3B"]
    assert omni.total == 5_537_120_640
    assert omni.parameters == {"thinker": 4_703_464_448, "talker": 384_604_928, "token2wav": 449_051_264}


def test_tied_embeddings_are_counted_once(real_facts):
    # Qwen2.5-0.5B ties lm_head to the 151936 x 896 embedding; counted twice it would be 0.630 B.
    assert real_facts["Qwen--Qwen2.5-0.5B-Instruct"].total == 630_167_424 - 151_936 * 896


def test_model_kinds_from_real_configs():
    def info(name):
        return rm.model_info_from_config(name, json.loads((CONFIGS / name / "config.json").read_text()))

    omni = info("Qwen--Qwen2.5-Omni-3B")
    assert (omni.kind, omni.inputs) == ("omni", {"text", "image", "video", "audio"})
    vl = info("Qwen--Qwen2.5-VL-3B-Instruct")
    assert (vl.kind, vl.inputs) == ("multimodal", {"text", "image", "video"})
    text = info("Qwen--Qwen2.5-3B-Instruct")
    assert (text.kind, text.inputs) == ("text", {"text"})


def test_what_loads_is_said(real_facts):
    omni = real_facts["Qwen--Qwen2.5-Omni-3B"]
    info = rm.ModelInfo("Qwen/Qwen2.5-Omni-3B", "qwen2_5_omni", "omni", frozenset({"text"}))
    assert rm.describe_model(info, omni, ("thinker",)) == (
        "🧠 Qwen/Qwen2.5-Omni-3B (qwen2_5_omni): 5.54 B parameters; loading the thinker only (4.70 B): no speech "
        "output was asked for, so the talker and token2wav stay on disk")


def test_parameter_counts_for_people():
    assert [rm.format_count(n) for n in (5_537_120_640, 243_872, 183_456_000, 12)] == \
        ["5.54 B", "243.9 K", "183.5 M", "12"]


def test_hub_id_from_the_offline_cache(tiny_models, tmp_path):
    """A model id resolves through the Hugging Face cache exactly as a real download would."""
    cache, _ = fake_hub_cache(tmp_path, tiny_models["qwen2"])
    expected, prompt_tokens = reference_answer(tiny_models["qwen2"], "text", "Hello cat")
    result = run_tool("--model_id", "tiny/qwen2", "--prompt", "Hello cat", *GREEDY,
                      env=offline_env(HF_HUB_CACHE=str(cache)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and stat(result.stderr, "tokens ·") == prompt_tokens
    assert "🧠 tiny/qwen2 (qwen2)" in result.stderr

    # Without HF_HUB_OFFLINE the tool finds out by itself that the Hub does not answer
    # (here: a closed local port) and uses the cache, instead of sitting through retries.
    env = offline_env(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9")
    del env["HF_HUB_OFFLINE"]
    result = run_tool("--model_id", "tiny/qwen2", "--prompt", "Hello cat", *GREEDY, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "📴 http://127.0.0.1:9 cannot be reached: using the local Hugging Face cache only" in result.stderr


def test_hf_home_that_is_not_a_folder_is_one_line(tmp_path):
    """Every download would fail in it: said before the Hub is asked."""
    from conftest import assert_one_line_error

    (tmp_path / "hf").write_text("not a folder")
    result = run_tool("--model_id", "Qwen/Qwen2.5-0.5B-Instruct", "--prompt", "hi",
                      env=offline_env(HF_HOME=str(tmp_path / "hf")))
    assert_one_line_error(result, 2, f"Error: HF_HOME={tmp_path / 'hf'} is not a folder; point it at the folder for "
                                     "the Hugging Face cache, or unset it", alone=True)


def test_context_window_and_vision_are_read_from_config_json(real_facts):
    """What the media checks need before any model class is built, from config.json alone: the same figures
    the model's own config gives."""
    info = rm.resolve_model(str(CONFIGS / "Qwen--Qwen2.5-VL-3B-Instruct"))
    assert info.context_window == 128_000 and info.vision == rm.VisionFacts(14, 2, 1280)
    omni = rm.resolve_model(str(CONFIGS / "Qwen--Qwen2.5-Omni-3B"))
    assert omni.context_window == 32_768 and real_facts["Qwen--Qwen2.5-Omni-3B"].vision == omni.vision
    assert rm.resolve_model(str(CONFIGS / "Qwen--Qwen2.5-0.5B-Instruct")).vision is None
