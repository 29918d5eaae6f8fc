"""Section 13, a serving engine (--server), against a real one: `transformers serve` started here on
127.0.0.1 with the tiny text and VL checkpoints, asked through the tool and directly through the openai
client; answers, streaming, the chat's history and every error a user can meet. The statuses
transformers serve never sends (401, 404 for a wrong path, 503) come from a small HTTP server here."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import run_multimodal as rm
from conftest import SAMPLE_IMAGE, SCRIPT, assert_one_line_error, default_signals, offline_env, run_tool

GREEDY = ("--temperature", "0", "--max_new_tokens", "12")
SECRET = "sk-test-must-never-be-printed-1234"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_engine(*model) -> tuple[subprocess.Popen, str]:
    """`transformers serve` on a free port of 127.0.0.1 (on the CPU, offline), once it answers /health;
    with `model`, that model preloaded and the only one served."""
    import urllib.request
    port = free_port()
    command = shutil.which("transformers") or str(rm.Path(sys.executable).parent / "transformers")
    engine = subprocess.Popen([command, "serve", *map(str, model), "--host", "127.0.0.1", "--port", str(port),
                               "--device", "cpu", "--dtype", "float32"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=offline_env())
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return engine, url + "/v1"
        except OSError:
            if engine.poll() is not None:
                raise RuntimeError("transformers serve did not start")
            time.sleep(0.5)
    engine.kill()
    raise RuntimeError("transformers serve did not answer /health within 120 s")


@pytest.fixture(scope="module")
def engine():
    process, url = start_engine()
    yield url
    process.terminate()
    process.wait(timeout=30)


def engines_own_answer(url: str, model, messages: list[dict]) -> tuple[str, int]:
    """What the engine streams for the request, asked directly: (text, prompt tokens). Streamed, as the tool
    asks: a tiny random model's answer may end inside a UTF-8 character, which the engine's stream leaves
    out and its whole answer shows as replacement characters."""
    import openai
    client = openai.OpenAI(base_url=url, api_key="none")
    parts, usage = [], None
    for chunk in client.chat.completions.create(model=str(model), messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        parts += [choice.delta.content for choice in chunk.choices if choice.delta and choice.delta.content]
    return "".join(parts), usage.prompt_tokens


def ask(url: str, *args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The tool with --server URL, an API key in the environment (which must never be printed)."""
    return run_tool("--server", url, *args, env={**(env or offline_env()), "OPENAI_API_KEY": SECRET}, timeout=300,
                    **kwargs)


def test_a_greedy_answer_is_the_engines_own(engine, tiny_models):
    model = tiny_models["qwen2"]
    expected, prompt_tokens = engines_own_answer(engine, model, [{"role": "user", "content": "Hello cat"}])
    result = ask(engine, "--model_id", model, "--prompt", "Hello cat", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert expected.strip() and result.stdout == expected + "\n"
    assert f"📈 {engine}: prompt {prompt_tokens} tokens · first token" in result.stderr
    assert "12 new tokens at" in result.stderr and "load" not in result.stderr.split("📈")[1]
    assert SECRET not in result.stdout + result.stderr


def test_a_picture_goes_as_a_data_url_scaled_to_max_pixels(engine, tiny_models):
    model, max_pixels = tiny_models["qwen2_5_vl"], 50_000
    image = rm.load_image(str(SAMPLE_IMAGE))
    part = rm.image_part(image, max_pixels)
    from PIL import Image
    sent = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert sent.width * sent.height <= max_pixels < image.width * image.height
    assert abs(sent.width / sent.height - image.width / image.height) < 0.01
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe it"}]}]
    expected, _ = engines_own_answer(engine, model, messages)
    result = ask(engine, "--model_id", model, "--prompt", "Describe it", "--image_path", SAMPLE_IMAGE,
                 "--max_pixels", str(max_pixels), *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_json_records_the_engine_and_never_the_key(engine, tiny_models):
    model = tiny_models["qwen2"]
    expected, prompt_tokens = engines_own_answer(engine, model, [{"role": "user", "content": "Hello cat"}])
    result = ask(engine, "--model_id", model, "--prompt", "Hello cat", "--json", "--seed", "3", *GREEDY)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] == expected and record["plan"] is None
    assert record["stats"]["prompt_tokens"] == prompt_tokens and record["stats"]["new_tokens"] == 12
    assert record["stats"]["ttft_s"] > 0 and record["stats"]["load_s"] is None
    reproducibility = record["reproducibility"]
    assert (reproducibility["server"], reproducibility["model_id"], reproducibility["served_model"]) == \
        (engine, str(model), str(model))
    assert reproducibility["sampling"] == {"max_tokens": 12, "temperature": 0.0, "seed": 3}
    assert SECRET not in result.stdout + result.stderr


def test_the_chat_sends_its_history(engine, tiny_models, tmp_path):
    model = tiny_models["qwen2"]
    first, _ = engines_own_answer(engine, model, [{"role": "user", "content": "Hello cat"}])
    second, _ = engines_own_answer(engine, model, [{"role": "user", "content": "Hello cat"},
                                                   {"role": "assistant", "content": first},
                                                   {"role": "user", "content": "And the dog?"}])
    result = ask(engine, "--model_id", model, "--interactive", *GREEDY, cwd=tmp_path,
                 stdin="Hello cat\nAnd the dog?\n/save chat.json\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == first + "\n" + second + "\n"
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["text"] for m in saved["messages"]] == ["Hello cat", first, "And the dog?", second]
    assert SECRET not in (tmp_path / "chat.json").read_text() + result.stderr


def test_no_torch_and_no_transformers_on_this_path(engine, tiny_models, tmp_path):
    """Modules that refuse to import stand in for torch and transformers: the run must not need them."""
    for name in ("torch", "transformers"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} was imported on the --server path')\n")
    result = ask(engine, "--model_id", tiny_models["qwen2_5_vl"], "--prompt", "Describe it", "--image_path",
                 SAMPLE_IMAGE, *GREEDY, env=offline_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_an_unknown_model_lists_what_the_engine_serves(engine, tiny_models):
    engines_own_answer(engine, tiny_models["qwen2"], [{"role": "user", "content": "Hi"}])   # loaded: listed
    result = ask(engine, "--model_id", "nobody/no-such-model", "--prompt", "Hi", *GREEDY)
    assert_one_line_error(result, 2, "--model_id nobody/no-such-model:", f"{engine} does not serve it",
                          f"it serves: {tiny_models['qwen2']}")


def test_nothing_listening_is_said_at_once():
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.perf_counter()
    result = ask(url, "--model_id", "any", "--prompt", "Hi")
    assert_one_line_error(result, 1, f"--server {url}: cannot connect", "check the address and that the engine is "
                                                                        "running")
    assert time.perf_counter() - started < 60   # no retries, no long wait


def streaming(url: str, model, folder) -> subprocess.Popen:
    """A long sampled answer, streamed, from a run in the background."""
    return subprocess.Popen([sys.executable, str(SCRIPT), "--server", url, "--model_id", str(model), "--prompt",
                             "Tell me a long story", "--max_new_tokens", "5000", "--temperature", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=folder,
                            env=offline_env(), preexec_fn=default_signals)


def test_the_engine_dying_mid_answer_keeps_the_partial_answer(tiny_models, tmp_path):
    engine, url = start_engine(tiny_models["qwen2"])
    try:
        child = streaming(url, tiny_models["qwen2"], tmp_path)
        first = child.stdout.read(20)
    finally:
        engine.kill()
        engine.wait()
    stdout, stderr = child.communicate(timeout=120)
    stderr = stderr.decode()
    assert child.returncode == 1, stderr
    assert len(first) == 20 and (first + stdout).endswith(b"\n")   # the answer so far, its line ended
    assert stderr.strip().splitlines()[-1].startswith(f"Error: --server {url}: the connection broke mid-answer")
    assert "Traceback" not in stderr


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_keeps_the_partial_answer(engine, tiny_models, tmp_path):
    child = streaming(engine, tiny_models["qwen2"], tmp_path)
    first = child.stdout.read(20)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr.decode()
    assert len(first) == 20 and (first + stdout).endswith(b"\n")
    assert stderr.decode().rstrip().endswith("⏹️ Interrupted") and "Traceback" not in stderr.decode()


class Refusing(http.server.BaseHTTPRequestHandler):
    """Statuses transformers serve does not send: /auth/... 401, /down/... 503, anything else 404."""

    def do_POST(self):
        if self.path.startswith(("/html", "/empty")):   # a web page, or a stream with nothing in it, with a 200
            html = self.path.startswith("/html")
            data = b"<!doctype html><html><body>Welcome to my router</body></html>" if html else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8" if html else "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        status, body = ((401, {"error": {"message": "Incorrect API key provided"}}) if self.path.startswith("/auth")
                        else (503, {"error": {"message": "The engine is overloaded"}}) if self.path.startswith("/down")
                        else (404, {"detail": "Not Found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def refusing():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("path, says", [
    ("/auth/v1", ["the engine refused the API key (401); put a key it accepts in OPENAI_API_KEY"]),
    ("/down/v1", ["the engine failed (503): The engine is overloaded"]),
    ("/wrong", ["not found (404: Not Found); an OpenAI base URL usually ends in /v1"]),
    ("/html/v1", ["what came back is not an answer over the OpenAI protocol (an HTML page); give the engine's OpenAI "
                  "base URL (it usually ends in /v1)"]),
    ("/empty/v1", ["what came back is not an answer over the OpenAI protocol (an empty stream)"])],
    ids=["401", "503", "404", "html", "empty"])
def test_refusals_are_one_line(refusing, path, says):
    url = refusing + path
    result = ask(url, "--model_id", "any", "--prompt", "Hi")
    assert_one_line_error(result, 1, f"--server {url}:", *says)
    assert SECRET not in result.stderr


@pytest.mark.parametrize("model, spec, command", [
    ("Qwen--Qwen2.5-Omni-3B", "cpu:4", "--tensor-parallel-size 1 --max-model-len 4096"),      # fits no local device
    ("Qwen--Qwen2.5-7B-Instruct", "cuda:8,8", "--tensor-parallel-size 4 --max-model-len 4096"),   # a GPU server
], ids=["too-big-here", "gpu-server"])
def test_a_dry_run_prints_the_engine_command_and_the_server_command(model, spec, command):
    """Sized from the bfloat16 weights: 15.2 GB of Qwen2.5-7B over 8 GB GPUs takes 4 (its 28 heads split
    in 4, not 8); the Omni thinker is what an engine serves."""
    from conftest import CONFIGS
    result = run_tool("--model_id", CONFIGS / model, "--prompt", "Hi", "--dry_run", "--hardware", spec)
    lines = [line for line in result.stderr.splitlines() if "vllm serve" in line or "--server" in line]
    assert f"vllm serve {CONFIGS / model} {command}" in lines[0]
    assert f"--server http://SERVER:8000/v1 --model_id {CONFIGS / model}" in lines[1]
    assert result.returncode == (1 if spec == "cpu:4" else 0)
