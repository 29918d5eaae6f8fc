"""Nothing lost, nothing crashes: a matrix of bad inputs and faults, each with its exit code, one
`Error:` line naming the flag or file, no traceback and no file left behind; interrupts (SIGINT,
SIGTERM, a closed pipe); safe defaults (pickles that would run code are refused); and properties
of the flags and the plan over many generated combinations (hypothesis)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run_multimodal as rm
from conftest import CONFIGS, ROOT, SAMPLE_IMAGE, SCRIPT, default_signals, offline_env

SAMPLES = ROOT / "sample_data"
MEDIA = {"--image_path": SAMPLE_IMAGE, "--audio_path": SAMPLES / "question_16k_mono.wav",
         "--video_path": SAMPLES / "cat_clip.mp4"}
IS_ROOT = os.name == "posix" and os.geteuid() == 0


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


def run_in(folder: Path, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The tool as a user runs it, from `folder` (where nothing new may appear)."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=folder, env=env or offline_env(), timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture()
def workdir(tmp_path, tiny_models):
    """A folder with every kind of broken file, and the models the cases point at."""
    for flag, good in MEDIA.items():
        kind = flag.split("_")[0][2:]   # image, audio, video
        suffix = good.suffix
        (tmp_path / f"empty_{kind}{suffix}").write_bytes(b"")
        (tmp_path / f"text_{kind}{suffix}").write_text("these are notes, not a recording or a picture\n")
        (tmp_path / f"truncated_{kind}{suffix}").write_bytes(good.read_bytes()[:3000])
        (tmp_path / f"folder_{kind}{suffix}").mkdir()
    (tmp_path / "existing_folder.wav").mkdir()
    from PIL import Image
    Image.new("RGB", (300, 1), (10, 20, 30)).save(tmp_path / "thin.png")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_models["qwen2"] / name, no_weights / name)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_models["qwen2"] / name, no_tokenizer / name)
    short = tmp_path / "short_context"
    shutil.copytree(tiny_models["qwen2"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    unknown = tmp_path / "unknown_type"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "qwen99_hyper", "architectures": ["X"]}')
    return tmp_path


# (case id, arguments ({omni}, {qwen2}, {vl} and {dir} are filled in), exit code, what the line says,
#  True where the error comes before anything else is printed, so stderr is that one line)
CASES = []
for flag in MEDIA:
    kind = flag.split("_")[0][2:]
    suffix = MEDIA[flag].suffix
    CASES += [
        (f"{kind}-missing", [flag, f"missing{suffix}"], 2, [f"{flag} missing{suffix}: file not found"], True),
        (f"{kind}-folder", [flag, f"folder_{kind}{suffix}"], 2, [f"{flag} folder_{kind}{suffix}: this is a folder"],
         True),
        (f"{kind}-empty", [flag, f"empty_{kind}{suffix}"], 2, [f"{flag} empty_{kind}{suffix}: the file is empty"],
         True),
        (f"{kind}-other-type", [flag, f"text_{kind}{suffix}"], 2, [f"{flag} text_{kind}{suffix}:", "not a"], True),
        (f"{kind}-truncated", [flag, f"truncated_{kind}{suffix}"], 2, [f"{flag} truncated_{kind}{suffix}:"], True),
    ]
NUMBERS = [("--max_new_tokens", ["-5", "0", "many"]), ("--temperature", ["-1", "101", "hot", "nan"]),
           ("--top_p", ["0", "1.5", "x"]), ("--top_k", ["-1", "2.5"]), ("--seed", ["-1", "x"]),
           ("--fps", ["0", "31", "fast"]), ("--max_pixels", ["0", "100", "lots"]),
           ("--max_speech_seconds", ["0", "-3", "601", "long"])]
for flag, values in NUMBERS:
    CASES += [(f"{flag[2:]}={value}", [flag, value], 2, [f"argument {flag}"], True) for value in values]
CASES += [
    ("model-unknown-type", ["--model_id", "{dir}/unknown_type"], 1,
     ["model type 'qwen99_hyper' is not known to transformers"], False),
    ("model-no-weights", ["--model_id", "{dir}/no_weights"], 2, ["--model_id", "no_weights: this folder has no weights"],
     True),
    ("model-no-tokenizer", ["--model_id", "{dir}/no_tokenizer"], 2,
     ["--model_id", "no_tokenizer: this folder has no tokenizer"], True),
    ("model-offline-uncached", ["--model_id", "Qwen/Qwen2.5-Omni-3B"], 1,
     ["--model_id Qwen/Qwen2.5-Omni-3B: not in the Hugging Face cache"], True),
    ("prompt-over-context", ["--model_id", "{dir}/short_context", "--prompt", "hello cat " * 40], 2,
     ["--prompt: the prompt is 228 tokens", "reads at most 96"], False),
    ("image-too-thin", ["--image_path", "thin.png"], 2, ["--image_path thin.png: 300 x 1 pixels is too long"], True),
    ("output-missing-folder", ["--output_audio", "nowhere/reply.wav"], 2,
     ["--output_audio nowhere/reply.wav: the folder nowhere does not exist"], True),
    ("output-existing-folder", ["--output_audio", "existing_folder.wav"], 2,
     ["--output_audio existing_folder.wav: this is a folder"], True),
    ("output-unwritable-folder", ["--output_audio", "/proc/reply.wav" if IS_ROOT else "locked/reply.wav"], 2,
     ["--output_audio", "cannot write in"], True),
    ("output-from-a-text-model", ["--model_id", "{qwen2}", "--output_audio", "reply.wav"], 2, ["--output_audio"],
     True),
    ("force-cpu-and-cuda", ["--force_cpu", "--device", "cuda"], 2, ["--force_cpu conflicts with --device cuda"], True),
    ("quantize-on-apple-silicon", ["--quantize", "4bit", "--device", "mps"], 2,
     ["--quantize 4bit conflicts with --device mps", "never on Apple Silicon"], True),
    ("quantize-on-the-cpu", ["--quantize", "8bit", "--force_cpu"], 2, ["--quantize 8bit conflicts with --force_cpu"],
     True),
    ("hardware-without-dry-run", ["--hardware", "mps:16"], 2, ["--hardware", "only with --dry_run"], True),
    ("audio-in-video-without-video", ["--use_audio_in_video"], 2, ["--use_audio_in_video needs a --video_path"], True),
    ("speaker-without-output", ["--speaker", "Ethan"], 2, ["--speaker", "add --output_audio"], True),
    ("prompt-empty", ["--prompt", "   "], 2, ["--prompt is empty"], True),
]


@pytest.mark.parametrize("case, args, code, says, alone", CASES, ids=[case[0] for case in CASES])
def test_bad_input_and_faults(workdir, tiny_models, case, args, code, says, alone):
    if case == "output-unwritable-folder" and not IS_ROOT:
        (workdir / "locked").mkdir()
        (workdir / "locked").chmod(0o500)
    fill = {"dir": workdir, "omni": tiny_models["qwen2_5_omni"], "qwen2": tiny_models["qwen2"],
            "vl": tiny_models["qwen2_5_vl"]}
    args = [str(arg).format(**fill) for arg in args]
    if "--model_id" not in args:
        args = ["--model_id", tiny_models["qwen2_5_omni"], *args]
    if "--prompt" not in args:
        args += ["--prompt", "What is this?"]
    before = files_under(workdir)
    env = offline_env(HF_HOME=str(workdir / "hf"), HF_HUB_CACHE=str(workdir / "hf" / "hub"))
    result = run_in(workdir, *args, "--max_new_tokens", "4", env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], result.stderr
    for fragment in says:
        assert fragment in lines[-1], lines[-1]
    if alone:
        assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert files_under(workdir) == before   # nothing written, not even a temporary file


@pytest.mark.skipif(IS_ROOT, reason="root reads any file")
@pytest.mark.parametrize("flag", list(MEDIA))
def test_unreadable_media(tmp_path, flag):
    locked = tmp_path / f"locked{MEDIA[flag].suffix}"
    shutil.copy(MEDIA[flag], locked)
    locked.chmod(0)
    result = run_in(tmp_path, "--prompt", "hi", flag, locked)
    assert result.returncode == 2 and result.stderr.strip() == f"Error: {flag} {locked}: permission denied; " \
        "make the file readable"


def test_a_huge_picture_is_scaled_down_not_refused(tiny_models, tmp_path):
    from PIL import Image

    Image.new("RGB", (4000, 3000), (200, 120, 40)).save(tmp_path / "big.png")
    result = run_in(tmp_path, "--model_id", tiny_models["qwen2_5_vl"], "--prompt", "What is this?", "--image_path",
                    "big.png", "--max_new_tokens", "3", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "🖼️ --image_path big.png: 4000 x 3000 pixels is scaled down to about 1.0 megapixels for the model " \
        "(--max_pixels 1003520)" in result.stderr
    # 1148 x 840 pixels after the processor's resize: 41 x 30 = 1230 visual tokens, + markers and text
    assert "prompt 1274 tokens" in result.stderr


def test_an_answer_past_the_context_window_is_cut_to_fit(workdir):
    result = run_in(workdir, "--model_id", workdir / "short_context", "--prompt", "hello", "--max_new_tokens", "100",
                    "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "⚠️ The prompt is 70 tokens and the model reads at most 96: the answer stops after 26 tokens, not " \
        "--max_new_tokens 100" in result.stderr
    assert "26 new tokens" in result.stderr


# --- interrupts ------------------------------------------------------------------------

def start(*args, folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=offline_env(), cwd=folder,
                            preexec_fn=default_signals)


LONG = ("--prompt", "Tell me a long story", "--max_new_tokens", "3500", "--temperature", "0", "--device", "cpu")


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("signum, code, says", [(signal.SIGINT, 130, "⏹️ Interrupted"),
                                                (signal.SIGTERM, 143, "⏹️ Terminated")], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "no_stream"])
def test_a_signal_keeps_what_was_generated(tiny_models, tmp_path, signum, code, says, stream):
    child = start("--model_id", tiny_models["qwen2"], *LONG, *([] if stream else ["--no_stream"]), folder=tmp_path)
    if stream:
        first = child.stdout.read(1)   # the answer has started
        assert first
        time.sleep(0.3)
    else:
        while "Fast decoding" not in child.stderr.readline().decode():   # loaded; the answer is under way
            pass
        time.sleep(0.5)
        first = b""
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    stdout, stderr = first + stdout, stderr.decode()
    assert child.returncode == code, stderr
    assert stderr.rstrip().endswith(says) and "Traceback" not in stderr and "Error" not in stderr
    assert len(stdout.decode(errors="replace").strip()) > 5 and stdout.endswith(b"\n")   # the partial answer
    assert "📈" not in stderr   # no finished-answer line


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_signal_during_a_spoken_reply_leaves_no_file(tiny_models, tmp_path):
    child = start("--model_id", tiny_models["qwen2_5_omni"], "--prompt", "Say something long", "--output_audio",
                  "reply.wav", "--max_new_tokens", "3000", "--temperature", "0", "--device", "cpu", folder=tmp_path)
    assert child.stdout.read(1)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr.decode()
    assert list(tmp_path.iterdir()) == []   # neither reply.wav nor a temporary part of it


def test_a_closed_pipe_ends_quietly(tiny_models, tmp_path):
    """`python run_multimodal.py ... | head -c 10`: the reader goes away; the tool stops, says nothing."""
    child = start("--model_id", tiny_models["qwen2"], *LONG, folder=tmp_path)
    assert len(child.stdout.read(10)) == 10
    child.stdout.close()
    _, stderr = child.communicate(timeout=120)
    stderr = stderr.decode()
    assert child.returncode == 141, stderr
    assert "Traceback" not in stderr and "Error" not in stderr and "Exception ignored" not in stderr
    assert "📈" not in stderr   # it stopped instead of generating the rest into nowhere


# --- safe defaults -----------------------------------------------------------------------

class Payload:
    """Unpickling this creates a file: what a malicious pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def poisoned(path: Path, marker: Path, content: dict | None = None) -> None:
    import torch
    torch.save({**(content or {}), "payload": Payload(marker)}, path)


def test_pickled_weights_that_run_code_are_refused(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    poisoned(folder / "pytorch_model.bin", marker)
    result = run_in(tmp_path, "--model_id", folder, "--prompt", "hi", "--max_new_tokens", "2")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: --model_id {folder}: its weights file holds objects or code that PyTorch will not load safely, so "
        "it was not loaded; use a .safetensors checkpoint from a source you trust")
    assert not marker.exists()


def test_safetensors_are_loaded_rather_than_a_pickle_beside_them(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    marker = tmp_path / "code_ran"
    poisoned(folder / "pytorch_model.bin", marker)
    args = ("--prompt", "Hello cat", "--max_new_tokens", "8", "--temperature", "0", "--device", "cpu")
    result = run_in(tmp_path, "--model_id", folder, *args)
    clean = run_in(tmp_path, "--model_id", tiny_models["qwen2"], *args)
    assert result.returncode == clean.returncode == 0, result.stderr
    assert result.stdout == clean.stdout and result.stdout.strip()
    assert not marker.exists()


def test_a_speaker_file_that_runs_code_is_refused(tiny_models, tmp_path):
    import torch

    folder = tmp_path / "omni"
    shutil.copytree(tiny_models["qwen2_5_omni"], folder)
    marker = tmp_path / "code_ran"
    voices = torch.load(folder / "spk_dict.pt", weights_only=True)
    poisoned(folder / "spk_dict.pt", marker, voices)
    result = run_in(tmp_path, "--model_id", folder, "--prompt", "hi", "--output_audio", "reply.wav")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"Error: --output_audio: {folder / 'spk_dict.pt'} holds more than voices "
                                     "(objects or code that PyTorch will not load safely), so it was not loaded; use "
                                     "a checkpoint from a source you trust")
    assert not marker.exists() and not (tmp_path / "reply.wav").exists()


# --- properties: any flags either plan or fail in one line; the plan stays on the hardware --

SPECS = st.one_of(
    st.builds(lambda gb: f"mps:{gb}", st.integers(4, 192)),
    st.builds(lambda gbs: "cuda:" + ",".join(map(str, gbs)), st.lists(st.integers(2, 141), min_size=1, max_size=4)),
    st.builds(lambda gb: f"cpu:{gb}", st.integers(2, 512)),
    st.sampled_from(["tpu:8", "cuda:", "mps:16,16", "cpu:-4", "gpu"]))   # not specs
VALUES = {
    "--max_new_tokens": st.one_of(st.integers(-3, 100_000).map(str), st.sampled_from(["", "ten", "1e3"])),
    "--temperature": st.one_of(st.floats(-2, 150).map(str), st.sampled_from(["nan", "inf", "hot"])),
    "--top_p": st.one_of(st.floats(-1, 2).map(str), st.sampled_from(["nan", "-inf"])),
    "--top_k": st.integers(-5, 200).map(str),
    "--seed": st.integers(-2, 2**31).map(str),
    "--max_pixels": st.integers(-1, 20_000_000).map(str),
    "--device": st.sampled_from(["auto", "mps", "cuda", "cpu", "tpu"]),
    "--dtype": st.sampled_from(["auto", "float16", "bfloat16", "float32", "int4"]),
    "--quantize": st.sampled_from(["none", "4bit", "8bit", "2bit"]),
}
FLAG_SETS = st.lists(st.sampled_from(sorted(VALUES) + ["--force_cpu"]), unique=True, max_size=5)
MODELS = ["Qwen--Qwen2.5-0.5B-Instruct", "Qwen--Qwen2.5-VL-3B-Instruct", "Qwen--Qwen2.5-Omni-3B"]


def devices_of(spec: str) -> set[str]:
    kind = spec.split(":")[0]
    return {"cpu"} | ({kind} if kind != "cpu" else set())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec=SPECS, model=st.sampled_from(MODELS), flags=FLAG_SETS)
def test_any_flags_either_plan_or_fail_in_one_line(data, spec, model, flags):
    argv = ["--model_id", str(CONFIGS / model), "--prompt", "Describe this", "--dry_run", "--json",
            "--hardware", spec]
    for flag in flags:
        argv += [flag] if flag == "--force_cpu" else [flag, data.draw(VALUES[flag], label=flag)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = rm.main(argv)
        except SystemExit as exc:   # argparse's own usage errors
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("Error: "), lines
        assert out.getvalue() == ""
        return
    assert code in (0, 1), err.getvalue()   # the plan ran: it fits (0) or a real run would refuse (1)
    plan = json.loads(out.getvalue())
    assert plan["device"] in devices_of(spec), (spec, plan["device"])
    if plan["gpus"]:
        assert plan["device"] == "cuda" and set(plan["gpus"]) <= set(range(len(spec.split(",")))), plan["gpus"]
    assert plan["fits"] == (code == 0)


@settings(max_examples=300, deadline=None)
@given(spec=SPECS.filter(lambda s: not s.startswith(("tpu", "gpu")) and s not in ("cuda:", "mps:16,16", "cpu:-4")),
       model=st.sampled_from(MODELS + ["Qwen--Qwen2.5-1.5B-Instruct", "Qwen--Qwen2.5-3B-Instruct"]),
       device=st.sampled_from(["auto", "mps", "cuda", "cpu"]), dtype=st.sampled_from(["auto", "float16", "bfloat16",
                                                                                     "float32"]),
       quantize=st.sampled_from(["none", "4bit", "8bit"]), speech=st.booleans(),
       max_new_tokens=st.integers(1, 200_000), images=st.lists(st.tuples(st.integers(56, 8000), st.integers(56, 8000)),
                                                               max_size=3))
def test_the_plan_never_picks_a_device_the_machine_lacks(real_facts, spec, model, device, dtype, quantize, speech,
                                                           max_new_tokens, images):
    hw = rm.simulated_hardware(spec)
    if device != "auto" and device not in devices_of(spec):
        return   # refused before planning (check_device_available), tested in the matrix above
    facts = real_facts[model]
    request = rm.Request(device=device, dtype=dtype, quantize=quantize, speech=speech and facts.kind == "omni",
                         max_new_tokens=max_new_tokens, image_sizes=tuple(images) if facts.vision else ())
    plan = rm.choose_plan(hw, facts, request)
    assert plan.device in devices_of(spec)
    assert set(plan.gpus) <= set(range(len(hw.cuda)))
    assert plan.quantization is None or plan.device == "cuda"   # never bitsandbytes off CUDA (never on a Mac)
    assert plan.device != "mps" or dtype != "auto" or plan.dtype == "float16"   # float16 on MPS unless told
