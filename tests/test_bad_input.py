"""Bad input: one line on stderr naming the flag or file and the fix, the right exit code,
no traceback, and (for usage errors) no torch or transformers imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE_IMAGE, offline_env, run_tool


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert result.stdout == ""


def heavy_modules_after(*args: str) -> list[str]:
    """Run main(ARGS) in a fresh interpreter; which heavy modules did it import?"""
    code = ("import sys, run_multimodal\n"
            "try:\n    run_multimodal.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                            env=offline_env())
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture()
def not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are notes, not a picture\n")
    return path


@pytest.fixture()
def truncated_image(tmp_path):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(SAMPLE_IMAGE.read_bytes()[:4000])
    return path


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", "hi", "--image_path", "missing.jpg"], ["--image_path missing.jpg: file not found"]),
    (["--prompt", "hi", "--image_path", "sample_data"], ["--image_path sample_data: this is a folder"]),
    (["--prompt", "   "], ["--prompt is empty"]),
    ([], ["--prompt is required"]),
    (["--prompt", "hi", "--max_new_tokens", "0"], ["--max_new_tokens", "must be 1 or more, got 0"]),
    (["--prompt", "hi", "--max_new_tokens", "-5"], ["--max_new_tokens", "must be 1 or more"]),
    (["--prompt", "hi", "--max_new_tokens", "many"], ["--max_new_tokens", "'many' is not a whole number"]),
    (["--prompt", "hi", "--device", "tpu"], ["--device", "invalid choice: 'tpu'"]),
    (["--prompt", "hi", "--dtype", "int4"], ["--dtype", "invalid choice: 'int4'"]),
    (["--prompt", "hi", "--temperature", "-1"], ["--temperature", "must be in [0, 100]"]),
    (["--prompt", "hi", "--top_p", "0"], ["--top_p", "must be in (0, 1]"]),
    (["--prompt", "hi", "--top_p", "1.5"], ["--top_p", "must be in (0, 1]"]),
    (["--prompt", "hi", "--top_k", "-1"], ["--top_k", "must be 0 or more"]),
    (["--prompt", "hi", "--fps", "0"], ["--fps", "must be in (0, 30]"]),
    (["--prompt", "hi", "--fps", "fast"], ["--fps", "'fast' is not a number"]),
    (["--prompt", "hi", "--max_speech_seconds", "-3"], ["--max_speech_seconds", "must be in (0, 600]"]),
    (["--prompt", "hi", "--force_cpu", "--device", "cuda"], ["--force_cpu conflicts with --device cuda"]),
    (["--prompt", "hi", "--model_id", "./no/such/folder"], ["--model_id ./no/such/folder: no such folder"]),
    (["--prompt", "hi", "--model_id", "tests"], ["--model_id tests: this folder has no config.json"]),
    (["--prompt", "hi", "--model_id", "not a valid id"], ["--model_id not a valid id", "valid Hugging Face id"]),
])
def test_usage_errors(args, fragments):
    assert_one_line_error(run_tool(*args), 2, *fragments)


def test_file_that_is_not_an_image(not_an_image):
    result = run_tool("--prompt", "hi", "--image_path", not_an_image)
    assert_one_line_error(result, 2, f"--image_path {not_an_image}: not a readable image")


def test_truncated_image(truncated_image):
    result = run_tool("--prompt", "hi", "--image_path", truncated_image)
    assert_one_line_error(result, 2, f"--image_path {truncated_image}: not a readable image")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(SAMPLE_IMAGE.read_bytes())
    path.chmod(0)
    assert_one_line_error(run_tool("--prompt", "hi", "--image_path", path), 2, "permission denied")


def test_an_image_for_a_text_only_model(tiny_models):
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "hi", "--image_path", SAMPLE_IMAGE)
    assert_one_line_error(result, 2, "--image_path:", "is a text-only model and cannot see images")


def test_hub_model_offline_and_not_cached(tmp_path):
    env = offline_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    result = run_tool("--prompt", "hi", "--model_id", "Qwen/Qwen2.5-Omni-3B", env=env)
    assert_one_line_error(result, 1, "--model_id Qwen/Qwen2.5-Omni-3B: not in the Hugging Face cache",
                          "pass a local model folder")


def test_cuda_asked_for_where_there_is_none(tiny_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = run_tool("--model_id", tiny_models["qwen2"], "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(result, 2, "--device cuda: no CUDA GPU is available here")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen99_hyper", "architectures": ["X"]}')
    result = run_tool("--prompt", "hi", "--model_id", tmp_path)
    assert_one_line_error(result, 1, "model type 'qwen99_hyper' is not known to transformers",
                          "pip install -U transformers")


def test_a_model_type_that_cannot_generate_text(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    result = run_tool("--prompt", "hi", "--model_id", tmp_path)
    assert_one_line_error(result, 1, "cannot generate text with a 'vit' model")


def test_debug_shows_the_traceback():
    result = run_tool("--prompt", "hi", "--image_path", "missing.jpg", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize("args", [
    ["--help"],
    ["--prompt", "hi", "--max_new_tokens", "0"],
    ["--prompt", "hi", "--device", "tpu"],
    ["--prompt", ""],
    ["--prompt", "hi", "--image_path", "missing.jpg"],
    ["--prompt", "hi", "--model_id", "./no/such/folder"],
])
def test_help_and_usage_errors_do_not_import_torch(args):
    assert heavy_modules_after(*args) == "[]"


def test_help_lists_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--model_id", "--prompt", "--image_path", "--max_new_tokens", "--force_cpu", "--device",
                 "--dtype", "--quantize", "--system_prompt", "--temperature", "--top_p", "--top_k", "--seed",
                 "--no_stream", "--trust_remote_code", "--self_test", "--debug"):
        assert flag in result.stdout
