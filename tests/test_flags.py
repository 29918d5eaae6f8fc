"""Section 3, the flags: the parser, and Options, built once from them with what is derived from them."""

from __future__ import annotations

import pytest

import run_multimodal as rm
from conftest import run_tool


def options(*argv: str) -> rm.Options:
    return rm.options_from_args(rm.build_parser().parse_args(list(argv)))


def test_help_lists_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--model_id", "--prompt", "--image_path", "--max_new_tokens", "--force_cpu", "--device",
                 "--dtype", "--quantize", "--system_prompt", "--temperature", "--top_p", "--top_k", "--seed",
                 "--no_stream", "--trust_remote_code", "--self_test", "--debug"):
        assert flag in result.stdout


def test_options_are_the_flags_with_what_derives_from_them():
    plain = options("--prompt", " Hello ")
    assert (plain.prompt, plain.system_prompt, plain.speaks, plain.show, plain.fast_decode) == \
        ("Hello", None, False, rm.SHOW_STREAM, True)
    assert plain.sampling == rm.Sampling(rm.DEFAULT_MAX_NEW_TOKENS)
    spoken = options("--prompt", "Hi", "--output_audio", "~/reply.wav", "--max_speech_seconds", "2.5")
    assert spoken.speaks and spoken.output_audio.is_absolute() and spoken.output_audio.name == "reply.wav"
    assert spoken.system_prompt == rm.SPEECH_SYSTEM_PROMPT and not spoken.custom_system_prompt
    assert spoken.speech_codes == 125   # 50 codes a second
    own = options("--prompt", "Hi", "--output_audio", "r.wav", "--system_prompt", "Be brief.")
    assert own.system_prompt == "Be brief." and own.custom_system_prompt
    machine = options("--prompt", "Hi", "--json", "--temperature", "0", "--top_k", "5", "--no_fast_decode")
    assert machine.show == rm.SHOW_NONE and not machine.fast_decode
    assert machine.sampling == rm.Sampling(rm.DEFAULT_MAX_NEW_TOKENS, temperature=0, top_k=5)
    assert options("--prompt", "Hi", "--no_stream").show == rm.SHOW_ONCE
    assert options("--dry_run").prompt is None and options("--self_test").prompt is None
    assert options("--force_cpu", "--prompt", "x").forced and not options("--prompt", "x").forced


def test_flags_that_contradict_each_other():
    with pytest.raises(rm.UsageError, match="--force_cpu conflicts with --device mps"):
        options("--prompt", "Hi", "--force_cpu", "--device", "mps")
    with pytest.raises(rm.UsageError, match="--max_speech_seconds is about the spoken reply"):
        options("--prompt", "Hi", "--max_speech_seconds", "3")


def test_sampling_flags():
    assert rm.Sampling(16).generate_kwargs() == {"max_new_tokens": 16}
    greedy = rm.Sampling(16, temperature=0).generate_kwargs()
    assert greedy["do_sample"] is False
    assert rm.Sampling(16, temperature=0.7, top_k=20).generate_kwargs() == {
        "max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_k": 20}
