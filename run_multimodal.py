#!/usr/bin/env python3
"""Run Qwen's multimodal models (Qwen2.5-Omni, Qwen2.5-VL, Qwen3 Omni/VL, Qwen Instruct)
on the machine you have, with one command.

    python run_multimodal.py --prompt "Describe this image" --image_path photo.jpg

It detects the hardware (Apple Silicon and MPS, CUDA GPUs, RAM, the CPU's bf16
support), sizes the model exactly from its config.json, plans device, dtype,
quantization and memory (weights, KV cache, media tokens) against the device's real
budget before loading anything, loads through transformers, decodes with its own
static-cache decoder, streams the answer to stdout and says on stderr what it found,
what it chose and why, and how fast it ran. If memory still runs out on a GPU it
retries once on the CPU.

    python run_multimodal.py --dry_run --hardware mps:16          # would it fit a 16 GB Mac?
    python run_multimodal.py --audio_path question.wav --image_path photo.jpg --output_audio reply.wav
    python run_multimodal.py --interactive                          # a chat; /help inside
    python run_multimodal.py --prompt "..." --json                  # one JSON object for scripts

Exit codes: 0 done, 1 failed at run time, 2 bad input (flags, files), 130 interrupted (Ctrl-C),
141 stdout closed by its reader, 143 terminated (SIGTERM).

Code map, in the order run() calls it (sections are marked "# --- N. name ---"):
  3  flags ............ build_parser(), options_from_args() -> Options (every flag, checked once)
  4  media in ......... load_media() -> Media, check_modalities(); the spoken reply's checks before loading:
                        check_speech_outputs(), choose_speech() -> Speech
  5  the model ........ resolve_model() -> ModelInfo, model_facts() -> ModelFacts (exact sizes)
  6  hardware ......... detect_hardware() / simulated_hardware() -> Hardware
  7  the plan ......... choose_plan() -> Plan: device choose_device(), dtype choose_dtype(), quantization
                        choose_quantization(), memory estimate_memory() and place(); retry_plan(); dry_run()
  8  loading .......... load() -> Loaded: load_model(), and what it decided, once: choose_runtime() -> Runtime
  9  a token .......... Decoding (prefill, first token, FastDecoder steps, tokens back through a HostQueue),
                        Sampler (the next token); fast_generate() consumes it
  10 a spoken reply ... fast_speech(): SpokenReply (the talker, a Decoding too), SpeechChunks (the schedule)
                        over Token2Wav (the solve and the vocoder, their CUDA graphs)
  11 an answer ........ generate_answer() -> Answer, streamed by a PrintingStreamer; Stats
  12 one turn ......... answer() -> Outcome (stats, WAV written by write_wav()), with_fallbacks()
  13 a serving engine . --server: server_answer() over the OpenAI protocol (no torch on this path)
  14 chat ............. chat() / server_chat(), chat_loop(), its commands in CHAT_COMMANDS
  15 self-test ........ self_test()
  16 run .............. run(), main() (errors become one line and an exit code)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import itertools
import json
import logging
import math
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from urllib.parse import urlparse

# torch, transformers, huggingface_hub and PIL are imported where they are first
# needed, so that --help and usage errors answer at once.

# --- 1. constants ----------------------------------------------------------------------

# What the flags default to
DEFAULT_MODEL_ID = "Qwen/Qwen2.5-Omni-3B"
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_PIXELS = 1280 * 28 * 28    # Qwen's recommended image budget: at most 1280 visual tokens
DEFAULT_FPS = 2.0                      # Qwen's default: two video frames a second
MAX_FPS = 30.0
DEFAULT_SPEAKER = "Chelsie"
SMALLER_MODEL_HINT = "Qwen/Qwen2.5-1.5B-Instruct"
SMALLEST_TEMPERATURE = 1e-6            # below it, the scores divided by the temperature overflow

# Exit codes (141 and 143 as a shell reports SIGPIPE and SIGTERM: 128 + the signal)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_OUTPUT_CLOSED, EXIT_TERMINATED = 141, 143

# The size policy's tiers (Apple Silicon: which models go on MPS), applied to the exact count of what loads
SMALL_MAX_PARAMETERS = 2.5e9   # "small (about 2B and under)": always MPS on Apple Silicon
MEDIUM_MAX_PARAMETERS = 6.5e9  # "medium (3B-6B)": MPS with >= 16 GB of RAM; above: "large (7B and up)"
MEDIUM_MPS_MIN_RAM_GB = 16
LARGE_MPS_MIN_RAM_GB = 32

# The memory estimate: bytes per value, and the margin beyond weights and KV cache, stated
GB = 1024**3
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
FLOAT32_COMPONENTS = frozenset({"token2wav"})             # Qwen2.5-Omni runs its vocoder in float32
METAL_KEPT = ("talker", "token2wav")   # Metal quantizes the thinker alone: a spoken reply's parts keep their precision
ACTIVATION_FIXED_BYTES = 256 * 1024**2   # allocator slack, kernels' workspaces
ACTIVATION_WEIGHT_FRACTION = 0.05        # buffers that grow with the model (rotary tables, norms, logits)
PREFILL_VALUES_PER_TOKEN = 4             # x intermediate size: the MLP's widest activations at prefill
VISION_VALUES_PER_PATCH = 64             # x vision hidden size: the image encoder's activations
CHAT_TEMPLATE_TOKENS = 48                # Qwen's chat template and default system prompt, in tokens
CUDA_CONTEXT_BYTES = GB // 2             # what a CUDA context takes from a simulated card's memory

# Media: what Qwen's processors take
MIN_PIXELS = 56 * 56
MAX_ASPECT_RATIO = 200                 # the image processor refuses anything longer and thinner
MAX_IMAGE_PIXELS = 256_000_000         # larger pictures are refused before decoding
HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypheim", b"ftypheis", b"ftypmif1", b"ftypmsf1")
VIDEO_MAX_PIXELS = 768 * 28 * 28       # Qwen's per-frame defaults for video
VIDEO_MIN_PIXELS = 128 * 28 * 28
AUDIO_SAMPLE_RATE = 16_000             # Qwen's audio encoders take 16 kHz mono
AUDIO_WINDOW_SECONDS = 30              # the audio processor's window: longer recordings are split
AUDIO_WINDOW_SAMPLES = AUDIO_WINDOW_SECONDS * AUDIO_SAMPLE_RATE
WAV_UNKNOWN_SIZE = 0x7FFFF000          # a WAV header's size this large was written to a pipe, unknown (SoX, ffmpeg)

# Speech out (Qwen2.5-Omni's talker and token2wav)
SPEECH_SAMPLE_RATE = 24_000
TALKER_MAX_NEW_TOKENS = 4096             # speech codes the talker may generate by default
TALKER_CODES_PER_SECOND = 50             # its codes per second of speech (4096 codes = 81.9 s)
QWEN3_CODES_PER_SECOND = 12.5            # Qwen3-Omni's talker: a frame of 16 codes per 1,920 samples at 24 kHz
QWEN3_CHUNK_FRAMES = (2, 4, 8, 16)       # its chunks of sound: a short first one (0.16 s) comes soon, then longer
CODE2WAV_CONTEXT_FRAMES = 12             # frames its convolutions rerun before a chunk (they reach 9.1 back)
CODE2WAV_AHEAD_FRAMES = 1                # frames after a chunk they read (its transposed convolutions look ahead)
QWEN3_CODES_LAG = 4                      # frames the device may run ahead of the codes read back (where it may)
SPEAKING_MODEL_TYPES = ("qwen2_5_omni", "qwen3_omni_moe")
# Speech in chunks: token2wav's DiT attends within blocks of 24 mel frames (2 per code), one block ahead
# and two back across its layers; its vocoder makes SPEECH_HOP samples of each mel frame
SPEECH_CONTEXT_BACK_BLOCKS, SPEECH_CONTEXT_AHEAD_BLOCKS = 2, 1
# The chunks' sizes in blocks: a short first one (0.24 s of speech, 24 codes) comes soon; each next one
# is made while the one before plays; from the fourth on, longer chunks (1.92 s) cost less a second of speech
SPEECH_CHUNK_SCHEDULE = (1, 2, 4, 8)
VOCODER_OVERLAP_FRAMES = 20     # mel frames run on either side of a chunk, their samples trimmed
VOCODER_FLOOR_DB = -115         # the vocoder's decibel floor (transformers' Qwen2.5-Omni BigVGAN forward)
SPEECH_HOP = 240
# A spoken conversation (--voice): Silero VAD's windows, the silence that ends a turn, the speech kept either side
VOICE_WINDOW = 512                     # samples at 16 kHz: 32 ms
DEFAULT_END_SILENCE_MS = 450           # the detector is sure ~0.45 s after speech ends; assistants wait 0.3-0.7 s
VOICE_PAD_MS = 30
SPEECH_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                        "perceiving auditory and visual inputs, as well as generating text and speech.")

# Model folders and the Hub
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")   # how a multimodal model reads media
HUB_PROBE_TIMEOUT_S = 3.0

# A serving engine (--server): the OpenAI Chat Completions protocol
SERVER_CONNECT_TIMEOUT_S = 5.0     # nothing listening is said within seconds
SERVER_READ_TIMEOUT_S = 300.0      # between two pieces of an answer (a first request may load the model)
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
# Flags about this machine, which mean nothing to an engine, and their defaults
LOCAL_ONLY_FLAGS = {"device": "auto", "dtype": "auto", "quantize": "none", "force_cpu": False, "compile": False,
                    "no_fast_decode": False, "dry_run": False, "hardware": None, "trust_remote_code": False,
                    "self_test": False, "fps": DEFAULT_FPS, "no_kv_reuse": False}
SELF_TEST_FLAGS = ("self_test", "device", "dtype", "force_cpu", "no_fast_decode", "compile", "debug")   # it honours
ENGINE_GPU_GB = 80                 # the GPU an engine command is sized for, unless --hardware names one
ENGINE_MEMORY_SHARE = 0.9          # vLLM's default gpu_memory_utilization

# Decoding
FAST_DECODER_TYPES = ("qwen2", "qwen2_5_vl_text", "qwen2_5_omni_text", "qwen2_5_omni_talker",   # Qwen2's layer
                      "qwen3_omni_moe_text", "qwen3_omni_moe_talker_text",   # Qwen3's: q/k norms, experts
                      "qwen3_omni_moe_talker_code_predictor")
COMPILING_DEVICES = ("cuda",)   # --compile gained nothing on a CPU; on MPS torch.compile is experimental
STREAM_LAG_TOKENS = 8           # how far an accelerator may run ahead of the text on screen
SHOW_STREAM, SHOW_ONCE, SHOW_NONE = "stream", "once", "none"   # the answer on stdout: as it comes, at the end, never

# Out of memory, as the devices word it; Metal also refuses one buffer past its largest ("Invalid buffer
# size") and fails a command buffer with "Insufficient Memory (...kIOGPUCommandBufferCallbackErrorOutOfMemory)"
OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "failed to allocate", "not enough memory",
                         "cannot allocate memory", "invalid buffer size", "insufficient memory",
                         "kiogpucommandbuffercallbackerroroutofmemory")

# Quantizers: their names, where a checkpoint saved with them runs ("cuda", "mps"; None: not in transformers),
# the packages their kernels need, and the bytes one weight takes with its share of its group's scales
@dataclasses.dataclass(frozen=True)
class Quantizer:
    label: str
    device: str | None
    packages: tuple[str, ...]
    bytes_per_weight: object   # (bits, group size, the compute dtype's bytes) -> bytes


QUANTIZERS = {   # nf4 and a float32 absmax per 64, or int8; fp8 and a float32 scale per 128 x 128 block; AWQ and GPTQ:
    #              a float16 scale and a packed zero point per group; Metal and MLX: a scale and a bias per group
    "bitsandbytes": Quantizer("bitsandbytes", "cuda", ("bitsandbytes",), lambda b, g, w: 0.5 + 4 / 64 if b == 4 else 1),
    "fp8": Quantizer("FP8", "cuda", (), lambda b, g, w: 1 + 4 / (128 * 128)),
    "awq": Quantizer("AWQ", "cuda", ("gptqmodel",), lambda b, g, w: b / 8 + (2 + b / 8) / g),
    "gptq": Quantizer("GPTQ", "cuda", ("gptqmodel", "optimum"), lambda b, g, w: b / 8 + (2 + b / 8) / g),
    "metal": Quantizer("Metal", "mps", ("kernels",), lambda b, g, w: b / 8 + 2 * w / g),
    "mlx": Quantizer("MLX", None, (), lambda b, g, w: b / 8 + 2 * w / g)}


def quantizer_facts(method: str) -> Quantizer:
    """A quantization method's facts; one this table does not know (but transformers does) runs nowhere here."""
    return QUANTIZERS.get(method) or dataclasses.replace(QUANTIZERS["mlx"], label=method)


# Apple Silicon: what each part needs of macOS, and the Mac --hardware mps:N stands for without qualifiers
MPS_MACOS = (12, 3)            # PyTorch's MPS backend at all
MPS_BF16_MACOS = (14, 0)       # bfloat16 in PyTorch's MPS backend (MPSGraph)
MPS_CONV3D_MACOS = (13, 2)     # Conv3d on MPS: the Qwen-VL and Omni vision towers' patch embedding
SIMULATED_MAC_CHIP, SIMULATED_MACOS = "M3", (26, 0)
METAL_GROUP_SIZE = 64          # transformers' MetalConfig: a scale and a bias per 64 weights


# --- 2. errors and output ------------------------------------------------------------------

class UsageError(Exception):
    """Bad input the user can fix (a flag, a file): exit code 2."""


class RunError(Exception):
    """A failure at run time (memory, missing package, network): exit code 1."""


class Terminated(BaseException):
    """SIGTERM: stop as Ctrl-C does (the answer so far stays printed, no half-written file)."""


class OutputClosed(BaseException):
    """Whoever read stdout stopped reading (`| head -c 10`): stop generating and end quietly."""


class NonFiniteLogits(RuntimeError):
    """The logits turned NaN or infinite: the model's activations overflowed its dtype (float16 with
    Qwen). `text` is what was printed of the answer before."""

    def __init__(self, text: str = ""):
        super().__init__("the logits turned NaN or infinite")
        self.text = text


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while answering (or a spoken reply stopped); `text` is the answer so far, as far as it was heard
    where it was spoken (a chat keeps it); `first_sound` and `silenced`: when its sound began and was stopped
    (perf_counter(); None where it had none)."""

    def __init__(self, text: str, first_sound: float | None = None, silenced: float | None = None):
        super().__init__(text)
        self.text, self.first_sound, self.silenced = text, first_sound, silenced


def _terminate(signum, frame) -> None:
    raise Terminated()


def one_line(text, limit: int = 0) -> str:
    """An exception's text (or any) on one line, its lines joined; cut to `limit` characters where given (the
    words of a library, which can run to pages)."""
    line = " ".join(str(text).split())
    return line[:limit - 1] + "…" if limit and len(line) > limit else line


def say(message: str) -> None:
    """A line for people: stderr, so that stdout carries only the answer."""
    print(message, file=sys.stderr, flush=True)


def write_stdout(text: str) -> None:
    """The answer, as it comes. If the reader has gone, stdout is pointed at /dev/null (so that
    Python's own flush at exit stays quiet too) and OutputClosed stops the run."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise OutputClosed() from None


def write_output(path: Path, data: bytes, what: str) -> None:
    """`data` into the file `what` names (the flag or command and the path). A regular file, new or not (a
    symlink's target too), is written atomically: into a temporary file in its folder, renamed into place, so
    that an interrupted run never leaves a half-written file under the user's name; a new one gets the user's
    umask. A FIFO, a device or /dev/stdout is written in place (nothing in /dev is ever replaced). A full disk or
    a reader that went away is one line naming the file."""
    target = path.resolve()   # a symlink's target (a regular file: special files are opened by their own name)
    try:
        if path.exists() and not path.is_file():
            with open(path, "wb") as stream:
                stream.write(data)
            return
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except BrokenPipeError as exc:
        raise RunError(f"{what}: its reader went away before all was written") from exc
    except OSError as exc:
        raise RunError(f"{what}: could not be written ({exc.strerror or one_line(exc)}); free some space or "
                       "choose another file") from exc


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, MPS 'out of memory', failed CPU allocations."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OUT_OF_MEMORY_MARKERS)


DAMAGED = ("the logits turned NaN or infinite in {dtype}, so the answer would be wrong; the checkpoint looks damaged "
           "(check its files, or try another copy)")


def end_answer(show: str, text: str, stopped: BaseException | None = None) -> None:
    """The answer's last line: the newline after a streamed answer, or with --no_stream the whole answer (with
    --json nothing: the JSON carries it). An answer `stopped` part-way (locally or by a serving engine) keeps
    its line too; with --no_stream it is printed where it ends for good (Ctrl-C, SIGTERM, a broken connection,
    an error), not where it is redone (out of memory, logits that overflowed: the retry prints its own)."""
    if stopped is not None and (not text or isinstance(stopped, OutputClosed)):
        return
    if show == SHOW_STREAM:
        write_stdout("\n")
    elif show == SHOW_ONCE and not (isinstance(stopped, NonFiniteLogits) or is_out_of_memory(stopped)):
        write_stdout(text + "\n")


# --- 3. flags ------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line naming the flag (exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"Error: {message} (see --help)\n")


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be {maximum:,} at most, got {value:,}")
        return value
    return parse


def _float_in(low: float, high: float, low_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (low < value if low_open else low <= value) or not value <= high or value != value:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low:g}, {high:g}], got {text}")
        return value
    return parse


def _temperature(text: str) -> float:
    value = _float_in(0, 100, low_open=False)(text)
    if 0 < value < SMALLEST_TEMPERATURE:   # the scores divided by it overflow
        raise argparse.ArgumentTypeError(f"{text} is too small to divide the scores by (they overflow); give 0 for "
                                         "greedy decoding, the same choice")
    return value


def _hardware_spec(text: str) -> str:
    parse_hardware_spec(text)
    return text.strip().lower()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="run_multimodal.py", epilog="Example: python run_multimodal.py --prompt \"Describe this image\" "
                                         "--image_path sample_data/sample_image.jpg",
        description="Run Qwen's multimodal and text models on this machine: picks device, dtype and quantization "
                    "from the hardware and the model's exact size, streams the answer to stdout.")
    add = parser.add_argument_group("model and input").add_argument
    add("--model_id", default=DEFAULT_MODEL_ID,
        help=f"Hugging Face model id or local model folder (default: {DEFAULT_MODEL_ID})")
    add("--prompt", help="the question or instruction; '-' reads it from stdin")
    add("--image_path", action="append", default=[], metavar="PATH",
        help="an image to show the model; give the flag again for more images")
    add("--audio_path", action="append", default=[], metavar="PATH", help="a recording for the model to hear (WAV, "
        "FLAC, OGG, MP3; any rate, any channels); repeat for more (Omni models)")
    add("--video_path", action="append", default=[], metavar="PATH",
        help="a video for the model to watch (MP4, MOV, WebM); repeat for more")
    add("--fps", type=_float_in(0, MAX_FPS, low_open=True), default=DEFAULT_FPS,
        help=f"video frames sampled per second (default: {DEFAULT_FPS:g})")
    add("--use_audio_in_video", action="store_true",
        help="also let an Omni model hear the videos' sound tracks, as Qwen recommends")
    add("--system_prompt", help="replace the model's default system prompt")
    add("--max_pixels", type=_int_at_least(MIN_PIXELS), default=DEFAULT_MAX_PIXELS,
        help="larger images are scaled down to this many pixels; each 28x28 pixels is one token "
             f"(default: {DEFAULT_MAX_PIXELS}, at most {DEFAULT_MAX_PIXELS // 784} tokens an image)")
    add = parser.add_argument_group("generation").add_argument
    add("--max_new_tokens", type=_int_at_least(1), default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS})")
    add("--temperature", type=_temperature,
        help="sampling temperature; 0 means greedy (default: the model's own setting)")
    add("--top_p", type=_float_in(0, 1, low_open=True), help="nucleus sampling, in (0, 1] (default: the model's own)")
    add("--top_k", type=_int_at_least(0), help="sample among the k likeliest tokens; 0 turns it off")
    add("--seed", type=_int_at_least(0, 2**32 - 1), help="random seed, for repeatable sampling")
    add("--no_stream", action="store_true", help="print the answer once at the end")
    add("--no_fast_decode", action="store_true",
        help="decode with transformers' generate() instead of the tool's static-cache decoder")
    add("--no_kv_reuse", action="store_true", help="in a chat, compute the whole conversation again at every turn "
                                                    "instead of only what is new (for troubleshooting)")
    add("--compile", action="store_true", help="NVIDIA GPUs: compile the decoder's layers with torch.compile first "
                                               "(seconds), then decode faster: for long answers and chats")
    add("--output_audio", metavar="PATH",
        help="also speak the answer into this WAV file (24 kHz mono; Qwen2.5-Omni only)")
    add("--play", action="store_true", help="also speak the answer through the default output device as it is "
                                            "made (Qwen2.5-Omni only; with --output_audio too, both)")
    add("--max_speech_seconds", type=_float_in(0, 600, low_open=True), metavar="SECONDS",
        help=f"the longest spoken reply (default: the model's {TALKER_MAX_NEW_TOKENS} speech codes, "
             f"{TALKER_MAX_NEW_TOKENS / TALKER_CODES_PER_SECOND:.0f} s)")
    add("--speaker", help=f"the voice of the spoken reply (default: {DEFAULT_SPEAKER}; Qwen2.5-Omni ships Chelsie "
                          "and Ethan)")
    add = parser.add_argument_group("hardware").add_argument
    add("--device", choices=("auto", "mps", "cuda", "cpu"), default="auto",
        help="where to run (default: auto, by the size policy)")
    add("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto", help="weights' precision "
        "(default: auto: bfloat16 where it runs: CUDA from Ampere on, MPS from macOS 14, CPUs with native bf16)")
    add("--quantize", choices=("none", "4bit", "8bit"), default="none", help="quantize the weights as they load: "
        "bitsandbytes on NVIDIA GPUs, Metal (MLX's kernels) on Apple Silicon (default: none, unless it only fits so)")
    add("--force_cpu", action="store_true", help="run on the CPU, for troubleshooting")
    add = parser.add_argument_group("planning, output and chat").add_argument
    add("--dry_run", action="store_true", help="print the plan (device, dtype, memory per component, whether it "
                                               "fits) without loading any weights; only config.json is read")
    add("--hardware", type=_hardware_spec, metavar="SPEC",
        help="with --dry_run: plan for another machine instead of this one: mps:16 (a Mac with 16 GB), cuda:24 or "
             "cuda:24,24 (GPUs with that many GB), cpu:32 (32 GB of RAM, no GPU)")
    add("--json", action="store_true", help="print one JSON object on stdout instead of the streamed answer: the "
        "answer, the plan, the figures and a reproducibility record (with --dry_run: the plan)")
    add("--verbose", action="store_true",
        help="per-stage timings on stderr: load, media decode, encoding and prefill, decode, speech")
    add("--interactive", action="store_true", help="chat: load the model once and answer message after message "
        "(/help inside lists the commands); also when no --prompt is given and stdin is a terminal")
    add("--voice", action="store_true", help="talk to it: listen on the microphone, answer aloud as the answer is "
                                             "made, turn after turn (Qwen2.5-Omni; Enter stops a reply, Ctrl-D leaves)")
    add("--barge_in", action="store_true", help="with --voice: speaking over a reply stops it (with headphones; "
                                                "through speakers the microphone would hear the reply)")
    add("--end_silence_ms", type=_int_at_least(100, 5000), metavar="MS", help="with --voice: the silence that ends "
        f"your turn (default: {DEFAULT_END_SILENCE_MS})")
    add = parser.add_argument_group("a serving engine instead of this machine").add_argument
    add("--server", metavar="URL", help="send the request to a serving engine over the OpenAI protocol (vLLM, "
        "SGLang, transformers serve, Ollama, LM Studio): its base URL, such as http://gpu-box:8000/v1; --model_id "
        "names the served model")
    add("--api_key_env", metavar="NAME", default=DEFAULT_API_KEY_ENV,
        help=f"with --server: the environment variable that holds its API key (default: {DEFAULT_API_KEY_ENV})")
    add = parser.add_argument_group("other").add_argument
    add("--trust_remote_code", action="store_true", help="allow a model repository to run its own Python code (off "
                                                         "by default: it runs with your permissions)")
    add("--self_test", action="store_true", help="check this installation offline with a tiny built-in model, then exit")
    add("--debug", action="store_true", help="show tracebacks and transformers' warnings")
    return parser


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the answer's tokens; None keeps the model's own generation_config."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_new_tokens: int = 0       # benchmarks force a length; a user never needs to

    def generate_kwargs(self) -> dict:
        """Overrides of the model's generation_config; nothing given keeps the model's defaults."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.temperature == 0:
            return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        chosen = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        chosen = {k: v for k, v in chosen.items() if v is not None}
        return {**kwargs, "do_sample": True, **chosen} if chosen else kwargs


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything the flags ask for, checked and derived once (options_from_args)."""
    model_id: str = DEFAULT_MODEL_ID
    prompt: str | None = None            # read from stdin for '-'; None in a chat without a first message
    image_paths: tuple[str, ...] = ()
    audio_paths: tuple[str, ...] = ()
    video_paths: tuple[str, ...] = ()
    fps: float = DEFAULT_FPS
    use_audio_in_video: bool = False
    system_prompt: str | None = None     # the user's, or Qwen's own for speech; None keeps the template's
    custom_system_prompt: bool = False   # --system_prompt was given
    max_pixels: int = DEFAULT_MAX_PIXELS
    sampling: Sampling = Sampling()
    seed: int | None = None
    show: str = SHOW_STREAM              # SHOW_STREAM, SHOW_ONCE (--no_stream) or SHOW_NONE (--json)
    answer_to_stderr: bool = False       # stdout carries the spoken reply (--output_audio /dev/stdout)
    fast_decode: bool = True             # --no_fast_decode turns it off
    kv_reuse: bool = True                # a chat keeps what the model computed (--no_kv_reuse: not)
    compile_layers: bool = False         # --compile
    output_audio: Path | None = None
    play: bool = False                   # --play: hear the reply as it is made
    speaker: str | None = None
    speech_codes: int = TALKER_MAX_NEW_TOKENS   # the most speech codes the talker may generate
    device: str = "auto"                 # auto, mps, cuda, cpu
    dtype: str = "auto"                  # auto, float16, bfloat16, float32
    quantize: str = "none"               # none, 4bit, 8bit
    force_cpu: bool = False
    dry_run: bool = False
    hardware: str | None = None          # --hardware SPEC, a machine to plan for
    json: bool = False
    verbose: bool = False
    interactive: bool = False
    voice: bool = False                  # --voice: a spoken conversation from the microphone
    barge_in: bool = False
    end_silence_ms: int = DEFAULT_END_SILENCE_MS
    trust_remote_code: bool = False
    self_test: bool = False
    debug: bool = False
    server: str | None = None            # --server URL: a serving engine answers instead of this machine
    api_key_env: str = DEFAULT_API_KEY_ENV

    @property
    def speaks(self) -> bool:
        """An Omni model speaks the answer too: the talker and token2wav load."""
        return self.output_audio is not None or self.play

    @property
    def forced(self) -> bool:
        """The user chose the device: the plan warns instead of choosing another."""
        return self.force_cpu or self.device != "auto"


def options_from_args(args: argparse.Namespace) -> Options:
    """The flags as Options: contradictions refused, the prompt read, derived values computed once."""
    check_flags(args)
    one_shot = args.dry_run or args.json or args.output_audio or args.play   # flags for one answer only
    interactive = not args.self_test and not args.voice and (
        args.interactive or (args.prompt is None and not one_shot and stdin_is_terminal()))
    prompt = None if args.self_test or args.voice or (interactive and args.prompt is None) else read_prompt(args)
    speech = bool(args.output_audio or args.play or args.voice)
    derived = dict(
        prompt=prompt, interactive=interactive, image_paths=tuple(args.image_path), audio_paths=tuple(args.audio_path),
        video_paths=tuple(args.video_path), custom_system_prompt=bool(args.system_prompt),
        system_prompt=args.system_prompt or (SPEECH_SYSTEM_PROMPT if speech else None),
        sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k),
        show=SHOW_NONE if args.json else SHOW_ONCE if args.no_stream else SHOW_STREAM,
        fast_decode=not args.no_fast_decode, compile_layers=args.compile, kv_reuse=not args.no_kv_reuse,
        play=args.play or args.voice, end_silence_ms=args.end_silence_ms or DEFAULT_END_SILENCE_MS,
        output_audio=Path(args.output_audio).expanduser() if args.output_audio else None,
        answer_to_stderr=bool(args.output_audio) and is_stdout(Path(args.output_audio)),
        speech_codes=math.ceil(args.max_speech_seconds * TALKER_CODES_PER_SECOND) if args.max_speech_seconds
        else TALKER_MAX_NEW_TOKENS)
    same = {field.name: getattr(args, field.name) for field in dataclasses.fields(Options)
            if field.name not in derived and hasattr(args, field.name)}   # --device is Options.device, ...
    return Options(**same, **derived)


def is_stdout(path: Path) -> bool:
    """Whether writing to `path` writes to this process's stdout (/dev/stdout, or the file it is redirected to)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def is_stdin(path: Path) -> bool:
    """Whether reading `path` reads this process's stdin (/dev/stdin, /dev/fd/0)."""
    try:
        return sys.stdin is not None and os.path.samestat(os.stat(path), os.fstat(sys.stdin.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def check_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other, caught before anything else happens."""
    if args.server:
        check_server_flags(args)
    if args.self_test:
        check_self_test_flags(args)
    stdin_paths = [path for path in (*args.image_path, *args.audio_path, *args.video_path) if is_stdin(Path(path))]
    if args.prompt == "-" and stdin_paths:
        raise UsageError(f"--prompt - and {stdin_paths[0]} both read stdin; give the prompt as --prompt TEXT")
    if args.interactive and args.output_audio and Path(args.output_audio).exists() and \
            not Path(args.output_audio).is_file():
        raise UsageError(f"--output_audio {args.output_audio} with --interactive: a chat writes a WAV a turn "
                         "(reply-1.wav, reply-2.wav ...); give a file name")
    if args.voice:
        check_voice_flags(args)
    for flag in ("barge_in", "end_silence_ms"):
        if getattr(args, flag) and not args.voice:
            raise UsageError(f"--{flag} is about a spoken conversation; add --voice")
    if args.interactive and args.prompt == "-":
        raise UsageError("--prompt - with --interactive: the chat reads its messages from stdin; give the first "
                         "message as --prompt TEXT")
    if args.force_cpu and args.device not in ("auto", "cpu"):
        raise UsageError(f"--force_cpu conflicts with --device {args.device}; give one of them")
    if args.quantize != "none" and (args.force_cpu or args.device == "cpu"):
        where = "--force_cpu" if args.force_cpu else f"--device {args.device}"
        raise UsageError(f"--quantize {args.quantize} conflicts with {where}: quantization runs on NVIDIA GPUs "
                         "(bitsandbytes) and on Apple Silicon's GPU (Metal); drop one of them")
    if args.hardware and not args.dry_run:
        raise UsageError("--hardware describes another machine, so it works only with --dry_run")
    if args.interactive:
        for flag in ("json", "dry_run"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} works with one --prompt, not with --interactive")
    if args.json and args.output_audio and is_stdout(Path(args.output_audio)):
        raise UsageError(f"--output_audio {args.output_audio} with --json: both would go to stdout; write the WAV to "
                         "a file, or drop --json")
    if args.use_audio_in_video and not args.video_path:
        raise UsageError("--use_audio_in_video needs a --video_path whose sound track to use")
    for flag in ("speaker", "max_speech_seconds"):
        if getattr(args, flag) and not (args.output_audio or args.play or args.voice):
            raise UsageError(f"--{flag} is about the spoken reply; add --output_audio reply.wav or --play")


def check_voice_flags(args: argparse.Namespace) -> None:
    """--voice: a conversation spoken and heard here, which these flags would contradict."""
    for flag, why in (("server", "a serving engine's audio is not wired up"), ("json", "it answers turn after turn"),
                      ("output_audio", "the replies are heard as they are made"), ("interactive", "it is a chat "
                      "already"), ("prompt", "speak your first question")):
        if getattr(args, flag) and not (flag == "json" and args.dry_run):   # the plan as JSON is fine
            raise UsageError(f"--{flag} with --voice: {why}; drop --{flag}")


def check_self_test_flags(args: argparse.Namespace) -> None:
    """--self_test asks its own tiny model a fixed question: of the flags only those about this machine apply."""
    defaults = vars(build_parser().parse_args([]))
    given = [f"--{name}" for name, value in vars(args).items()
             if name not in SELF_TEST_FLAGS and value != defaults.get(name, value)]
    if given:
        raise UsageError(f"{', '.join(given)} with --self_test: the self-test asks its own tiny model a fixed "
                         f"question, so {'this means' if len(given) == 1 else 'these mean'} nothing there; drop "
                         f"{'it' if len(given) == 1 else 'them'}")


def check_server_flags(args: argparse.Namespace) -> None:
    """--server: a URL; no flag about this machine; no spoken reply (its audio output is not wired up)."""
    try:
        url = urlparse(args.server)
        ok = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:   # a port past 65535, an IPv6 address left open
        ok = False
    if not ok:
        raise UsageError(f"--server {args.server}: not a URL; give the engine's OpenAI base URL, such as "
                         "http://localhost:8000/v1")
    given = [f"--{name}" for name, default in LOCAL_ONLY_FLAGS.items() if getattr(args, name) != default]
    if given:
        raise UsageError(f"{', '.join(given)} with --server: the engine decides where and how the model runs, "
                         f"so {'this means' if len(given) == 1 else 'these mean'} nothing there; drop "
                         f"{'it' if len(given) == 1 else 'them'}")
    for flag in ("output_audio", "play", "speaker", "max_speech_seconds"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} with --server: a spoken reply from a serving engine is not supported (the "
                             "protocol's audio output is not wired up); drop it, or run Qwen2.5-Omni here")


def read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt is None:
        if args.dry_run:
            return None
        raise UsageError("--prompt is required (or --prompt - to read it from stdin)")
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("--prompt is empty; give the question or instruction to answer")
    return prompt.strip()


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def read_stdin(line: bool = False) -> str:
    """All of stdin (or its next `line`, '' at its end) as UTF-8 text; a closed stdin, or bytes that are not
    UTF-8, is a UsageError."""
    if sys.stdin is None:
        raise UsageError("--prompt -: stdin is closed; pipe the prompt in, or give it as --prompt TEXT")
    data = sys.stdin.buffer.readline() if line else sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = "that line" if line else "--prompt -: stdin"
        raise UsageError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it first (iconv)") \
            from exc


# --- 4. media in, and the spoken reply out: decoded and checked before loading --------------

def _require(module: str, package: str, flag: str):
    """Import a media library, or say which package the flag needs (a partial install, a pinned env)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RunError(f"{flag} needs the {package} package: pip install {package} "
                       "(or pip install -r requirements.txt)") from exc


def _readable_file(flag: str, path: str, what: str):
    """The file behind a media flag, or a UsageError that names the flag and the problem. A regular file is
    its Path; a pipe or a device (`<(...)`, /dev/stdin), which can be read only once, is its bytes."""
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(f"{flag} {path}: file not found; check the path")
    if file.is_dir():
        raise UsageError(f"{flag} {path}: this is a folder; give {what}")
    if not os.access(file, os.R_OK):
        raise UsageError(f"{flag} {path}: permission denied; make the file readable")
    if file.is_file():
        if file.stat().st_size == 0:
            raise UsageError(f"{flag} {path}: the file is empty; give {what}")
        return file
    with open(file, "rb") as stream:   # what a pipe holds, whole, as the decoders need to seek in it
        data = stream.read()
    if not data:
        raise UsageError(f"{flag} {path}: nothing came through it; give {what}")
    return io.BytesIO(data)


def _head(source, size: int) -> bytes:
    """The first bytes of a file or of bytes read from a pipe."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:size]
    with open(source, "rb") as handle:
        return handle.read(size)


def load_image(path: str, flag: str = "--image_path"):
    """An 8-bit RGB PIL image, upright per its EXIF orientation (JPEG, PNG, WebP, TIFF, AVIF; HEIC and HEIF with
    pillow-heif), or a UsageError naming the file. Pictures past MAX_IMAGE_PIXELS are refused before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:   # HEIC and HEIF, which Apple's cameras write
        from pillow_heif import register_heif_opener
        register_heif_opener()
        heif = True
    except ImportError:
        heif = False
    source = _readable_file(flag, path, "an image file")
    Image.MAX_IMAGE_PIXELS = None   # the size is checked here, before the pixels are decoded
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UsageError(f"{flag} {path}: {width} x {height} is more than {MAX_IMAGE_PIXELS / 1e6:.0f} "
                                 "megapixels, which this tool does not open (the model sees at most about 1 "
                                 "megapixel); scale it down first")
            image.load()
            picture = _eight_bit_rgb(ImageOps.exif_transpose(image))
    except PermissionError as exc:
        raise UsageError(f"{flag} {path}: permission denied; make the file readable") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if _head(source, 12)[4:12] in HEIF_BRANDS and not heif:
            raise RunError(f"{flag} {path}: a HEIC/HEIF photo, which needs the pillow-heif package: pip install "
                           "pillow-heif (or pip install -r requirements.txt)") from exc
        raise UsageError(f"{flag} {path}: not a readable image (JPEG, PNG, WebP, HEIC, ...); "
                         "check that the file is a complete picture") from exc
    width, height = picture.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UsageError(f"{flag} {path}: {width} x {height} pixels is too long and thin for Qwen's image "
                         f"processor (at most {MAX_ASPECT_RATIO}:1); crop it")
    return picture


def _eight_bit_rgb(image):
    """RGB in 8 bits: 16-bit and 32-bit greyscale (PNG, TIFF) and float pictures are scaled to 0-255, not clipped
    to white as a plain convert() would."""
    import numpy as np
    from PIL import Image
    if not image.mode.startswith(("I", "F")):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 255.0 if image.mode == "I" else 1.0)
    low = min(float(values.min()), 0.0)
    return Image.fromarray(np.uint8(np.clip((values - low) / (top - low) * 255 + 0.5, 0, 255))).convert("RGB")


def load_audio(path: str, flag: str = "--audio_path"):
    """A recording as 16 kHz mono float32 samples (downmixed, resampled with soxr): WAV, FLAC, OGG and MP3 through
    soundfile, anything else PyAV decodes (M4A/AAC and ALAC voice memos, Opus, WMA...) through PyAV."""
    import numpy as np
    soundfile = _require("soundfile", "soundfile", flag)
    soxr = _require("soxr", "soxr", flag)
    source = _readable_file(flag, path, "an audio file")
    head = _head(source, 12)
    declared = int.from_bytes(head[4:8], "little") + 8 if head[:4] == b"RIFF" and head[8:12] == b"WAVE" else 0
    size = len(source.getvalue()) if isinstance(source, io.BytesIO) else source.stat().st_size
    if declared - 8 < WAV_UNKNOWN_SIZE and declared > size:   # sizes a writer to a pipe could not know are fine
        raise UsageError(f"{flag} {path}: the file is cut short ({size:,} of the {declared:,} bytes its header "
                         "promises); check that the file is a complete recording")
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
        mono = samples.mean(axis=1)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):   # not libsndfile's: PyAV's?
        mono, rate = _decode_sound(source, flag, path), AUDIO_SAMPLE_RATE
        if mono is None:
            raise UsageError(f"{flag} {path}: this file has no sound track; give a recording") from None
    if not len(mono):
        raise UsageError(f"{flag} {path}: the recording has no samples; give one with sound in it")
    if not np.isfinite(mono).all():
        raise UsageError(f"{flag} {path}: the recording holds samples that are not numbers (NaN or infinite); "
                         "export it again from the program that made it")
    if rate != AUDIO_SAMPLE_RATE:
        mono = soxr.resample(mono, rate, AUDIO_SAMPLE_RATE)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_sound(source, flag: str, path: str, limit: int | None = None):
    """A file's first sound track as mono float32 samples at AUDIO_SAMPLE_RATE, through PyAV (at most `limit`
    samples decoded); None if it has none."""
    import numpy as np
    av = _require("av", "av", flag)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with av.open(source if isinstance(source, io.BytesIO) else str(source)) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
                if limit is not None and sum(map(len, chunks)) >= limit:
                    break
            else:
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.FFmpegError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: not a readable recording (WAV, FLAC, MP3, M4A, ...); "
                         "check that the file is complete") from exc
    return (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32))[:limit]


def audio_pieces(samples, what: str) -> list:
    """A recording cut into the audio processor's 30 s windows, which would otherwise keep only the first."""
    pieces = [samples[start:start + AUDIO_WINDOW_SAMPLES] for start in range(0, len(samples), AUDIO_WINDOW_SAMPLES)]
    if len(pieces) > 1:
        say(f"🎧 {what} is {len(samples) / AUDIO_SAMPLE_RATE:.1f} s long: the model hears it as {len(pieces)} "
            f"pieces of at most {AUDIO_WINDOW_SECONDS} s, in order")
    return pieces


@dataclasses.dataclass
class Video:
    frames: object            # numpy uint8 (frames, height, width, 3), upright, an even number of frames
    fps: float                # frames sampled per second of the clip
    audio: object | None      # its sound track's first AUDIO_WINDOW_SECONDS as 16 kHz mono float32, when asked for
    path: str = ""            # the file, which a serving engine is sent whole

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def load_video(path: str, fps: float, with_audio: bool, flag: str = "--video_path", max_pixels: int = DEFAULT_MAX_PIXELS,
               budget=None) -> Video:
    """MP4, MOV, WebM... decoded with PyAV, frame by frame: frames sampled at `fps`, turned upright from the
    display rotation phones record, and scaled to the per-frame pixel budget as they come, so that memory grows
    with the frames kept, not with the file. `budget(frames, width, height)` refuses a clip that would not fit
    the model's context, before the rest is decoded. The first AUDIO_WINDOW_SECONDS of its sound track if asked."""
    import numpy as np
    av = _require("av", "av", flag)
    source = _readable_file(flag, path, "a video file")
    frames, scale = [], None
    try:
        with av.open(source if isinstance(source, io.BytesIO) else str(source)) as container:
            if not container.streams.video:
                raise UsageError(f"{flag} {path}: this file has no video track; give a video "
                                 "(or pass a sound file with --audio_path)")
            stream = container.streams.video[0]
            rate, next_time = float(stream.average_rate or 25), 0.0
            seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
            for index, frame in enumerate(container.decode(stream)):
                if (frame.time if frame.time is not None else index / rate) + 1e-6 < next_time:
                    continue
                if scale is None:   # the first frame kept: the clip's size, and whether it fits at all
                    scale = min(1.0, math.sqrt(video_max_pixels(max_pixels) / (frame.width * frame.height)))
                    size = (max(1, int(frame.width * scale)), max(1, int(frame.height * scale)))
                    if budget:
                        budget(max(1, math.ceil(seconds * fps)), *size)
                elif budget and len(frames) % 64 == 0:
                    budget(len(frames), *size)   # a clip whose length its header did not tell
                picture = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                frames.append(np.rot90(picture, k=round((frame.rotation or 0) / 90)))
                next_time += 1 / fps
    except (av.FFmpegError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: not a readable video (MP4, MOV, WebM, ...); "
                         "check that the file is complete") from exc
    audio = _decode_sound(source, flag, path, AUDIO_WINDOW_SAMPLES + 1) if with_audio else None
    if with_audio and audio is None:
        raise UsageError(f"{flag} {path}: this video has no sound track; drop --use_audio_in_video or this video")
    if not frames:
        raise UsageError(f"{flag} {path}: no frame could be decoded; the file looks truncated")
    if len(frames) % 2:   # Qwen's vision encoder takes frames in pairs
        frames.append(frames[-1])
    return Video(np.stack(frames), fps, audio, path)


@dataclasses.dataclass
class Media:
    """Decoded inputs, in the order they appear in the user's turn: videos, images, audio."""
    images: list = dataclasses.field(default_factory=list)
    audios: list = dataclasses.field(default_factory=list)
    videos: list = dataclasses.field(default_factory=list)   # Video objects
    use_audio_in_video: bool = False
    decode_s: float = 0.0


def check_media_paths(options: Options) -> None:
    """Every media flag's file exists and can be read: said before the model is even looked up."""
    for flag, paths, what in (("--image_path", options.image_paths, "an image file"),
                              ("--audio_path", options.audio_paths, "an audio file"),
                              ("--video_path", options.video_paths, "a video file")):
        for path in paths:
            file = Path(path).expanduser()
            if not file.exists() or file.is_dir() or not os.access(file, os.R_OK) or \
                    (file.is_file() and file.stat().st_size == 0):
                _readable_file(flag, path, what)


def video_budget(info: ModelInfo | None, options: Options, what: str):
    """budget(frames, width, height) for load_video: a clip whose tokens would not fit the model's context window
    is refused (None without a model to ask: a serving engine decides)."""
    if info is None or not info.vision or not info.context_window:
        return None

    def budget(frames: int, width: int, height: int) -> None:
        tokens = video_tokens(info.vision, frames, width, height, options.max_pixels)
        if tokens >= info.context_window:
            raise UsageError(f"{what}: {frames} frames at --fps {options.fps:g} are about {tokens:,} tokens, and "
                             f"{info.model_id} reads at most {info.context_window:,}; lower --fps, or cut the clip")
    return budget


def load_media(options: Options, info: ModelInfo | None = None) -> Media:
    """Every media file decoded (and so checked) before any model is loaded; with the model's `info`, a video
    too long for its context is refused before it is decoded."""
    start = time.perf_counter()
    media = Media(images=[load_image(path) for path in options.image_paths],
                  videos=[load_video(path, options.fps, options.use_audio_in_video, max_pixels=options.max_pixels,
                                     budget=video_budget(info, options, f"--video_path {path}"))
                          for path in options.video_paths],
                  use_audio_in_video=options.use_audio_in_video)
    for path, image in zip(options.image_paths, media.images):
        width, height = image.size
        if width * height > options.max_pixels:
            say(f"🖼️ --image_path {path}: {width} x {height} pixels is scaled down to about "
                f"{options.max_pixels / 1e6:.1f} megapixels for the model (--max_pixels {options.max_pixels})")
    for path in options.audio_paths:
        media.audios += audio_pieces(load_audio(path), f"--audio_path {path}")
    for path, video in zip(options.video_paths, media.videos):
        if options.use_audio_in_video and len(video.audio) > AUDIO_WINDOW_SAMPLES:
            say(f"⚠️ --video_path {path}: only the first {AUDIO_WINDOW_SECONDS} s of its sound track is heard")
    if options.image_paths or options.audio_paths or options.video_paths:
        media.decode_s = time.perf_counter() - start
    return media


def check_modalities(options: Options, info: ModelInfo) -> None:
    """A model that cannot take an input (or speak) is told before anything loads."""
    what = "a text-only model" if info.kind == "text" else "a vision-language model"
    for flag, given, able, cannot, hint in (
            ("--image_path", options.image_paths, "image" in info.inputs, "see images", "a vision model"),
            ("--video_path", options.video_paths, "video" in info.inputs, "watch video", "an Omni model"),
            ("--audio_path" if options.audio_paths else "--use_audio_in_video",
             options.audio_paths or options.use_audio_in_video, "audio" in info.inputs, "hear audio", "an Omni model"),
            ("--voice", options.voice, "audio" in info.inputs, "hear you", "an Omni model"),
            (flag_of_speech(options), options.speaks, info.kind == "omni", "speak", "an Omni model")):
        if given and not able:
            raise UsageError(f"{flag}: {options.model_id} is {what} and cannot {cannot}; drop {flag} or use {hint} "
                             f"such as {DEFAULT_MODEL_ID}")


def build_messages(prompt: str, system_prompt: str | None, media: Media, kind: str) -> list[dict]:
    """A chat in transformers' format; media go in the user turn before the text (each video's
    item keeps its Video, so that a conversation's media can be read back from its messages)."""
    messages = []
    if kind == "text":
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        return messages
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content = [{"type": "video", "video": video.frames, "clip": video} for video in media.videos]
    content += [{"type": "image", "image": image} for image in media.images]
    content += [{"type": "audio", "audio": audio} for audio in media.audios]
    if prompt or not content:   # a spoken turn (--voice) is its recording alone
        content.append({"type": "text", "text": prompt})
    messages.append({"role": "user", "content": content})
    return messages


def media_of(messages: list[dict], use_audio_in_video: bool) -> Media:
    """The media of a conversation, in the order its messages carry them."""
    media = Media(use_audio_in_video=use_audio_in_video)
    for message in messages:
        for item in message["content"] if isinstance(message["content"], list) else ():
            if item["type"] == "image":
                media.images.append(item["image"])
            elif item["type"] == "audio":
                media.audios.append(item["audio"])
            elif item["type"] == "video":
                media.videos.append(item["clip"])
    return media


def prepare_inputs(processor, messages: list[dict], device, media: Media | None = None, pictures: dict | None = None):
    """Chat template and media through the processor; tensors on the model's device. With `pictures` (a chat's),
    each picture is resized and normalised, and each recording's features computed, once, however many turns it
    stays in the conversation."""
    if pictures is not None and media is not None and (media.images or media.audios):
        with _remembering(processor, pictures):
            return prepare_inputs(processor, messages, device, media)
    if media is None or not (media.audios or media.videos):
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        return inputs.to(device)
    # Audio and video were decoded here (soundfile + soxr, PyAV), so the processor gets arrays.
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs: dict = {"text": [text], "return_tensors": "pt"}
    if media.images:
        kwargs["images"] = media.images
    audio, slots = list(media.audios), [None] * len(media.audios)
    if media.videos:
        kwargs["videos"] = [video.frames for video in media.videos]
        kwargs["videos_kwargs"] = {"fps": media.videos[0].fps}
        if media.use_audio_in_video:
            # Each video's sound goes with its pictures, interleaved in time (Qwen's recommendation);
            # the sound tracks come first in the list, as the videos come first in the turn.
            audio = [video.audio for video in media.videos] + audio
            slots = list(range(len(media.videos))) + slots
            if hasattr(processor, "_resolve_audio_from_video"):   # newer transformers: slots say whose sound
                kwargs.update(load_audio_from_video=True, audio_from_video_indices=slots)
            else:                                                 # 5.17: each video takes the next recording
                kwargs["videos_kwargs"]["use_audio_in_video"] = True
    if audio:
        kwargs["audio"] = audio
    return processor(**kwargs).to(device)


@contextlib.contextmanager
def _remembering(processor, memo: dict):
    """The processor's image processor and audio feature extractor, for the while, taking what they made of a
    picture or a recording before from `memo` (by the object, which stays in the conversation): their outputs for
    several are the ones they make for each alone, in order, recordings padded to the longest."""
    import numpy as np
    import torch
    from transformers import BatchFeature

    def remembering(own):
        class Remembering:
            def __getattr__(self, name):
                return getattr(own, name)

            def __call__(self, items=None, *args, **kwargs):
                flat = list(items) if isinstance(items, (list, tuple)) else [items]
                while any(isinstance(item, (list, tuple)) for item in flat):
                    flat = [inner for item in flat for inner in (item if isinstance(item, (list, tuple)) else [item])]
                made = []
                for item in flat:
                    if memo.get(id(item), (None,))[0] is not item:
                        memo[id(item)] = item, own([item], *args, **kwargs)
                    made.append(memo[id(item)][1])
                return BatchFeature({key: joined([one[key] for one in made]) for key in made[0]})
        return Remembering()

    def joined(parts):   # recordings padded to the longest, as the extractor pads a batch (Qwen3-Omni's: the mask
        longest = max(part.shape[-1] for part in parts)   # says where each ends; Qwen2.5-Omni's are all 30 s)
        parts = [np.pad(part, [(0, 0)] * (part.ndim - 1) + [(0, longest - part.shape[-1])]) if not torch.is_tensor(part)
                 else torch.nn.functional.pad(part, (0, longest - part.shape[-1])) for part in parts]
        return torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)
    owned = {name: getattr(processor, name) for name in ("image_processor", "feature_extractor")
             if getattr(processor, name, None) is not None}
    for name, own in owned.items():
        setattr(processor, name, remembering(own))
    try:
        yield
    finally:
        for name, own in owned.items():
            setattr(processor, name, own)


# · the spoken reply out (--output_audio, --play): all that can be checked before loading

def flag_of_speech(options: Options) -> str:
    return "--output_audio" if options.output_audio else "--play"


def check_speech_outputs(options: Options) -> None:
    """Where the spoken reply goes, checked before anything is decoded or loaded: a typo costs nothing. The WAV
    can be written there (a new file in a folder that takes one, a symlink's target, a FIFO or a device; soundfile,
    which writes it after all the work, is there); --play has a sound device."""
    if options.output_audio is not None:
        _require("soundfile", "soundfile", "--output_audio")
        file, target = options.output_audio, options.output_audio.resolve()
        if file.is_dir():
            raise UsageError(f"--output_audio {file}: this is a folder; give a file name such as reply.wav")
        if file.exists() and not file.is_file():   # a FIFO, a device, /dev/stdout: written in place
            if not os.access(file, os.W_OK):
                raise UsageError(f"--output_audio {file}: cannot write to it (permission denied); choose another file")
        elif not target.parent.is_dir():
            raise UsageError(f"--output_audio {file}: the folder {file.parent} does not exist; create it first")
        else:
            try:   # a real file, at once removed: permissions, read-only disks and root all answer the same
                handle, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
                os.close(handle)
                os.unlink(probe)
            except OSError as exc:
                raise UsageError(f"--output_audio {file}: cannot write in {target.parent} ({exc.strerror}); choose "
                                 "a folder you can write to") from exc
    if options.play and not options.dry_run:
        check_play("--voice" if options.voice else "--play")


def check_play(flag: str = "--play") -> None:
    """--play needs sounddevice, the PortAudio library under it, and an output device; --voice a microphone and
    the voice detector (silero-vad) too."""
    instead = "ask in text with --interactive" if flag == "--voice" else "use --output_audio reply.wav"
    try:
        sounddevice = importlib.import_module("sounddevice")
    except ImportError as exc:
        raise RunError(f"{flag} needs the sounddevice package: pip install sounddevice (or pip install -r "
                       f"requirements.txt), or {instead}") from exc
    except OSError as exc:   # the wheel brings PortAudio on macOS and Windows; Linux has it as a system package
        raise RunError(f"{flag}: PortAudio, which sounddevice plays through, is not installed ({one_line(exc)}); "
                       f"install it (Debian, Ubuntu: apt install libportaudio2) or {instead}") from exc
    for kind, what in (("output", "audio output device"), ("input", "microphone"))[:2 if flag == "--voice" else 1]:
        try:
            sounddevice.query_devices(kind=kind)
        except (sounddevice.PortAudioError, ValueError) as exc:
            raise RunError(f"{flag}: this machine has no {what} ({one_line(exc)}); {instead}") from exc
    try:
        if flag == "--voice":
            importlib.import_module("silero_vad")
    except ImportError as exc:
        raise RunError("--voice needs the silero-vad package, the voice detector (its model comes inside it): pip "
                       "install silero-vad (or pip install -r requirements.txt)") from exc


def _has_talker_weights(info: ModelInfo) -> bool:
    """Whether a local checkpoint's weight files hold the talker (read from the index, or the files' headers)."""
    folder = Path(info.model_id).expanduser()
    if not folder.is_dir():
        return True   # a Hub id: its files are fetched with the weights
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return any(name.startswith("talker.") for name in json.loads(index.read_text()).get("weight_map", {}))
    files = list(folder.glob("*.safetensors"))
    if not files:
        return True   # pickled weights: transformers will say
    from safetensors import safe_open
    for file in files:
        with safe_open(file, "pt") as weights:
            if any(name.startswith("talker.") for name in weights.keys()):
                return True
    return False


def read_speakers(info: ModelInfo, flag: str = "--output_audio") -> list[str]:
    """The voices an Omni checkpoint ships (its config's for Qwen3-Omni, its spk_dict.pt for Qwen2.5-Omni), read
    before the model loads."""
    if info.voices:
        return list(info.voices)
    import torch
    path = Path(info.model_id).expanduser() / "spk_dict.pt"
    if not path.is_file():
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(info.model_id, "spk_dict.pt", local_files_only=info.local_only))
        except Exception as exc:   # not on the Hub, not cached, or not a Hub id at all
            raise RunError(f"{flag}: {info.model_id} has no spk_dict.pt (its voices), so it cannot speak; "
                           "use a complete Qwen2.5-Omni checkpoint") from exc
    # weights_only: a speaker file holds tensors and names, never code to run.
    try:
        return list(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as exc:
        raise RunError(f"{flag}: {path} holds more than voices (objects or code that PyTorch will not "
                       "load safely), so it was not loaded; use a checkpoint from a source you trust") from exc


@dataclasses.dataclass(frozen=True)
class Speech:
    """A spoken reply's settings: the voice and how long it may be."""
    speaker: str
    max_codes: int = TALKER_MAX_NEW_TOKENS   # the talker's speech codes (frames): 50 a second, Qwen3-Omni's 12.5
    min_codes: int = 0                       # benchmarks force a length; a user never needs to
    play: bool = False                       # --play: through the default output device, as it is made


def choose_speaker(options: Options, info: ModelInfo) -> Speech:
    """The voice of a spoken reply, checked against the checkpoint's own before loading."""
    voices = read_speakers(info, flag_of_speech(options))
    speaker = options.speaker or (DEFAULT_SPEAKER if DEFAULT_SPEAKER in voices else voices[0])
    if speaker not in voices:
        raise UsageError(f"--speaker {options.speaker}: not a voice of {options.model_id}; choose one of "
                         + ", ".join(voices))
    if options.custom_system_prompt:
        say("⚠️ Qwen2.5-Omni speaks reliably only with its own system prompt; with --system_prompt the reply may "
            "come without speech")
    codes = options.speech_codes if info.model_type != "qwen3_omni_moe" else \
        math.ceil(options.speech_codes * QWEN3_CODES_PER_SECOND / TALKER_CODES_PER_SECOND)   # the same seconds
    return Speech(speaker, max_codes=codes, play=options.play)


def choose_speech(options: Options, info: ModelInfo) -> Speech | None:
    """The spoken reply's settings, once the model is known to speak; None when none is asked for (and for a
    dry run, which checks what needs no download)."""
    if not options.speaks:
        return None
    flag = flag_of_speech(options)
    if info.model_type not in SPEAKING_MODEL_TYPES:
        raise UsageError(f"{flag}: speaking with {info.model_type} models is not supported yet (their "
                         f"text answers are); drop {flag} or use {DEFAULT_MODEL_ID}")
    if not (info.speaks and _has_talker_weights(info)):
        why = "enable_audio_output is false in its config" if not info.speaks else "no talker weights in its files"
        complete = "Qwen/Qwen3-Omni-30B-A3B-Instruct" if info.model_type == "qwen3_omni_moe" else DEFAULT_MODEL_ID
        raise UsageError(f"{flag}: {options.model_id} was saved without its talker ({why}), so it cannot speak; drop "
                         f"{flag}, or use a complete checkpoint such as {complete}")
    return None if options.dry_run else choose_speaker(options, info)


# --- 5. the model: where it is, what it takes, how big it is -----------------------------------

@dataclasses.dataclass(frozen=True)
class Prequantized:
    """A checkpoint saved quantized, as its config.json says (quantization_config, or mlx-lm's block)."""
    method: str                   # "awq", "gptq", "bitsandbytes", "fp8", "metal", "mlx", or another of transformers'
    bits: int
    group_size: int               # weights that share one scale (and zero point or bias)
    skip: tuple[str, ...] = ()    # modules it leaves unquantized (modules_to_not_convert)

    @property
    def label(self) -> str:
        return f"{quantizer_facts(self.method).label} {self.bits}-bit"


def prequantized_of(config: dict) -> Prequantized | None:
    """How a checkpoint was saved quantized, from its config.json; None for plain weights."""
    block = config.get("quantization_config") or config.get("thinker_config", {}).get("quantization_config") or {}
    if "quantization" in config and not block.get("quant_method"):   # mlx-lm writes {"group_size", "bits"}
        mlx = config["quantization"]
        return Prequantized("mlx", int(mlx.get("bits", 4)), int(mlx.get("group_size", 64)))
    method = str(block.get("quant_method", "")).lower().replace("fbgemm_fp8", "fp8")
    if not method:
        return None
    if method == "bitsandbytes":
        bits = 4 if block.get("load_in_4bit") else 8
    else:
        bits = int(block.get("bits") or block.get("weight_bits") or (8 if method == "fp8" else 4))
    group = int(block.get("group_size") or 0)
    return Prequantized(method, bits, group if group > 0 else 128, tuple(block.get("modules_to_not_convert") or ()))


@dataclasses.dataclass(frozen=True)
class VisionFacts:
    patch_size: int          # pixels per patch side (14)
    merge_size: int          # patches merged per token side (2): one token covers 28 x 28 pixels
    hidden_size: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What config.json says, read without torch."""
    model_id: str
    model_type: str
    kind: str                 # "omni" (thinker + talker), "multimodal" or "text"
    inputs: frozenset[str]    # among "text", "image", "audio", "video"
    path: str = ""            # the folder the files come from (a Hub snapshot for a Hub id)
    revision: str = ""        # the Hub commit of that snapshot; empty for a local folder
    local_only: bool = False  # the Hub is not to be asked (offline, or unreachable): the cache only
    prequantized: Prequantized | None = None
    speaks: bool = False      # an Omni checkpoint with its talker (enable_audio_output)
    context_window: int | None = None   # the language model's max_position_embeddings
    vision: VisionFacts | None = None
    voices: tuple[str, ...] = ()        # Qwen3-Omni's, named in its config (Qwen2.5-Omni's are in spk_dict.pt)


def model_info_from_config(model_id: str, config: dict, path: str = "", revision: str = "",
                           local_only: bool = False) -> ModelInfo:
    """Classify a checkpoint from its config.json: what it takes in and how it loads."""
    model_type = str(config.get("model_type", ""))
    inner = config.get("thinker_config", config)
    inputs = {"text"}
    if "vision_config" in inner:
        inputs |= {"image", "video"}
    if "audio_config" in inner:
        inputs.add("audio")
    if "thinker_config" in config:
        kind = "omni"
    elif inputs != {"text"}:
        kind = "multimodal"
    else:
        kind = "text"
    text, vision = inner.get("text_config") or inner, inner.get("vision_config")
    window = text.get("max_position_embeddings") or inner.get("max_position_embeddings")
    return ModelInfo(model_id, model_type, kind, frozenset(inputs), path, revision, local_only,
                     prequantized_of(config), kind == "omni" and config.get("enable_audio_output", True) is not False,
                     int(window) if window else None, VisionFacts(int(vision.get("patch_size", 14)), int(vision.get(
                         "spatial_merge_size", 2)), int(vision.get("hidden_size", 1280))) if vision else None,
                     tuple(name.capitalize() for name in (config.get("talker_config") or {}).get("speaker_id") or {}))


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One quick TCP connection to the Hub, so an offline machine does not sit through retries."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(model_id: str) -> ModelInfo:
    """Find config.json: in a local folder, in the Hugging Face cache, or on the Hub."""
    path = Path(model_id).expanduser()
    local_only = False
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.is_dir():
            raise UsageError(f"--model_id {model_id}: its config.json is a folder, not a file; download the model "
                             "again")
        if not config_path.is_file():
            raise UsageError(f"--model_id {model_id}: this folder has no config.json; "
                             "point it at a model folder (one that holds config.json and the weights)")
    elif path.exists():
        raise UsageError(f"--model_id {model_id}: this is a file; give a model folder or a Hugging Face id "
                         f"such as {DEFAULT_MODEL_ID}")
    elif model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id:
        raise UsageError(f"--model_id {model_id}: no such folder; check the path")
    else:
        config_path, local_only = _hub_config(model_id)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model_id {model_id}: config.json cannot be read ({one_line(exc)}); "
                         "the model folder looks damaged: download it again") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        what = "has no model_type" if isinstance(config, dict) else "is not a JSON object"
        raise UsageError(f"--model_id {model_id}: its config.json {what}, so the model cannot be told; download it "
                         "again (or use a model folder saved by transformers)")
    folder = config_path.parent.resolve()
    revision = folder.name if folder.parent.name == "snapshots" and not path.is_dir() else ""
    return model_info_from_config(model_id, config, str(folder), revision, local_only)


def _hub_config(repo_id: str) -> tuple[Path, bool]:
    """(config.json of a Hub model, whether the cache alone is to be used): from the cache when
    offline or when the Hub does not answer at once, downloaded otherwise."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    for name in ("HF_HOME", "HF_HUB_CACHE"):   # the cache's folders: a file there fails every download
        value = os.environ.get(name)
        if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise UsageError(f"{name}={value} is not a folder; point it at the folder for the Hugging Face cache, "
                             "or unset it")
    local_only = constants.HF_HUB_OFFLINE
    if not local_only and not hub_reachable(constants.ENDPOINT):
        say(f"📴 {constants.ENDPOINT} cannot be reached: using the local Hugging Face cache only")
        local_only = True
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=local_only)), local_only
    except HFValidationError as exc:
        raise UsageError(f"--model_id {repo_id}: neither a local folder nor a valid Hugging Face id "
                         f"(like {DEFAULT_MODEL_ID})") from exc
    except GatedRepoError as exc:
        raise RunError(f"--model_id {repo_id}: this model is gated; accept its terms on huggingface.co "
                       "and log in with `hf auth login`") from exc
    except RepositoryNotFoundError as exc:
        raise UsageError(f"--model_id {repo_id}: no such model on the Hugging Face Hub; check the spelling "
                         "(private models need `hf auth login`)") from exc
    except LocalEntryNotFoundError as exc:
        raise RunError(f"--model_id {repo_id}: not in the Hugging Face cache and the Hub cannot be reached; "
                       "connect to the internet once to download it, or pass a local model folder") from exc


def check_model_folder(info: ModelInfo) -> None:
    """A local model folder holds whole weights, a readable tokenizer and (for pictures and sound) its processor's
    config: said before anything loads, naming the file. (A dry run needs only config.json; a Hub id downloads
    what it lacks.)"""
    folder, model_id = Path(info.model_id).expanduser(), info.model_id
    if not folder.is_dir():
        return
    weights = sorted(path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern))
    for path in [*weights, *(folder / name for name in (*TOKENIZER_FILES, *PROCESSOR_FILES))]:
        if path.is_dir():
            raise UsageError(f"--model_id {model_id}: {path.name} is a folder, not a file; download the model again")
    if not weights:
        raise UsageError(f"--model_id {model_id}: this folder has no weights (model.safetensors or "
                         "model-00001-of-0000N.safetensors); copy the whole model repository into it")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"--model_id {model_id}: this folder has no tokenizer (tokenizer.json, "
                         "tokenizer_config.json); copy the whole model repository into it")
    if info.kind != "text" and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise UsageError(f"--model_id {model_id}: this folder has no processor config ({' or '.join(PROCESSOR_FILES)}"
                         ", which says how pictures and sound are read); download the model again")
    index = folder / "model.safetensors.index.json"
    shards = set(_json_file(index, model_id).get("weight_map", {}).values()) if index.is_file() else set()
    missing = sorted(name for name in shards if not (folder / name).is_file())
    if missing:
        raise UsageError(f"--model_id {model_id}: {missing[0]}, which model.safetensors.index.json lists, is missing"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download the model again")
    for path in weights:
        if path.suffix == ".safetensors":
            _check_safetensors(path, model_id)
    if (folder / "tokenizer.json").is_file():
        _json_file(folder / "tokenizer.json", model_id)
    try:   # without it transformers decodes greedily, which is no wrong answer, but not the checkpoint's choice
        if (folder / "generation_config.json").exists():
            _json_file(folder / "generation_config.json", model_id)
    except UsageError as exc:
        say(f"⚠️ {exc}: decoding follows transformers' defaults (greedy) instead of the checkpoint's own settings, "
            "unless --temperature, --top_p or --top_k say otherwise")


def _json_file(path: Path, model_id: str) -> dict:
    """A model file that must hold a JSON object, or a UsageError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model_id {model_id}: {path.name} is damaged ({one_line(exc, 100)}); download the "
                         "model again") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--model_id {model_id}: {path.name} is not what it should be (a JSON object); download the "
                         "model again")
    return data


def _check_safetensors(path: Path, model_id: str) -> None:
    """A safetensors file's header parses and its tensors fit in the file: a download cut short is said now, not as
    a loader's traceback (the weights themselves are not read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length <= min(size - 8, 100_000_000) else None
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        header = None
    if header is None:
        raise UsageError(f"--model_id {model_id}: {path.name} is not a readable safetensors file; download the "
                         "model again")
    if 8 + length + end > size:
        raise UsageError(f"--model_id {model_id}: {path.name} is cut short ({size:,} of the {8 + length + end:,} "
                         "bytes its header describes); download the model again")


def check_checkpoint(info: ModelInfo, options: Options) -> None:
    """A checkpoint saved in a form transformers cannot load (MLX), or quantized twice, is said before loading."""
    pre = info.prequantized
    if pre and pre.method == "mlx":
        original = unquantized_name(info.model_id) or "the unquantized repository it was made from"
        raise UsageError(f"--model_id {info.model_id}: an MLX checkpoint ({pre.label}, mlx-lm's format), which "
                         f"transformers cannot load; run it with mlx-lm or mlx-vlm (pip install mlx-vlm), or use "
                         f"{original}")
    if pre and options.quantize != "none":
        raise UsageError(f"--quantize {options.quantize}: {info.model_id} is already quantized ({pre.label}); "
                         "drop --quantize")


def quiet_libraries(debug: bool) -> None:
    """transformers' and accelerate's warnings and loading bars say nothing a user can act on;
    the tool says what matters in its own words (--debug shows the warnings again)."""
    import transformers

    from huggingface_hub.utils import enable_progress_bars
    if not debug:
        transformers.logging.set_verbosity_error()
        logging.getLogger("accelerate").setLevel(logging.ERROR)
    transformers.logging.disable_progress_bar()   # "Loading weights" bars (it turns the Hub's off too)
    enable_progress_bars()                         # downloads keep theirs: a first run fetches gigabytes


def load_config(info: ModelInfo, trust_remote_code: bool):
    """transformers' config object, with its errors turned into messages."""
    from transformers import AutoConfig
    try:   # by id, not the cached file, so that a model's own code files come along with --trust_remote_code
        return AutoConfig.from_pretrained(info.model_id, trust_remote_code=trust_remote_code,
                                          local_files_only=info.local_only)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UsageError(f"--model_id {info.model_id}: this model ships its own Python code, which would run "
                             "on your machine; pass --trust_remote_code only if you trust its authors") from exc
        import transformers
        raise RunError(f"--model_id {info.model_id}: model type '{info.model_type}' is not known to "
                       f"transformers {transformers.__version__}; upgrade it with "
                       "`pip install -U transformers`") from exc


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about a model: exact counts from its config, on the meta device."""
    model_id: str
    kind: str
    parameters: dict[str, int]      # component -> parameters, tied weights once ("model" unless Omni)
    quantizable: dict[str, int]     # component -> parameters in the Linear layers bitsandbytes would quantize
    kv_elements_per_token: int      # keys + values of every layer of the language model, for one token
    num_layers: int
    hidden_size: int
    intermediate_size: int
    talker_kv_elements_per_token: int = 0
    prequantized: Prequantized | None = None
    vision: VisionFacts | None = None
    context_window: int | None = None   # the language model's max_position_embeddings
    attention_heads: int = 0            # the language model's (an engine splits them over its GPUs)
    meta_model: object = dataclasses.field(default=None, compare=False, repr=False)   # for accelerate's placement

    @property
    def total(self) -> int:
        return sum(self.parameters.values())


def _kv_elements(text_config) -> int:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim


def _meta_model(config, info: ModelInfo, trust_remote_code: bool):
    """The model built on the meta device: its shapes without weights or memory."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights
    model_class = _model_class(info, thinker_only=False)
    try:
        with init_empty_weights(), no_init_weights():
            model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:   # a config transformers knows, but not as a model it can generate with
        import transformers
        raise RunError(f"--model_id {info.model_id}: transformers {transformers.__version__} cannot generate "
                       f"text with a '{info.model_type}' model ({model_class.__name__}); "
                       "try `pip install -U transformers`") from exc
    model.tie_weights()   # tied embeddings are one tensor: count them once
    return model


def model_facts(config, info: ModelInfo, trust_remote_code: bool) -> ModelFacts:
    """Exact parameter counts and cache sizes from the config alone (no weights, no memory)."""
    import torch
    model = _meta_model(config, info, trust_remote_code)
    children = dict(model.named_children()) if info.kind == "omni" else {"model": model}
    skip = info.prequantized.skip if info.prequantized else ()
    parameters, quantizable = {}, {}
    for name, child in children.items():
        parameters[name] = sum(p.numel() for p in child.parameters())
        # Quantizers convert Linear layers (but for the modules a checkpoint names) and keep the output
        # head in the compute dtype.
        output = child.get_output_embeddings() if hasattr(child, "get_output_embeddings") else None
        quantizable[name] = sum(p.numel() for path, module in child.named_modules()
                                if isinstance(module, torch.nn.Linear) and module is not output
                                and not any(entry in f"{name}.{path}" for entry in skip)
                                for p in module.parameters(recurse=False))
    inner = getattr(config, "thinker_config", config)
    text = inner.get_text_config()
    talker = getattr(config, "talker_config", None)
    talker = getattr(talker, "text_config", None) or talker   # Qwen3-Omni nests the talker's language model
    return ModelFacts(
        model_id=info.model_id, kind=info.kind, parameters=parameters, quantizable=quantizable,
        kv_elements_per_token=_kv_elements(text), num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size, intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        talker_kv_elements_per_token=_kv_elements(talker) if "talker" in parameters else 0,
        prequantized=info.prequantized, context_window=info.context_window, attention_heads=text.num_attention_heads,
        meta_model=model, vision=info.vision)


def _model_class(info: ModelInfo, thinker_only: bool):
    """The transformers class that loads this checkpoint."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMultimodalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
    if info.kind == "text":
        return AutoModelForCausalLM
    if thinker_only:
        # Omni without speech: the thinker alone, straight from the full checkpoint.
        return getattr(transformers, MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES[f"{info.model_type}_thinker"])
    return AutoModelForMultimodalLM


def format_count(n: int) -> str:
    """1.54 B, 243.9 M, 98.3 K: parameter counts for people."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)


def format_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB"


def describe_model(info: ModelInfo, facts: ModelFacts, components: tuple[str, ...]) -> str:
    line = f"🧠 {info.model_id} ({info.model_type}): {format_count(facts.total)} parameters"
    if info.kind == "omni" and "talker" not in components and len(facts.parameters) > 1:
        others = " and ".join(name for name in facts.parameters if name != "thinker")
        line += (f"; loading the thinker only ({format_count(facts.parameters['thinker'])}): no speech output "
                 f"was asked for, so the {others} stay on disk")
    return line


# --- 6. hardware ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CudaDevice:
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool


@dataclasses.dataclass(frozen=True)
class Hardware:
    system: str                  # platform.system(): "Darwin", "Linux", "Windows"
    machine: str                 # "arm64", "x86_64", "aarch64"
    cpu_count: int
    cpu_bf16: bool               # native bf16 matmuls (AVX512-BF16/AMX, ARM BF16)
    ram_total: int
    ram_available: int
    mps_built: bool = False
    mps_available: bool = False
    metal_budget: int | None = None   # torch.mps.recommended_max_memory()
    cuda: tuple[CudaDevice, ...] = ()
    bitsandbytes: bool = False        # installed, so --quantize (or a plan that needs it) can work
    simulated: str = ""               # the --hardware spec this stands for, if any
    chip: str = ""                    # Apple's chip: "M1", "M3 Pro"
    macos: tuple[int, ...] = ()       # (14, 5)
    metal_kernels: bool = False       # the kernels package transformers' MetalConfig needs, installed

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine == "arm64"

    @property
    def mps_bf16(self) -> bool:
        return self.macos >= MPS_BF16_MACOS

    @property
    def macos_name(self) -> str:
        return "macOS " + ".".join(map(str, self.macos)) if self.macos else "this macOS"

    @property
    def ram_gb(self) -> float:
        return round(self.ram_total / GB, 1)


def cpu_has_native_bf16(system: str, machine: str, cpuinfo: str = "", sysctl_bf16: str = "") -> bool:
    """Whether bf16 matmuls run natively; without it they are many times slower than fp32."""
    if system == "Darwin":
        return sysctl_bf16.strip() == "1"   # hw.optional.arm.FEAT_BF16: M2 and later
    words = set(cpuinfo.replace(":", " ").split())
    if machine in ("x86_64", "AMD64", "i686"):
        return bool(words & {"avx512_bf16", "amx_bf16"})
    return "bf16" in words                 # ARM Linux "Features" line


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _read_cpu_bf16(system: str, machine: str) -> bool:
    cpuinfo = sysctl = ""
    if system == "Linux":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            pass
    elif system == "Darwin":
        sysctl = _sysctl("hw.optional.arm.FEAT_BF16")
    return cpu_has_native_bf16(system, machine, cpuinfo, sysctl)


def _apple_facts() -> dict:
    """The chip (sysctl's brand string, "Apple M3 Pro") and the macOS version of this Mac."""
    from transformers.utils import is_kernels_available
    chip = _sysctl("machdep.cpu.brand_string").strip().removeprefix("Apple ")
    macos = tuple(int(part) for part in platform.mac_ver()[0].split(".") if part.isdigit())
    return {"chip": chip, "macos": macos, "metal_kernels": is_kernels_available()}


def _has_bitsandbytes() -> bool:
    from transformers.utils import is_bitsandbytes_available
    return is_bitsandbytes_available()


def detect_hardware() -> Hardware:
    """Look at this machine: OS, CPU, RAM, MPS and CUDA."""
    import psutil
    import torch
    system, machine = platform.system(), platform.machine()
    memory = psutil.virtual_memory()
    mps_built = torch.backends.mps.is_built()
    mps_available = mps_built and torch.backends.mps.is_available()
    metal_budget = None
    if mps_available:
        try:
            metal_budget = int(torch.mps.recommended_max_memory())
        except (AttributeError, RuntimeError):
            pass
    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            major, _ = torch.cuda.get_device_capability(index)
            cuda.append(CudaDevice(torch.cuda.get_device_name(index), total, free, bf16=major >= 8))
    return Hardware(system=system, machine=machine, cpu_count=os.cpu_count() or 1,
                    cpu_bf16=_read_cpu_bf16(system, machine), ram_total=memory.total,
                    ram_available=memory.available, mps_built=mps_built, mps_available=mps_available,
                    metal_budget=metal_budget, cuda=tuple(cuda), bitsandbytes=_has_bitsandbytes(),
                    **(_apple_facts() if system == "Darwin" else {}))


def parse_hardware_spec(spec: str) -> tuple[str, tuple[float, ...], dict]:
    """'mps:16', 'cuda:24', 'cuda:24,24' or 'cpu:32' -> (kind, sizes in GB, a Mac's qualifiers): a Mac
    may name its chip and macOS, in either order ('mps:16:m1:macos13.5' -> {"chip": "M1", "macos": (13, 5)})."""
    kind, _, rest = spec.strip().lower().partition(":")
    sizes, *qualifiers = rest.split(":")
    try:
        numbers = tuple(float(size) for size in sizes.split(","))
    except ValueError:
        numbers = ()
    mac: dict = {}
    for qualifier in qualifiers if kind == "mps" else ["unexpected"] if qualifiers else []:
        version = qualifier.removeprefix("macos").split(".")
        if len(qualifier) >= 2 and qualifier[0] == "m" and qualifier[1:].isdigit() and "chip" not in mac:
            mac["chip"] = qualifier.upper()
        elif qualifier.startswith("macos") and all(part.isdigit() for part in version) and "macos" not in mac:
            mac["macos"] = tuple(int(part) for part in version)
        else:
            numbers = ()
    if kind not in ("mps", "cuda", "cpu") or not numbers or any(not 0 < n < 100_000 for n in numbers) \
            or (kind != "cuda" and len(numbers) != 1):
        raise argparse.ArgumentTypeError(
            f"'{spec}' is not a hardware spec; use mps:16 (a Mac with 16 GB; mps:16:m1:macos13.5 names its chip "
            "and macOS), cuda:24 or cuda:24,24 (NVIDIA GPUs with that many GB each) or cpu:32 (no accelerator, "
            "32 GB of RAM)")
    return kind, numbers, mac


def simulated_hardware(spec: str) -> Hardware:
    """The machine a --hardware spec describes, idle: all of its memory is available. A Mac is an M3 on a
    current macOS unless the spec says otherwise (an M1 has no native bf16); a CUDA machine has this
    machine's CPU and RAM."""
    kind, sizes, mac = parse_hardware_spec(spec)
    if kind == "mps":
        ram, chip, macos = int(sizes[0] * GB), mac.get("chip", SIMULATED_MAC_CHIP), mac.get("macos", SIMULATED_MACOS)
        return Hardware(system="Darwin", machine="arm64", cpu_count=8, cpu_bf16=chip != "M1", ram_total=ram,
                        ram_available=ram, mps_built=True, mps_available=macos >= MPS_MACOS, simulated=spec,
                        chip=chip, macos=macos, metal_kernels=True)
    system, machine = platform.system(), platform.machine()
    if kind == "cpu":
        ram = int(sizes[0] * GB)
        return Hardware(system=system, machine=machine, cpu_count=os.cpu_count() or 1,
                        cpu_bf16=_read_cpu_bf16(system, machine), ram_total=ram, ram_available=ram, simulated=spec)
    import psutil
    memory = psutil.virtual_memory()
    gpus = tuple(CudaDevice(f"simulated {size:g} GB GPU", int(size * GB), int(size * GB) - CUDA_CONTEXT_BYTES,
                            bf16=True) for size in sizes)
    return Hardware(system=system, machine=machine, cpu_count=os.cpu_count() or 1,
                    cpu_bf16=_read_cpu_bf16(system, machine), ram_total=memory.total,
                    ram_available=memory.available, cuda=gpus, bitsandbytes=True, simulated=spec)


def describe_hardware(hw: Hardware) -> list[str]:
    """The hardware report, a line a fact."""
    lines = [f"🧪 Simulated hardware (--hardware {hw.simulated}), assumed idle"] if hw.simulated else []
    if hw.apple_silicon:
        if hw.mps_available:
            lines.append("🍎 Apple Silicon detected with MPS support")
        elif hw.mps_built:
            lines.append("🍎 Apple Silicon detected, but MPS is not available (it needs macOS 12.3 or later)")
        else:
            lines.append("🍎 Apple Silicon detected, but this PyTorch was built without MPS")
    lines.append(f"📊 System RAM: {hw.ram_gb:.1f} GB ({hw.ram_available / GB:.1f} GB available)")
    if hw.apple_silicon and (hw.chip or hw.macos):
        lines.append(f"🍎 {('Apple ' + hw.chip) if hw.chip else 'Apple Silicon'} on {hw.macos_name}")
    if hw.metal_budget:
        lines.append(f"🍎 Metal working-set limit: {hw.metal_budget / GB:.1f} GB")
    for index, gpu in enumerate(hw.cuda):
        lines.append(f"🟢 CUDA GPU {index}: {gpu.name}, {gpu.total_bytes / GB:.1f} GB "
                     f"({gpu.free_bytes / GB:.1f} GB free)")
    lines.append(f"🧮 CPU: {hw.machine}, {hw.cpu_count} cores, native bf16: {'yes' if hw.cpu_bf16 else 'no'}")
    return lines


def check_device_available(hw: Hardware, options: Options) -> None:
    if options.device == "cuda" and not hw.cuda:
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device auto or --device cpu")
    if options.device == "mps" and not hw.mps_available:
        raise UsageError("--device mps: MPS is not available here (it needs Apple Silicon and macOS 12.3+); "
                         "use --device auto or --device cpu")
    if options.device == "mps" and options.dtype == "bfloat16" and not hw.mps_bf16:
        raise UsageError(f"--dtype bfloat16: MPS runs bfloat16 from macOS 14 on, and this Mac has {hw.macos_name}; "
                         "use --dtype float16 or float32, or update macOS")


# --- 7. the plan: device, dtype, quantization, memory, and why; the dry run -------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    """What the prompt and its media amount to, for the memory estimate."""
    text_tokens: int = 64                            # estimated before any tokenizer is loaded
    image_sizes: tuple[tuple[int, int], ...] = ()    # (width, height) of each image
    audio_seconds: tuple[float, ...] = ()            # length of each recording (and video sound track heard)
    videos: tuple[tuple[int, int, int], ...] = ()    # (frames sampled, width, height) of each video


def workload_of(options: Options, media: Media | None = None) -> Workload:
    """The prompt's tokens (Qwen's tokenizer gives about one per 4 bytes of English; count one per 2
    bytes, for CJK and code, plus the chat template's own) and the media's sizes."""
    media = media or Media()
    audio = [len(samples) / AUDIO_SAMPLE_RATE for samples in media.audios]
    if media.use_audio_in_video:
        audio += [len(v.audio) / AUDIO_SAMPLE_RATE for v in media.videos]
    text = (options.prompt or "") + (options.system_prompt or "")
    return Workload(text_tokens=math.ceil(len(text.encode("utf-8")) / 2) + CHAT_TEMPLATE_TOKENS,
                    image_sizes=tuple(image.size for image in media.images), audio_seconds=tuple(audio),
                    videos=tuple((len(v.frames), *v.size) for v in media.videos))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes a run will need: weights per component, KV cache, and a stated margin."""
    components: dict[str, tuple[int, int]]   # name -> (parameters, bytes)
    context_tokens: int                      # prompt text + media tokens + new tokens
    media_tokens: int
    kv_cache_bytes: int
    activation_bytes: int
    prompt_tokens: int = 0                   # the prompt's text (estimated) and media tokens
    whole_window: bool = False               # a conversation: its cache counted up to the context window

    @property
    def parameters(self) -> int:
        return sum(p for p, _ in self.components.values())

    @property
    def weights_bytes(self) -> int:
        return sum(b for _, b in self.components.values())

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes


@dataclasses.dataclass(frozen=True)
class Placement:
    """An estimate checked against a device's budget."""
    fits: bool
    budget: int
    source: str                   # "free memory of cuda:0", "Metal's working-set limit", ...
    gpus: tuple[int, ...] = ()    # the CUDA devices the weights go on


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str                   # "mps", "cuda" or "cpu"
    dtype: str                    # "float16", "bfloat16" or "float32"
    quantization: str | None      # None, "4bit" or "8bit"
    tier: str                     # "small", "medium" or "large"
    reasons: tuple[str, ...]
    estimate: Estimate | None = None
    budget_bytes: int | None = None
    budget_source: str = ""
    fits: bool = True
    proceeds: bool = True              # a real run goes ahead: it fits, or the user chose the accelerator
    gpus: tuple[int, ...] = ()
    components: tuple[str, ...] = ()   # what loads: ("thinker",) for Omni without speech
    quantizer: str = ""                # "bitsandbytes", "metal", or a saved checkpoint's own ("awq", ...)


def size_tier(parameters: int) -> str:
    if parameters <= SMALL_MAX_PARAMETERS:
        return "small"
    return "medium" if parameters <= MEDIUM_MAX_PARAMETERS else "large"


def loading_components(facts: ModelFacts, speech: bool) -> tuple[str, ...]:
    """Omni loads its thinker alone unless speech is asked for; other models load whole."""
    if facts.kind == "omni" and not speech:
        return ("thinker",)
    return tuple(facts.parameters)


def video_max_pixels(max_pixels: int) -> int:
    """Per-frame limit for video: Qwen's default, or less when --max_pixels asks for less."""
    return max(VIDEO_MIN_PIXELS, min(max_pixels, VIDEO_MAX_PIXELS))


def image_tokens(vision: VisionFacts, width: int, height: int, max_pixels: int, min_pixels: int = MIN_PIXELS) -> int:
    """Visual tokens for one image after the processor's own resize, with its start and end markers."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    factor = vision.patch_size * vision.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor) + 2


def video_tokens(vision: VisionFacts, frames: int, width: int, height: int, max_pixels: int) -> int:
    """Each pair of frames is one image's worth of tokens, at the per-frame video limits."""
    per_pair = image_tokens(vision, width, height, video_max_pixels(max_pixels), VIDEO_MIN_PIXELS) - 2
    return math.ceil(frames / 2) * per_pair + 2


def audio_tokens(seconds: float) -> int:
    """Qwen2.5-Omni's audio encoder: 100 mel frames a second, halved twice; with the start and end markers."""
    frames = int(min(seconds, AUDIO_WINDOW_SECONDS) * 100)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1 + 2


def weight_bytes(facts: ModelFacts, components: tuple[str, ...], dtype: str, quantization: str | None,
                 quantizer: str = "bitsandbytes") -> dict[str, tuple[int, int]]:
    """component -> (parameters, bytes) at this precision: quantized Linear layers with their group
    scales and zero points or biases, the rest (embeddings, norms, the output head) in `dtype`."""
    width, sizes = DTYPE_BYTES[dtype], {}
    pre = facts.prequantized
    group = pre.group_size if pre and pre.method == quantizer else METAL_GROUP_SIZE
    for name in components:
        parameters = facts.parameters[name]
        if name in FLOAT32_COMPONENTS:
            sizes[name] = (parameters, parameters * 4)
        elif quantization and not (quantizer == "metal" and name in METAL_KEPT):
            packed = facts.quantizable[name]
            bits = int(quantization.removesuffix("bit"))
            per_weight = quantizer_facts(quantizer).bytes_per_weight(bits, group, width)
            sizes[name] = (parameters, int(packed * per_weight + (parameters - packed) * width))
        else:
            sizes[name] = (parameters, parameters * width)
    return sizes


def estimate_memory(facts: ModelFacts, components: tuple[str, ...], dtype: str, quantization: str | None,
                    options: Options, workload: Workload, quantizer: str = "bitsandbytes") -> Estimate:
    """Weights at the chosen precision, the KV cache for prompt + media + new tokens, and a margin."""
    width = DTYPE_BYTES[dtype]
    sizes = weight_bytes(facts, components, dtype, quantization, quantizer)
    media = sum(audio_tokens(seconds) for seconds in workload.audio_seconds)
    encoded_patches = 0   # the vision encoder's largest single input, for its activations
    if facts.vision:
        images = [image_tokens(facts.vision, w, h, options.max_pixels) for w, h in workload.image_sizes]
        videos = [video_tokens(facts.vision, n, w, h, options.max_pixels) for n, w, h in workload.videos]
        media += sum(images) + sum(videos)
        encoded_patches = max([t - 2 for t in images + videos], default=0) * facts.vision.merge_size ** 2
    prompt = workload.text_tokens + media
    turn = context = min(prompt + options.sampling.max_new_tokens, facts.context_window or math.inf)   # never past it
    chat = options.interactive or options.voice
    if chat and facts.context_window:   # a chat keeps its cache, which grows to the whole window
        context = facts.context_window
    kv = context * facts.kv_elements_per_token * width
    if "talker" in components:
        kv += (context + options.speech_codes) * facts.talker_kv_elements_per_token * width
        kv += turn * (facts.num_layers + 1) * facts.hidden_size * width   # a turn's hidden states, for the talker
        kv += (context * facts.hidden_size * width) if chat else 0        # what a chat keeps of them (its rows)
    weights = sum(b for _, b in sizes.values())
    activations = (ACTIVATION_FIXED_BYTES + int(weights * ACTIVATION_WEIGHT_FRACTION)
                   + prompt * facts.intermediate_size * PREFILL_VALUES_PER_TOKEN * width)
    if encoded_patches:
        activations += encoded_patches * facts.vision.hidden_size * VISION_VALUES_PER_PATCH * width
    return Estimate(sizes, context, media, kv, activations, prompt, bool(chat and facts.context_window))


def metal_budget(hw: Hardware) -> tuple[int, str]:
    """Metal's recommended working-set limit, or (simulated) the share of RAM Macs report."""
    if hw.metal_budget:
        return hw.metal_budget, "Metal's working-set limit"
    fraction = 2 / 3 if hw.ram_total <= 32 * GB else 3 / 4
    return int(hw.ram_total * fraction), f"Metal's working-set limit (~{fraction:.0%} of RAM)"


def place(hw: Hardware, device: str, estimate: Estimate, spread=None) -> Placement:
    """Check an estimate against the device's real budget. CUDA: the GPU with the most free memory,
    or several GPUs together when one is not enough (`spread(gpus)` says whether accelerate would
    place every layer on them; without it, their free memory is added up)."""
    needed = estimate.total
    if device == "mps":
        budget, source = metal_budget(hw) if hw.mps_available else (0, "no MPS on this machine")
        return Placement(needed <= budget, budget, source)
    if device == "cpu":
        return Placement(needed <= hw.ram_available, hw.ram_available, "available RAM")
    if not hw.cuda:
        return Placement(False, 0, "no NVIDIA GPU on this machine")
    order = sorted(range(len(hw.cuda)), key=lambda i: -hw.cuda[i].free_bytes)
    best = order[0]
    if needed <= hw.cuda[best].free_bytes or len(order) == 1:
        return Placement(needed <= hw.cuda[best].free_bytes, hw.cuda[best].free_bytes, f"free memory of cuda:{best}",
                         (best,))
    for count in range(2, len(order) + 1):
        chosen = tuple(sorted(order[:count]))
        budget = sum(hw.cuda[i].free_bytes for i in chosen)
        fits = spread(chosen) if spread else needed <= budget
        if fits or count == len(order):
            return Placement(fits, budget, "free memory of " + "+".join(f"cuda:{i}" for i in chosen), chosen)


def accelerate_spread(facts: ModelFacts, components: tuple[str, ...], dtype: str, estimate: Estimate, hw: Hardware):
    """spread(gpus) for place(): whether accelerate's infer_auto_device_map (what device_map="auto"
    runs at load time) puts every layer of the weights on those GPUs, with the KV cache and the
    margin shared among them. None without a meta model."""
    if facts.meta_model is None:
        return None
    import torch
    from accelerate import infer_auto_device_map
    module = facts.meta_model.thinker if components == ("thinker",) else facts.meta_model
    special = {name: torch.float32 for name, _ in module.named_parameters() if name.split(".")[0] in FLOAT32_COMPONENTS}
    overhead = estimate.total - estimate.weights_bytes

    def spread(gpus: tuple[int, ...]) -> bool:
        memory = {i: max(hw.cuda[i].free_bytes - overhead // len(gpus), 0) for i in gpus}
        device_map = infer_auto_device_map(module, max_memory=memory, no_split_module_classes=module._no_split_modules,
                                           dtype=getattr(torch, dtype), special_dtypes=special)
        return all(isinstance(where, int) for where in device_map.values())
    return spread


def mps_usable(hw: Hardware, options: Options, vision: bool) -> bool:
    """MPS can run this model here: Apple Silicon with MPS, Conv3d for a vision tower (macOS 13.2), and
    bfloat16 (macOS 14) if the user asked for it."""
    return (hw.apple_silicon and hw.mps_available and not (vision and hw.macos and hw.macos < MPS_CONV3D_MACOS)
            and not (options.dtype == "bfloat16" and not hw.mps_bf16))


def choose_device(hw: Hardware, tier: str, options: Options, vision: bool = False) -> tuple[str, str]:
    """The size policy's placement: (device, reason)."""
    if options.force_cpu:
        return "cpu", "🔧 --force_cpu: using the CPU"
    if options.device != "auto":
        return options.device, f"🔧 --device {options.device}: using {options.device.upper()} as asked"
    if hw.cuda:
        return "cuda", f"🚀 NVIDIA GPU found ({hw.cuda[0].name}) - using CUDA"
    if hw.apple_silicon and hw.mps_available:
        if not mps_usable(hw, options, vision):
            return "cpu", (f"💻 Vision models need macOS 13.2 or later on MPS (Conv3d), and this Mac has "
                           f"{hw.macos_name} - using CPU" if vision else "💻 --dtype bfloat16 needs macOS 14 on MPS "
                           f"(this Mac has {hw.macos_name}) - using CPU")
        if tier == "small":
            return "mps", "🚀 Small model - using MPS"
        needed = MEDIUM_MPS_MIN_RAM_GB if tier == "medium" else LARGE_MPS_MIN_RAM_GB
        if hw.ram_gb >= needed:
            return "mps", f"🚀 {tier.capitalize()} model with sufficient RAM - using MPS"
        return "cpu", (f"💻 {tier.capitalize()} model needs {needed} GB of RAM for MPS "
                       f"(this Mac has {hw.ram_gb:.1f} GB) - using CPU")
    if hw.apple_silicon:
        return "cpu", "💻 MPS is not available - using CPU"
    return "cpu", "💻 No GPU found - using CPU"


def runs_bf16(hw: Hardware, device: str) -> bool:
    """bfloat16 runs at full speed there: every CUDA GPU from Ampere on, MPS from macOS 14, a CPU with native bf16."""
    return {"cuda": all(gpu.bf16 for gpu in hw.cuda), "mps": hw.mps_bf16, "cpu": hw.cpu_bf16}[device]


def choose_dtype(hw: Hardware, device: str, options: Options) -> tuple[str, tuple[str, ...]]:
    """bfloat16 where it runs (Qwen is trained in it, and float16 overflows), float16 on older MPS and
    CUDA, float32 on a CPU without native bf16 (emulated bf16 is many times slower): (dtype, reasons)."""
    if options.dtype != "auto":
        return options.dtype, (f"🔧 --dtype {options.dtype}: as asked",)
    if device == "mps":
        if hw.mps_bf16:
            return "bfloat16", ("🔢 bfloat16 on MPS: Qwen was trained in bfloat16 and its activations overflow "
                                "float16 (the same memory)",)
        return "float16", ("🔢 float16 on MPS for memory efficiency",
                           f"⚠️ bfloat16 needs macOS 14 on MPS and this Mac has {hw.macos_name}: float16 can "
                           "overflow with Qwen; an answer that does is redone in float32")
    if device == "cuda":
        if runs_bf16(hw, "cuda"):
            return "bfloat16", ("🔢 bfloat16 on CUDA",)
        return "float16", ("🔢 float16 on CUDA (this GPU has no bfloat16)",)
    if hw.cpu_bf16:
        return "bfloat16", ("🔢 bfloat16 on the CPU (it has native bf16)",)
    return "float32", ("🔢 float32 on the CPU (it lacks native bf16, which would be many times slower)",)


def choose_quantization(hw: Hardware, device: str, options: Options) -> tuple[str | None, list[str]]:
    """--quantize: bitsandbytes on CUDA; on Apple Silicon Metal's quantization on MPS (bitsandbytes is
    never tried there), nothing on the CPU."""
    if options.quantize == "none":
        return None, []
    if hw.apple_silicon:
        lines = ["🍎 Skipping quantization on Apple Silicon (bitsandbytes not compatible)"]
        if device == "mps":
            return options.quantize, lines + [_metal_line(options.quantize, options.speaks)]
        return None, lines + ["💡 MPS will provide GPU acceleration instead"]
    if device != "cuda":
        return None, [f"⚠️ Skipping --quantize {options.quantize}: quantization needs a CUDA GPU or Apple Silicon"]
    return options.quantize, [f"🗜️ {options.quantize} quantization with bitsandbytes"]


def _metal_line(bits: str, speaks: bool = False) -> str:
    return (f"🗜️ {bits} Metal quantization on MPS (MLX's kernels through transformers' MetalConfig; the weights "
            "are quantized as they load" + ("; the thinker alone: the talker and token2wav keep 16 and 32 bits)" if
                                            speaks else ")"))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run: a device, a precision, and the lines that say why."""
    device: str
    dtype: str
    quantization: str | None
    reasons: tuple[str, ...]
    quantizer: str = ""    # "bitsandbytes", "metal", or a saved checkpoint's own ("awq", "gptq", ...)


def candidates(hw: Hardware, tier: str, options: Options, facts: ModelFacts):
    """The policy's choice first; then, unless the user chose the device, what to try when it does not
    fit. On a Mac: the size policy's tier in 16-bit on MPS, then Metal 8-bit and 4-bit on MPS, then the CPU.
    On CUDA: 16-bit, then 4-bit. Then the CPU in its dtype, and in bfloat16 where float32 would not fit."""
    if facts.prequantized:
        yield from _saved_quantized(hw, tier, options, facts)
        return
    vision = facts.vision is not None
    device, device_reason = choose_device(hw, tier, options, vision)
    dtype, dtype_reasons = choose_dtype(hw, device, options)
    quantization, quantization_reasons = choose_quantization(hw, device, options)
    quantizer = ("metal" if device == "mps" else "bitsandbytes") if quantization else ""
    first = Candidate(device, dtype, quantization, (device_reason, *dtype_reasons, *quantization_reasons), quantizer)
    if options.forced:
        yield first
        return
    if mps_usable(hw, options, vision) and not (quantization or options.quantize != "none" and device == "mps"):
        yield from _mac_ladder(hw, tier, options, first)
    else:
        yield first
        if device == "cuda" and quantization is None:
            yield Candidate("cuda", dtype, "4bit", ("🗜️ 4-bit quantization with bitsandbytes",), "bitsandbytes")
    cpu_dtype, cpu_reasons = choose_dtype(hw, "cpu", options)
    yield Candidate("cpu", cpu_dtype, None, cpu_reasons)
    if cpu_dtype == "float32" and options.dtype == "auto":
        yield Candidate("cpu", "bfloat16", None,
                        ("🔢 bfloat16 on the CPU to halve the memory (slow: this CPU lacks native bf16)",))


def _mac_ladder(hw: Hardware, tier: str, options: Options, first: Candidate):
    """MPS in 16-bit where the size policy's tier puts the model there, then Metal 8-bit and 4-bit (or the
    --quantize asked for) on MPS: a 7B model on a 16 GB Mac runs on its GPU, not on a CPU that cannot
    hold it. (For a spoken reply the thinker alone is quantized: METAL_KEPT.)"""
    dtype, dtype_reasons = choose_dtype(hw, "mps", options)
    if first.device == "mps":
        yield first
        lead = ()
    else:
        needed = MEDIUM_MPS_MIN_RAM_GB if tier == "medium" else LARGE_MPS_MIN_RAM_GB
        lead = (f"💻 {tier.capitalize()} model: the size policy keeps it off MPS in 16-bit below {needed} GB of RAM "
                f"(this Mac has {hw.ram_gb:.1f} GB)", *dtype_reasons,
                *(["🍎 Skipping quantization on Apple Silicon (bitsandbytes not compatible)"]
                  if options.quantize != "none" else []))
    for bits in ([options.quantize] if options.quantize != "none" else ["8bit", "4bit"]):
        yield Candidate("mps", dtype, bits, (*lead, _metal_line(bits, options.speaks)), "metal")
        lead = ()


def _saved_quantized(hw: Hardware, tier: str, options: Options, facts: ModelFacts):
    """A checkpoint saved quantized runs where its kernels run (AWQ, GPTQ, bitsandbytes, FP8 on NVIDIA GPUs;
    Metal on MPS); elsewhere transformers dequantizes FP8 and Metal weights to 16-bit while loading, and
    cannot run the others."""
    pre = facts.prequantized
    kind = quantizer_facts(pre.method)
    where = kind.device
    saved = f"🗜️ {facts.model_id} is saved quantized ({pre.label}, groups of {pre.group_size})"
    here = where == "cuda" and bool(hw.cuda) or where == "mps" and hw.mps_available
    if where and here and options.device in ("auto", where) and not options.force_cpu:
        dtype = "float16" if pre.method in ("awq", "gptq") else choose_dtype(hw, where, options)[0]
        needs = " and ".join(kind.packages) or "an NVIDIA GPU"
        yield Candidate(where, dtype, f"{pre.bits}bit", (f"{saved}: it runs on {_device_name(where)} with {needs}",),
                        pre.method)
    elif pre.method in ("fp8", "metal") or where is None:
        note = (f"{saved}: without {'an NVIDIA GPU' if where == 'cuda' else 'MPS'} transformers dequantizes it to "
                "16-bit while loading" if where else f"{saved}: counted here as 16-bit weights")
        plain = dataclasses.replace(facts, prequantized=None)
        for index, candidate in enumerate(candidates(hw, tier, options, plain)):
            yield dataclasses.replace(candidate, reasons=(note, *candidate.reasons)) if index == 0 else candidate
    else:
        yield Candidate(where, "float16", f"{pre.bits}bit", (f"{saved}: its kernels need an NVIDIA GPU, which this "
                                                             "machine does not have",), pre.method)


def _device_name(device: str) -> str:
    return {"cuda": "the GPU", "mps": "MPS", "cpu": "the CPU"}[device]


def describe_fit(estimate: Estimate, device: str, where: Placement) -> str:
    verdict = "fits" if where.fits else "does not fit"
    return (f"📐 Needs about {format_bytes(estimate.total)} on {_device_name(device)} "
            f"(weights {format_bytes(estimate.weights_bytes)}, KV cache {format_bytes(estimate.kv_cache_bytes)}, "
            f"margin {format_bytes(estimate.activation_bytes)}) of {format_bytes(where.budget)} ({where.source}): "
            f"{verdict}")


def _switch_line(first: Candidate, chosen: Candidate) -> str:
    was = f"{first.quantization} quantization" if first.quantization else first.dtype
    if chosen.device == first.device and not chosen.quantization:   # the CPU, in a smaller dtype
        return f"⚠️ Too big for {_device_name(first.device)} in {was}: using {chosen.dtype} instead"
    return (f"⚠️ Too big for {_device_name(first.device)} in {was}: using {_device_name(chosen.device)}"
            + (f" with {chosen.quantization} quantization" if chosen.quantization else "") + " instead")


def _missing_package(hw: Hardware, candidate: Candidate) -> str | None:
    """The package a quantized candidate needs and this machine lacks."""
    if candidate.quantizer == "bitsandbytes" and not hw.bitsandbytes:
        return "bitsandbytes"
    if candidate.quantizer == "metal" and not hw.metal_kernels:
        return "kernels"
    return None


def choose_plan(hw: Hardware, facts: ModelFacts, options: Options, workload: Workload = Workload()) -> Plan:
    """Device, dtype, quantization and the memory they take, for this model on this hardware: a pure
    function. The size policy's tier comes first; when its choice does not fit the device's budget,
    the next candidate that does, with the reason."""
    components = loading_components(facts, options.speaks)
    tier = size_tier(sum(facts.parameters[name] for name in components))
    first = None
    notes: list[str] = []
    for candidate in candidates(hw, tier, options, facts):
        estimate = estimate_memory(facts, components, candidate.dtype, candidate.quantization, options, workload,
                                   candidate.quantizer or "bitsandbytes")
        spread = None if candidate.quantization else accelerate_spread(facts, components, candidate.dtype,
                                                                       estimate, hw)
        where = place(hw, candidate.device, estimate, spread)
        line = describe_fit(estimate, candidate.device, where)
        missing = _missing_package(hw, candidate) if options.quantize == "none" else None   # asked: said at load
        if first is None:
            first, first_line, fallback = candidate, line, (estimate, where)
            reasons = [*candidate.reasons, line]
            if not where.fits and options.forced and candidate.device != "cpu":   # out of memory falls back there
                reasons.append(f"⚠️ Going ahead on {_device_name(candidate.device)} because you asked for it; "
                               "expect offloading or an out-of-memory fallback to the CPU")
            if options.forced or (where.fits and not missing):
                return _plan(candidate, tier, reasons, estimate, where, components, proceeds=where.fits or
                             candidate.device != "cpu")
        if candidate.quantizer == "metal" and not where.fits and not any(n.startswith("🍎 Metal") for n in notes):
            kept = sum(facts.parameters[name] - facts.quantizable[name] for name in components)
            if kept > sum(facts.parameters[name] for name in components) / 2:   # a mixture of experts
                notes.append(f"🍎 Metal quantization converts Linear layers only: {format_count(kept)} of its "
                             f"parameters (a mixture of experts' weights, the embeddings) stay in 16-bit, so 8- "
                             f"and 4-bit do not make it fit")
        if where.fits and missing:
            notes.append(f"💡 {candidate.quantization.replace('bit', '-bit')} quantization would fit on "
                         f"{_device_name(candidate.device)} "
                         f"({format_bytes(estimate.total)}): pip install {missing} to use it")
        if not where.fits or missing or candidate is first:
            continue
        reasons = [*first.reasons, *notes, first_line, _switch_line(first, candidate), *candidate.reasons, line]
        return _plan(candidate, tier, reasons, estimate, where, components)
    return _plan(first, tier, [*first.reasons, *notes, first_line], *fallback, components)


def _plan(candidate: Candidate, tier: str, reasons: list[str], estimate: Estimate, where: Placement,
          components: tuple[str, ...], proceeds: bool | None = None) -> Plan:
    return Plan(candidate.device, candidate.dtype, candidate.quantization, tier, tuple(reasons), estimate,
                where.budget, where.source, where.fits, where.fits if proceeds is None else proceeds, where.gpus,
                components, candidate.quantizer)


def unquantized_name(model_id: str) -> str | None:
    """The repository a quantized checkpoint was most likely made from: Qwen/Qwen2.5-Omni-7B-AWQ ->
    Qwen/Qwen2.5-Omni-7B, mlx-community/Qwen2.5-7B-Instruct-4bit -> Qwen/Qwen2.5-7B-Instruct."""
    import re
    owner, _, name = model_id.rstrip("/").rpartition("/")
    base = re.sub(r"(?i)-(awq|gptq(-int\d)?|\d+-?bit|mlx.*|bnb.*|fp8)$", "", name)
    if base == name or not base.lower().startswith("qwen"):
        return None
    return f"{owner if owner and '/' not in owner and owner != 'mlx-community' else 'Qwen'}/{base}"


def does_not_fit_message(facts: ModelFacts, plan: Plan, hw: Hardware) -> str:
    """The one line for a plan that fits nowhere: the figures and the options that fit the case (a
    model far too large is not told to shorten its answer)."""
    estimate, pre = plan.estimate, facts.prequantized
    original = unquantized_name(facts.model_id) or "the unquantized repository it was made from"
    if pre and plan.quantizer == pre.method and plan.budget_bytes == 0:
        mac = " (on a Mac with --quantize 4bit, which quantizes it for Metal as it loads)" if hw.apple_silicon else ""
        return (f"{facts.model_id} is saved quantized ({pre.label}), which runs on NVIDIA GPUs only, and this machine "
                f"has none; use {original}{mac}, a smaller model such as {SMALLER_MODEL_HINT}, or a serving engine "
                "(vLLM, SGLang) on a machine with an NVIDIA GPU")
    options = [f"a smaller model such as {SMALLER_MODEL_HINT}"]
    if facts.kind == "omni" and "talker" in estimate.components:
        options.append("no speech output (the thinker alone is smaller)")
    if estimate.weights_bytes > plan.budget_bytes:   # the weights alone: shorter answers would not help
        if not pre:
            options.append("Qwen's own 4-bit checkpoint of it (AWQ or GPTQ) on an NVIDIA GPU")
        options.append("a serving engine (vLLM, SGLang) on a machine with more GPU memory")
    else:   # forcing an accelerator can go ahead (its out-of-memory falls back); forcing the CPU cannot
        options += ["fewer --max_new_tokens" + (" or --max_pixels" if estimate.media_tokens else "")]
        options += ["--device to force it anyway"] if hw.cuda or hw.mps_available else []
    cpu = "" if plan.device == "cpu" else f", and the CPU has {format_bytes(hw.ram_available)} of RAM available"
    return (f"{facts.model_id} needs about {format_bytes(estimate.total)} on {_device_name(plan.device)} "
            f"in {precision_of(plan)} (weights {format_bytes(estimate.weights_bytes)}) but there is "
            f"{format_bytes(plan.budget_bytes)} ({plan.budget_source}){cpu}; try " + ", ".join(options))


def retry_plan(hw: Hardware, facts: ModelFacts, options: Options, workload: Workload, plan: Plan,
               overflowed: bool) -> Plan:
    """The plan to retry with, fit-checked like any plan. After memory ran out on an accelerator: the
    CPU in its dtype (bfloat16 where float32 would not fit). After the logits overflowed: a wider dtype
    (bfloat16 where it runs, else float32) on the same device, else on the CPU."""
    if overflowed:
        wider = {"float16": ["bfloat16", "float32"], "bfloat16": ["float32"]}.get(plan.dtype, [])
        if not wider:
            raise RunError(DAMAGED.format(dtype=plan.dtype))
        tries = [(plan.device, dtype, plan.quantization, plan.quantizer) for dtype in wider
                 if dtype == "float32" or runs_bf16(hw, plan.device)]
    else:
        wider, tries = ["bfloat16", "float32"], []
    cpu_order = ["bfloat16", "float32"] if hw.cpu_bf16 else ["float32", "bfloat16"]
    tries += [("cpu", dtype, None, "") for dtype in cpu_order if dtype in wider and plan.device != "cpu"]
    for device, dtype, quantization, quantizer in tries:
        estimate = estimate_memory(facts, plan.components, dtype, quantization, options, workload,
                                   quantizer or "bitsandbytes")
        where = place(hw, device, estimate)
        if where.fits:
            reasons = choose_dtype(hw, device, Options())[1] if dtype == choose_dtype(hw, device, Options())[0] \
                else (f"🔢 {dtype} on {_device_name(device)}",)
            return _plan(Candidate(device, dtype, quantization, (), quantizer), plan.tier,
                         [*reasons, describe_fit(estimate, device, where)], estimate, where, plan.components)
    what = "its logits overflowed" if overflowed else "memory ran out"
    estimate = estimate_memory(facts, plan.components, tries[-1][1] if tries else "float32", None, options, workload)
    raise RunError(f"{what} on {_device_name(plan.device)} in {plan.dtype}, and {facts.model_id} needs about "
                   f"{format_bytes(estimate.total)} to retry in a wider dtype or on the CPU, which has "
                   f"{format_bytes(hw.ram_available)} of RAM available; try a smaller model such as "
                   f"{SMALLER_MODEL_HINT}" + ("" if overflowed else " or fewer --max_new_tokens"))


def plan_as_dict(facts: ModelFacts, plan: Plan, hw: Hardware) -> dict:
    """The plan as plain data, for --json."""
    estimate = plan.estimate
    return {
        "model_id": facts.model_id, "device": plan.device, "gpus": list(plan.gpus), "dtype": plan.dtype,
        "quantization": plan.quantization, "quantizer": plan.quantizer or None, "tier": plan.tier,
        "components": {name: {"parameters": p, "bytes": b} for name, (p, b) in estimate.components.items()},
        "parameters": estimate.parameters, "weights_bytes": estimate.weights_bytes,
        "context_tokens": estimate.context_tokens, "media_tokens": estimate.media_tokens,
        "kv_cache_bytes": estimate.kv_cache_bytes, "activation_bytes": estimate.activation_bytes,
        "estimated_bytes": estimate.total, "budget_bytes": plan.budget_bytes, "budget": plan.budget_source,
        "fits": plan.fits, "proceeds": plan.proceeds, "reasons": list(plan.reasons), "hardware": describe_hardware(hw),
        "mac": {"chip": hw.chip, "macos": ".".join(map(str, hw.macos))} if hw.apple_silicon else None,
    }


def precision_of(plan: Plan) -> str:
    """"bfloat16", "4bit bitsandbytes", "8bit Metal", "4bit AWQ": how the weights are held."""
    if not plan.quantization:
        return plan.dtype
    return f"{plan.quantization} {quantizer_facts(plan.quantizer).label}".strip()


def describe_plan(plan: Plan) -> list[str]:
    """The dry run's table: what loads, what it takes, against which budget."""
    estimate = plan.estimate
    where = plan.device + (f" ({', '.join(f'cuda:{i}' for i in plan.gpus)})" if plan.gpus else "")
    lines = [f"📋 Plan: {where}, {plan.dtype}, "
             + (f"{precision_of(plan)} quantization" if plan.quantization else "no quantization")]
    for name, (parameters, nbytes) in estimate.components.items():
        precision = "float32" if name in FLOAT32_COMPONENTS else plan.dtype if plan.quantizer == "metal" and \
            name in METAL_KEPT else precision_of(plan)
        lines.append(f"   {name:<12}{format_count(parameters):>10}  {format_bytes(nbytes):>10}  {precision}")
    media = f", {estimate.media_tokens} of them for media" if estimate.media_tokens else ""
    lines.append(f"   {'KV cache':<12}{'':>10}  {format_bytes(estimate.kv_cache_bytes):>10}  "
                 f"{estimate.context_tokens} tokens " + ("(the context window: a conversation keeps its cache)"
                                                         if estimate.whole_window else
                                                         f"(prompt, estimated{media}, + --max_new_tokens)"))
    lines.append(f"   {'margin':<12}{'':>10}  {format_bytes(estimate.activation_bytes):>10}  "
                 "activations, media encoders, allocator slack")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"   {'total':<12}{format_count(estimate.parameters):>10}  {format_bytes(estimate.total):>10}  "
                 f"of {format_bytes(plan.budget_bytes)} ({plan.budget_source}): {verdict}")
    return lines


def dry_run(info: ModelInfo, facts: ModelFacts, plan: Plan, hw: Hardware, options: Options, media: Media) -> int:
    """--dry_run: the plan; for a model too big here (or a --hardware GPU server) the serving engine's
    command; last, whether a real run would go ahead (a prompt past the context window stops it, as in a run)."""
    for line in describe_plan(plan):
        say(line)
    counted = counted_prompt(info, options, media)
    fit_context(options.sampling, facts.context_window, counted or plan.estimate.prompt_tokens, facts.model_id,
                "" if counted else "about ")
    if options.json:
        write_stdout(json.dumps(plan_as_dict(facts, plan, hw), indent=2) + "\n")
    if not plan.fits or (hw.simulated and hw.cuda):
        for line in engine_command(facts, hw, options, workload_of(options, media)):
            say(line)
    if not plan.proceeds:
        say(f"❌ A real run would stop here: {does_not_fit_message(facts, plan, hw)}")
        return EXIT_FAILURE
    say("✅ Dry run: no weights were loaded; a real run would " + ("follow this plan" if plan.fits else
        f"go ahead on {_device_name(plan.device)} as asked, and fall back to the CPU if memory runs out"))
    return EXIT_OK


def counted_prompt(info: ModelInfo, options: Options, media: Media) -> int | None:
    """The prompt's tokens as a run counts them (the chat template and the media through the checkpoint's own
    processor), where its files are already here; None where they would need a download."""
    if not any((Path(info.path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    processor = load_processor(info, options.max_pixels, {"trust_remote_code": options.trust_remote_code,
                                                          "local_files_only": True})
    messages = build_messages(options.prompt or "", options.system_prompt, media, info.kind)
    return int(prepare_inputs(processor, messages, "cpu", media)["input_ids"].shape[-1])


def engine_command(facts: ModelFacts, hw: Hardware, options: Options, workload: Workload) -> list[str]:
    """For a model too big for this machine (or a --hardware GPU server): the vLLM command that would serve
    it, sized from its bfloat16 weights and this request's cache over the GPUs described (ENGINE_GPU_GB
    each if none), and the --server command that reaches it."""
    pre = facts.prequantized   # an engine serves a checkpoint saved quantized as it is
    estimate = estimate_memory(facts, loading_components(facts, False), "bfloat16", f"{pre.bits}bit" if pre else None,
                               options, workload, pre.method if pre else "bitsandbytes")
    need = estimate.total
    gpu = min(device.total_bytes for device in hw.cuda) if hw.cuda else ENGINE_GPU_GB * GB
    usable = gpu * ENGINE_MEMORY_SHARE * 0.8   # and a fifth of that for the engine's own cache and activations
    splits = [n for n in (1, 2, 4, 8) if not facts.attention_heads or facts.attention_heads % n == 0]
    tensor = next((n for n in splits if need / n <= usable), splits[-1])
    stages = math.ceil(need / (tensor * usable))
    length = min(facts.context_window or 32768, max(4096, math.ceil(estimate.context_tokens / 1024) * 1024))
    command = f"vllm serve {facts.model_id} --tensor-parallel-size {tensor}" + (
        f" --pipeline-parallel-size {stages}" if stages > 1 else "") + f" --max-model-len {length}"
    where = f"{tensor * stages} GPU{'s' if tensor * stages > 1 else ''} of {format_bytes(gpu)}" + (
        f" on {stages} machines (Ray)" if stages > 1 else "")
    precision = pre.label if pre else "bfloat16"
    return [f"🚀 A GPU server can serve it ({format_bytes(need)} in {precision}; {where}): {command}",
            f"   (SGLang: python -m sglang.launch_server --model-path {facts.model_id} --tp {tensor}); then, "
            f"from here: python run_multimodal.py --server http://SERVER:8000/v1 --model_id {facts.model_id} "
            "--prompt \"...\""]


# --- 8. loading, and the runtime decided once --------------------------------------------------

def device_map_for(plan: Plan, hw: Hardware, kind: str) -> dict:
    """from_pretrained's placement arguments for the plan: the GPU(s) it chose, MPS, or the CPU."""
    if plan.device == "cpu":
        return {}
    if plan.device == "mps" or (kind == "omni" and len(plan.gpus) <= 1):
        # accelerate offloading part of an Omni model to CPU or disk leaves meta tensors behind and
        # generation dies (QwenLM/Qwen2.5-Omni #110, #149, #356); on a Mac accelerate's "auto" spills to
        # disk past free RAM. The whole model goes on the device the plan checked, or memory runs out
        # (on a Mac at the capped Metal budget) and the run falls back to the CPU.
        return {"device_map": {"": f"cuda:{plan.gpus[0]}" if plan.gpus else plan.device}}
    if plan.device == "cuda" and len(hw.cuda) > 1:
        # Only the GPUs the plan chose; an Omni model may spread over GPUs but never to the CPU.
        max_memory: dict = {i: hw.cuda[i].free_bytes for i in plan.gpus}
        if kind != "omni":
            max_memory["cpu"] = hw.ram_available
        return {"device_map": "auto", "max_memory": max_memory}
    return {"device_map": "auto"}


def _quantization_config(plan: Plan, info: ModelInfo):
    """transformers' config for quantizing while loading (bitsandbytes, Metal); None for a checkpoint
    saved quantized (its own config says how), after checking the packages its kernels need."""
    import torch
    from transformers.utils import is_kernels_available
    if info.prequantized:
        missing = [name for name in quantizer_facts(plan.quantizer).packages
                   if importlib.util.find_spec(name) is None]
        if missing:
            raise RunError(f"--model_id {info.model_id}: this {info.prequantized.label} checkpoint needs "
                           f"{' and '.join(missing)}: pip install {' '.join(missing)}")
        return None
    if plan.quantizer == "metal":
        if not is_kernels_available():
            raise RunError(f"{plan.quantization} Metal quantization needs the kernels package: pip install -U kernels "
                           "(or --device cpu)")
        from transformers import MetalConfig
        return MetalConfig(bits=int(plan.quantization.removesuffix("bit")), group_size=METAL_GROUP_SIZE,
                           modules_to_not_convert=metal_skips(plan))
    if not _has_bitsandbytes():
        raise RunError(f"--quantize {plan.quantization} needs bitsandbytes: pip install bitsandbytes "
                       "(or run without --quantize)")
    from transformers import BitsAndBytesConfig
    if plan.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=getattr(torch, plan.dtype))
    return BitsAndBytesConfig(load_in_8bit=True)


def metal_skips(plan: Plan) -> list[str] | None:
    """What Metal leaves unquantized: with a spoken reply the talker and token2wav, and the output head, which
    transformers leaves out on its own only where it is given no list (None: its defaults)."""
    return ["lm_head", *METAL_KEPT] if "talker" in plan.components else None


def _metal_kernels_ready(plan: Plan) -> None:
    """MetalLinear fetches its kernels from the Hub at its first product: fetch them now, so that a
    machine that cannot is told before the answer starts."""
    try:
        from transformers.integrations.metal_quantization import _get_metal_kernel
    except ImportError:   # another transformers layout: the first product will say
        return
    try:
        _get_metal_kernel()
    except ImportError as exc:
        raise RunError(f"{plan.quantization} Metal quantization: its kernels could not be loaded ("
                       f"{one_line(exc, 160)}); they come from the Hugging Face Hub on first use, so "
                       "connect once, or use --device cpu") from exc


def cap_metal_memory(plan: Plan) -> None:
    """macOS swaps long before PyTorch runs out of memory, so an over-large run would crawl instead of
    falling back: allocations past Metal's recommended working set (the plan's budget) raise instead."""
    import torch
    try:
        torch.mps.set_per_process_memory_fraction(1.0)   # 1.0 x recommended_max_memory()
    except (AttributeError, RuntimeError) as exc:
        say(f"⚠️ Metal memory could not be capped ({exc}); past {format_bytes(plan.budget_bytes or 0)} macOS may "
            "swap instead of the run falling back to the CPU")
        return
    say(f"🛡️ Metal memory capped at the plan's budget, {format_bytes(plan.budget_bytes or 0)} ({plan.budget_source}): "
        "past it PyTorch raises out-of-memory and the run falls back to the CPU, instead of macOS swapping")


def load_model(info: ModelInfo, plan: Plan, hw: Hardware, trust_remote_code: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    """(model, processor) through transformers' Auto classes; processor is a tokenizer for text-only models,
    read first (a damaged one is said before minutes of loading). An Omni model loads its thinker alone when
    the plan leaves the talker out."""
    import torch
    common = dict(trust_remote_code=trust_remote_code, local_files_only=info.local_only)
    processor = load_processor(info, max_pixels, common)
    kwargs = dict(dtype=getattr(torch, plan.dtype), **common, **device_map_for(plan, hw, info.kind))
    if plan.device == "cuda":
        # cuDNN's attention builds a plan for every new sequence length, which in decoding is every
        # token; the flash and memory-efficient kernels need none (README, "How it decides").
        torch.backends.cuda.enable_cudnn_sdp(False)
    if plan.device == "mps" and info.kind != "omni":
        say("🍎 Using MPS device mapping for Apple Silicon GPU")
    if plan.quantization and (config := _quantization_config(plan, info)) is not None:
        kwargs["quantization_config"] = config
    folder = Path(info.model_id).expanduser()
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        kwargs["use_safetensors"] = True   # never the pickled .bin beside them
    thinker_only = info.kind == "omni" and plan.components == ("thinker",)
    try:
        model = _from_pretrained(_model_class(info, thinker_only), info, kwargs)
    except Exception as exc:   # transformers loads .bin files with weights_only: a pickle with code is refused
        if "weights only load failed" in str(exc).lower() or "weights_only" in str(exc):
            raise RunError(f"--model_id {info.model_id}: its weights file holds objects or code that PyTorch will "
                           "not load safely, so it was not loaded; use a .safetensors checkpoint from a source "
                           "you trust") from exc
        if plan.quantization and isinstance(exc, (RuntimeError, ImportError, ValueError)) and not is_out_of_memory(exc):
            raise RunError(f"{plan.quantization} {plan.quantizer} quantization could not load: "
                           f"{one_line(exc, 300)}") from exc
        raise
    if plan.quantizer == "metal":
        _metal_kernels_ready(plan)
    model.eval()
    talker = getattr(model, "talker", None)
    if talker is not None and hasattr(model, "code2wav") and not hasattr(talker.config, "audio_config"):
        # Qwen3-Omni's talker places a recording's tokens by the audio encoder's window, read from its own
        # config, which lacks it (transformers 5.17-5.25): its generate() fails on any prompt with sound
        talker.config.audio_config = model.config.thinker_config.audio_config
    offloaded = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} & {"cpu", "disk"})
    if plan.device != "cpu" and offloaded:
        say(f"⚠️ The model did not fit on {plan.device}: part of it was offloaded to {' and '.join(offloaded)} "
            "(slow). A smaller model or --quantize 4bit would fit")
    return model, processor


def load_processor(info: ModelInfo, max_pixels: int, common: dict):
    """The checkpoint's processor (its tokenizer for a text model), pictures limited to the pixels the plan counted;
    a tokenizer that cannot be read, or has no chat template, is one line naming what to do."""
    from transformers import AutoProcessor, AutoTokenizer
    try:
        processor = (AutoTokenizer if info.kind == "text" else AutoProcessor).from_pretrained(info.model_id, **common)
    except Exception as exc:   # OSError, ValueError, and tokenizers' bare Exception for a damaged tokenizer.json
        raise UsageError(f"--model_id {info.model_id}: its tokenizer or processor files cannot be read "
                         f"({one_line(exc, 160)}); download the model again") from exc
    if not (getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                  "chat_template", None)):
        raise UsageError(f"--model_id {info.model_id}: its tokenizer has no chat template (chat_template.jinja, or "
                         "chat_template in tokenizer_config.json), so it cannot be asked a question; use the "
                         "model's Instruct checkpoint, or download it again")
    # The plan counted visual tokens with these limits; checkpoints ship up to 12.8 megapixels.
    for name, low, high in (("image_processor", MIN_PIXELS, max_pixels),
                            ("video_processor", VIDEO_MIN_PIXELS, video_max_pixels(max_pixels))):
        if hasattr(getattr(processor, name, None), "size"):
            getattr(processor, name).size = {"shortest_edge": low, "longest_edge": high}
    return processor


def _from_pretrained(model_class, info: ModelInfo, kwargs: dict):
    """The model, refused when its files do not cover it: a tensor missing, or of another shape (transformers
    would fill it with random values, and the answer would be wrong without a word). Qwen2.5-Omni's own
    from_pretrained cannot say so (it loads its voices after the weights): its parent's loads the weights, then
    the voices load."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
    kwargs = {**kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if info.kind == "omni" and model_class is transformers.AutoModelForMultimodalLM:   # the whole Omni model
        model_class = getattr(transformers, MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES[info.model_type])
    if hasattr(model_class, "load_speakers"):
        model, report = super(model_class, model_class).from_pretrained(info.model_id, **kwargs)
        model.load_speakers(Path(info.path) / "spk_dict.pt")
    else:
        model, report = model_class.from_pretrained(info.model_id, **kwargs)
    wrong = [f"{name} (missing)" for name in sorted(report.get("missing_keys", ()))]
    wrong += [f"{name} ({'x'.join(map(str, saved))} in the files, {'x'.join(map(str, wanted))} in the model)"
              for name, saved, wanted in sorted(report.get("mismatched_keys", ()))]
    if wrong:
        raise RunError(f"--model_id {info.model_id}: its weight files do not match the model: {', '.join(wrong[:3])}"
                       + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "") + "; download it again")
    return model


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What loading decided, once: where the model runs, how its answers are decoded, whether it speaks them.
    Code downstream takes what it hands out (a sampler, a queue to the host) and never looks at a device or a
    decoder again."""
    device: str                # "cuda", "mps" or "cpu"
    decoder: str               # "generate" (transformers), "step" (the FastDecoder, a step at a time),
    #                            "graph" (each step one CUDA graph), "compiled" (the graph of compiled layers),
    #                            "stages" (Qwen3-Omni's spoken reply: each part's own forward, a step at a time)
    reason: str                # the line that says which, and why
    speaks: str = ""           # what makes a spoken reply, when one is asked for: "token2wav" (Qwen2.5-Omni's talker
    #                            and token2wav), "code2wav" (Qwen3-Omni's talker, code predictor and code2wav)
    lag: int = 0               # tokens the device may run ahead of the text read back
    draw_on_cpu: bool = False  # MPS can draw tokens of probability zero (pytorch#192577): draw on the CPU

    @property
    def fast(self) -> bool:
        """The FastDecoder decodes."""
        return self.decoder in ("step", "graph", "compiled")

    @property
    def graphs(self) -> bool:
        """On CUDA: steps and speech chunks recorded as CUDA graphs, read back behind events, TF32 products."""
        return self.decoder in ("graph", "compiled")

    def sampler(self, settings) -> Sampler:
        """The next token's chooser, drawing where this runtime draws (settings: _decoding_settings())."""
        return Sampler(settings, self.draw_on_cpu)

    def steps(self, model, prompt_cache, prompt_length: int, budget: int, **step_args) -> FastDecoder:
        """The FastDecoder for a sequence here: over all slots and recorded as a CUDA graph where graphs run, its
        layers compiled with --compile; the model's own forward on the stages runtime."""
        if self.decoder == "stages":
            return ForwardSteps(model, prompt_cache)
        steps = FastDecoder(model, prompt_cache, prompt_length, budget, self.graphs, self.decoder == "compiled",
                            **step_args)
        if self.graphs:
            steps.capture()
        return steps

    def queue(self, side_stream: bool = False) -> HostQueue:
        """Values on their way to the host: behind events on CUDA (their work on a stream of its own with
        `side_stream`), at once elsewhere."""
        return CudaQueue(side_stream) if self.graphs else HostQueue()


def choose_runtime(model, device: str, options: Options) -> Runtime:
    """How this model answers here: transformers' generate(), or the FastDecoder one step at a time, as a CUDA
    graph per step, or as a CUDA graph of compiled layers; for a spoken reply, the thinker and the talker both."""
    import torch
    speaks = ("code2wav" if hasattr(model, "code2wav") else "token2wav") if options.speaks else ""
    if speaks and not getattr(model, "has_talker", False):
        raise RunError(f"{flag_of_speech(options)}: {type(model).__name__} was loaded without its talker, so it "
                       "cannot speak; drop the flag, or use a complete Qwen2.5-Omni checkpoint")
    thinker = model.thinker if speaks else model
    try:   # the flags were checked as they were parsed: a setting refused here is the checkpoint's
        settings = _decoding_settings(thinker, options.sampling.generate_kwargs(),
                                      torch.zeros((1, 1), dtype=torch.long, device=thinker.device))
    except ValueError as exc:
        raise UsageError(f"--model_id {options.model_id}: its generation_config.json asks for decoding that "
                         f"transformers refuses ({one_line(exc, 160)}); override it (--temperature, --top_p, "
                         "--top_k) or correct that file") from exc
    slow = f"🐢 Decoding with transformers' generate(){' for the text and the spoken reply' if speaks else ''}"
    if not options.fast_decode:
        return Runtime(device, "generate", f"{slow} (--no_fast_decode)", speaks)
    why_not = fast_decoding_unsupported(thinker) or (speaks and fast_decoding_unsupported(model.talker,
                                                                                           model.talker.model))
    if why_not and speaks == "code2wav" and settings is not None:
        return Runtime(device, "stages", f"⚡ The spoken reply streamed through each part's own forward pass, a step at "
                       f"a time (the fast decoder does not handle {why_not}): the talker a frame behind each text "
                       "token, code2wav in chunks as the frames come (--no_fast_decode: transformers' generate(), the "
                       "sound at the end)", speaks, 0, device == "mps")
    if why_not:
        return Runtime(device, "generate", f"{slow}: the fast decoder does not handle {why_not}", speaks)
    if settings is None:
        return Runtime(device, "generate", "🐢 These decoding settings need transformers' generate(); the fast "
                                           "decoder is not used", speaks)
    fast = "⚡ Fast decoding: a static KV cache, " + ("one CUDA graph per step" if device in COMPILING_DEVICES else
                                                    "one step at a time") + (
        ", the talker too, the speech made in chunks as its codes come" if speaks else "")
    if device not in COMPILING_DEVICES:
        if options.compile_layers:
            say("⚠️ --compile is used on NVIDIA GPUs only (it made no difference on a CPU; on Apple Silicon "
                "torch.compile is still experimental)")
        draw = device == "mps"
        sampled = speaks or settings[0].do_sample
        return Runtime(device, "step", fast + (", each sampled token drawn on the CPU" if draw and sampled else "")
                       + " (--no_fast_decode: transformers' generate())", speaks, 0, draw)
    if options.compile_layers:
        return Runtime(device, "compiled", fast + ", the layers compiled first (--compile: seconds before the second "
                                                  "token, then faster)", speaks, STREAM_LAG_TOKENS)
    return Runtime(device, "graph", fast + " (--compile: faster after seconds of compiling, for long answers; "
                                           "--no_fast_decode: transformers' generate())", speaks, STREAM_LAG_TOKENS)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model on its device, ready to answer one turn after another, and how it answers."""
    model: object
    processor: object
    plan: Plan
    load_s: float
    device_map: dict
    runtime: Runtime
    speech: Speech | None = None   # the voice of a spoken reply (runtime.speaks)
    token2wav: object = None       # Token2Wav, ready for that voice, when the fast decoder speaks (Qwen2.5-Omni)
    predictor: object = None       # CodePredictor, when the fast decoder speaks (Qwen3-Omni)


def load(info: ModelInfo, plan: Plan, hw: Hardware, options: Options, speech: Speech | None = None) -> Loaded:
    """The model and processor for the plan, the runtime that will answer with them, and for a spoken reply on
    the fast decoder, token2wav ready for the voice."""
    import torch
    if plan.device == "cuda":
        if len(plan.gpus) == 1:   # what runs on "the" GPU (streams, events, graphs) runs on the plan's
            torch.cuda.set_device(plan.gpus[0])
        torch.cuda.reset_peak_memory_stats()
    if plan.device == "mps":
        cap_metal_memory(plan)
    start = time.perf_counter()
    model, processor = load_model(info, plan, hw, options.trust_remote_code, options.max_pixels)
    device_map = {name: str(where) for name, where in (getattr(model, "hf_device_map", None) or
                                                       {"": str(model.device)}).items()}
    load_s = time.perf_counter() - start
    say(describe_sampling(model.generation_config, options.sampling))
    runtime = choose_runtime(model, plan.device, options)
    say(runtime.reason)
    token2wav = token2wav_for(model, speech, runtime) if runtime.fast and runtime.speaks == "token2wav" else None
    predictor = code_predictor_for(model, runtime) if runtime.fast and runtime.speaks == "code2wav" else None
    return Loaded(model, processor, plan, load_s, device_map, runtime, speech if runtime.speaks else None, token2wav,
                  predictor)


# --- 9. the decoding engine: a static KV cache, one step per token, the next token on the device --

def fast_decoding_unsupported(model, decoder=None) -> str | None:
    """Why the fast decoder cannot run this model (or its `decoder`) here, or None when it can."""
    import torch
    try:
        decoder = decoder if decoder is not None else model.get_decoder()
        config = decoder.config
        layer = decoder.layers[0]
    except (AttributeError, IndexError, TypeError):
        return f"this model class ({type(model).__name__})"
    if config.model_type not in FAST_DECODER_TYPES:
        return f"a {config.model_type} decoder"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the {config.hidden_act} activation"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(decoder.rotary_emb, "rope_type", "default") != "default":
        return f"{decoder.rotary_emb.rope_type} rotary scaling"
    experts = getattr(getattr(layer.mlp, "experts", None), "gate_up_proj", None)
    if any(type(m) is not torch.nn.Linear for m in (layer.self_attn.q_proj, getattr(layer.mlp, "up_proj", None)
                                                    or layer.self_attn.o_proj)) or \
            (hasattr(layer.mlp, "experts") and not (isinstance(experts, torch.nn.Parameter)
                                                    and experts.dtype.is_floating_point)):
        return "quantized weights"
    if hasattr(model, "hf_device_map") and len(set(model.hf_device_map.values())) > 1:
        return "weights spread over several devices"
    return None


class FastDecoder:
    """One token per step, as gpt-fast decodes: keys and values in a cache of prompt + max_new_tokens slots (the
    prompt's copied in), no host synchronisation inside a step, a layer written out in about 14 dispatched
    operations (bench/count_step_ops.py; q/k/v and gate/up fused into one product each, the model's Linear
    weights becoming views into them). Attention runs over the filled slots, or (`masked`) over all slots with
    the unfilled masked, so that every step has the same shapes: capture() then records it as a CUDA graph, and
    with compile_layers torch.compile fuses each layer (one compilation serves every layer)."""

    def __init__(self, model, prompt_cache, prompt_length: int, max_new_tokens: int, masked: bool,
                 compile_layers: bool = False, decoder=None, head=None, embed=None, states=None,
                 rope_delta: int | None = None):
        """`decoder`, `head` and `embed(token) -> [1, hidden]` default to the model's own (the talker brings
        its own); `states` [max_new_tokens, hidden], if given, receives each processed token's final
        hidden state plus its embedding (what Qwen2.5-Omni's talker reads of the thinker); `rope_delta` is how
        far past the slots the positions run (by default, what the model's forward kept)."""
        import torch
        decoder = decoder if decoder is not None else model.get_decoder()
        config = decoder.config
        self.decoder, self.layers = decoder, decoder.layers
        self.head = head if head is not None else model.get_output_embeddings()
        self.embed = embed or (lambda token: decoder.embed_tokens(token).view(1, -1))
        self.states, self.prompt_length = states, prompt_length
        self.shape = (config.num_attention_heads, config.num_key_value_heads, self.layers[0].self_attn.head_dim)
        self.eps, self.scaling = config.rms_norm_eps, self.layers[0].self_attn.scaling
        weight = decoder.norm.weight
        device, dtype = weight.device, weight.dtype
        self.hidden = torch.zeros((1, weight.shape[0]), dtype=dtype, device=device)   # the last step's, normed
        self.slots = prompt_length + max_new_tokens
        shape = (len(self.layers), 1, self.shape[1], self.slots, self.shape[2])
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        for i, (keys, values) in enumerate(_cache_layers(prompt_cache, len(self.layers)) if prompt_length else ()):
            self.keys[i, :, :, :prompt_length] = keys
            self.values[i, :, :, :prompt_length] = values
        delta = _rope_delta(model) if rope_delta is None else rope_delta
        self.cos, self.sin = _rotary_tables(decoder, self.slots, device, dtype, delta)
        self.slot_numbers = torch.arange(self.slots, device=device)
        self.weights = [_fused_weights(layer) for layer in self.layers]
        self.layer_in, self.layer_out = _layer_in, _layer_out
        if compile_layers:   # dynamic=False: one shape, one compilation for all layers
            self.layer_in = torch.compile(_layer_in, fullgraph=True, dynamic=False)
            self.layer_out = torch.compile(_layer_out, fullgraph=True, dynamic=False)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)   # the step's inputs
        self.position = torch.full((1,), prompt_length, dtype=torch.long, device=device)
        self.cuda_graph = self.logits = None
        self.logits_at = self._over_all_slots if masked else self._over_filled_slots

    def _step(self, token, position, length: int, empty):
        """Embedding to logits for one token at slot `position`: attention over the first `length` slots,
        those marked in `empty` left out."""
        x = embedded = self.embed(token)
        cos, sin = self.cos[position], self.sin[position]
        for i, weights in enumerate(self.weights):
            q, k, v = self.layer_in(x, weights, cos, sin, self.eps, self.shape)
            self.keys[i].index_copy_(2, position, k)
            self.values[i].index_copy_(2, position, v)
            x = self.layer_out(x, q, self.keys[i][:, :, :length], self.values[i][:, :, :length], empty, weights,
                               self.eps, self.scaling, self.shape)
        x = _norm(x, self.decoder.norm.weight, self.eps)
        self.hidden.copy_(x)
        if self.states is not None:
            self.states.index_copy_(0, position - self.prompt_length, x + embedded)
        return self.head(x).float()

    def _masked_step(self):
        """The step over all slots, the unfilled masked: the same shapes at every position (a CUDA graph's)."""
        empty = (self.slot_numbers > self.position)[None, None, None, :]
        return self._step(self.token, self.position, self.slots, empty)

    def _over_filled_slots(self, token, position: int):
        """The next token's logits (float32, [1, vocabulary]) after `token` (a [1] tensor) at slot `position`."""
        self.position.fill_(position)
        return self._step(token.view(1, 1), self.position, position + 1, None)

    def _over_all_slots(self, token, position: int):
        self.position.fill_(position)
        self.token.copy_(token.view(1, 1))
        return self._masked_step()

    def _replayed(self, token, position: int):
        self.position.fill_(position)
        self.token.copy_(token.view(1, 1))
        self.cuda_graph.replay()
        return self.logits.clone()   # the next replay overwrites the graph's output

    def capture(self) -> None:
        """Record the (masked) step as a CUDA graph, after two warm-up runs on a side stream (they set up
        cuBLAS and compile; they write the first decode slot, which the first real step rewrites); from
        now on logits_at() replays it."""
        import torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._masked_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.cuda_graph):
            self.logits = self._masked_step()
        self.logits_at = self._replayed


def _rotary_tables(decoder, slots: int, device, dtype, delta: int):
    """cos and sin for every slot, as the model's rotary embedding computes them (float32, then the
    model's dtype), the sin's first half negated: x * cos + roll(x) * sin is then rotate_half's rotary.
    Multimodal Qwens shift text positions after pictures by `rope_deltas`; past the prompt all three of
    their position streams are equal, which is plain 1-D rotary."""
    import torch
    positions = torch.arange(slots, device=device, dtype=torch.float32) + delta
    angles = positions[:, None] * decoder.rotary_emb.inv_freq.float().to(device)[None, :]
    scaling = getattr(decoder.rotary_emb, "attention_scaling", 1.0)
    cos, sin = angles.cos() * scaling, angles.sin() * scaling
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def _norm(x, weight, eps: float):
    """RMSNorm as one dispatched operation: PyTorch's fused kernel (F.rms_norm dispatches to it on CUDA
    and MPS, and decomposes into six operations on the CPU, where the fused one is called directly)."""
    import torch
    from torch.nn import functional as F
    if x.device.type == "cpu" and hasattr(torch.ops.aten, "_fused_rms_norm"):
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)[0]
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _layer_in(x, weights, cos, sin, eps: float, shape: tuple):
    """A decoder layer up to its attention: norm, q/k/v in one product, Qwen3's norms of q and k per head,
    rotary on q and k together (the halves swapped by a roll, the sign in the sin table). q as [1, kv_heads,
    queries per kv head, head_dim], grouped onto the key/value head they share; k and v as [1, kv_heads, 1,
    head_dim]."""
    import torch
    norm, qkv, qkv_bias, q_norm, k_norm = weights[:5]
    heads, kv_heads, head_dim = shape
    h = _norm(x, norm, eps)
    qkv = (torch.addmm(qkv_bias, h, qkv.t()) if qkv_bias is not None else torch.mm(h, qkv.t())).view(1, -1, head_dim)
    qk = qkv[:, :heads + kv_heads]
    if q_norm is not None:
        qk = torch.cat((_norm(qk[:, :heads], q_norm, eps), _norm(qk[:, heads:], k_norm, eps)), dim=1)
    qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, dims=-1), sin)
    return (qk[:, :heads].view(1, kv_heads, heads // kv_heads, head_dim), qk[:, heads:].view(1, kv_heads, 1, head_dim),
            qkv[:, heads + kv_heads:].view(1, kv_heads, 1, head_dim))


def _layer_out(x, q, keys, values, empty, weights, eps: float, scaling: float, shape: tuple):
    """The rest of a decoder layer: attention, the output projection added to the residual by its own
    product, the MLP with gate and up in one product (or a mixture of experts, and its shared expert). Over the
    filled slots (`empty` None) attention is
    one fused call, the grouped queries as its rows; over all slots (the CUDA graph) it is two small
    products and a softmax with `empty` masked, which for one query token beat PyTorch's fused kernels
    (bench/profile_decode_step.py)."""
    import torch
    from torch.nn import functional as F
    o, norm, gate_up, down, experts = weights[5:]
    heads, kv_heads, head_dim = shape
    if empty is None:
        out = F.scaled_dot_product_attention(q, keys, values, scale=scaling)
    else:
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling
        out = torch.matmul(scores.float().masked_fill(empty, float("-inf")).softmax(dim=-1).to(values.dtype), values)
    x = torch.addmm(x, out.view(1, heads * head_dim), o.t())
    h = _norm(x, norm, eps)
    if experts is None:
        gate, up = torch.mm(h, gate_up.t()).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate) * up, down.t())
    router, gate_ups, downs, top_k, normalize, shared_gate = experts
    x = x + _experts(h, router, gate_ups, downs, top_k, normalize)
    if gate_up is not None:   # a shared expert beside them, gated
        gate, up = torch.mm(h, gate_up.t()).chunk(2, dim=-1)
        x = x + torch.sigmoid(torch.mm(h, shared_gate.t())) * torch.mm(F.silu(gate) * up, down.t())
    return x


def _experts(h, router, gate_ups, downs, top_k: int, normalize: bool):
    """A mixture of experts for one token, as transformers' router chooses them (softmax in float32, the top k,
    their weights renormalised): the chosen experts' weights gathered and applied in two batched products,
    shapes fixed whatever is chosen (a CUDA graph's), nothing read back."""
    import torch
    from torch.nn import functional as F
    probabilities = F.softmax(torch.mm(h, router.t()), dtype=torch.float, dim=-1)
    weights, chosen = torch.topk(probabilities, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    chosen = chosen.view(-1)
    gate, up = torch.bmm(gate_ups.index_select(0, chosen), h.view(1, -1, 1).expand(top_k, -1, -1)).chunk(2, dim=1)
    out = torch.bmm(downs.index_select(0, chosen), F.silu(gate) * up)   # [top_k, hidden, 1]
    return torch.mm(weights.to(h.dtype), out.view(top_k, -1))


def _fused_weights(layer) -> tuple:
    """A layer's weights for the fast step, q/k/v and gate/up each fused into one matrix: fewer,
    larger products. The layer's own Linear modules keep working (their weights become views into
    the fused ones, so no memory is added), and a model is fused once. Qwen3's layers add q and k norms; a
    mixture of experts gives its router, its experts' stacked weights and its shared expert."""
    fused = getattr(layer, "_fast_decoder_weights", None)
    if fused is None:
        attention, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        norms = tuple(getattr(getattr(attention, name, None), "weight", None) for name in ("q_norm", "k_norm"))
        dense = getattr(mlp, "shared_expert", mlp) if hasattr(mlp, "experts") else mlp
        gate_up = down = experts = None
        if hasattr(dense, "gate_proj"):
            gate_up, _ = _fuse([dense.gate_proj, dense.up_proj])
            down = dense.down_proj.weight
        if hasattr(mlp, "experts"):
            shared_gate = getattr(mlp, "shared_expert_gate", None)
            experts = (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.top_k,
                       bool(mlp.gate.norm_topk_prob), None if shared_gate is None else shared_gate.weight)
        fused = (layer.input_layernorm.weight, qkv, qkv_bias, *norms, attention.o_proj.weight,
                 layer.post_attention_layernorm.weight, gate_up, down, experts)
        layer._fast_decoder_weights = fused
    return fused


def _fuse(linears: list) -> tuple:
    """One weight (and bias) for several Linear modules that read the same input."""
    import torch
    weight = torch.cat([linear.weight for linear in linears])
    has_bias = all(linear.bias is not None for linear in linears)
    bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
    start = 0
    for linear in linears:
        size = linear.out_features
        linear.weight = torch.nn.Parameter(weight[start:start + size], requires_grad=False)
        if has_bias:
            linear.bias = torch.nn.Parameter(bias[start:start + size], requires_grad=False)
        start += size
    return weight, bias


def cache_of(output):
    """A forward's KV cache: `cache` from transformers 5.24 on, `past_key_values` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_keyword(model) -> str:
    """The keyword a model's forward and generate() take a KV cache by: `cache` from transformers 5.24 on (the old
    name is deprecated there)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_layers(cache, count: int):
    """(keys, values) of each layer of a transformers cache, across the 5.x layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers[:count]]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(count)]


def _rope_delta(model) -> int:
    """How far a multimodal Qwen's text positions sit from the cache slots after the prompt (0 for
    text-only models): the forward keeps it as `rope_deltas` for generate's next steps."""
    for module in model.modules():
        delta = getattr(module, "rope_deltas", None)
        if delta is not None:
            return int(delta.reshape(-1)[0])
    return 0


def _decoding_settings(model, generate_kwargs: dict, prompt):
    """transformers' own view of the decoding asked for (generate()'s keyword arguments): (generation
    config, logits processors, end tokens), built by the same private helpers generate() uses, so that
    the fast decoder samples exactly as generate() would. None where those helpers or the mode are not
    what this was written against: then generate() runs instead (choose_runtime)."""
    from transformers import LogitsProcessorList
    try:
        config, model_kwargs = model._prepare_generation_config(model.generation_config, **generate_kwargs)
        if str(getattr(config.get_generation_mode(), "value", "")) not in ("greedy_search", "sample"):
            return None
        if config.stop_strings is not None or config.max_time is not None:
            return None
        model._prepare_special_tokens(config, True, device=prompt.device)
        processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt.shape[-1], encoder_input_ids=prompt,
            prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=prompt.device,
            model_kwargs=model_kwargs)
    except (AttributeError, TypeError):   # a ValueError (a setting transformers refuses) is the caller's to say
        return None
    end = config.eos_token_id
    end = set() if end is None else set(end) if isinstance(end, (list, tuple)) else {end}
    return config, processors, end


class Sampler:
    """The next token, chosen on the device by transformers' own logits processors (temperature,
    top-k, top-p, repetition penalty, min_new_tokens) and then greedily or by drawing from them; with
    `draw_on_cpu` (MPS) the draw is made on the CPU from the processed scores, with the CPU's seeded
    generator, so a seeded answer repeats. `race` draws inside a CUDA graph, where multinomial cannot run (it
    waits for the GPU): the token whose probability over an exponential variate is largest, which has the
    same distribution (other draws from the same seed)."""

    def __init__(self, settings, draw_on_cpu: bool = False):
        (self.config, self.processors, self.end), self.draw_on_cpu = settings, draw_on_cpu
        self.race = False

    def __call__(self, ids, logits):
        """ids: the sequence so far [1, n]; logits: float32 [1, vocabulary] -> the token [1]."""
        import torch
        scores = self.processors(ids, logits)
        if not self.config.do_sample:
            return torch.argmax(scores, dim=-1)
        if self.draw_on_cpu:
            probabilities = torch.nn.functional.softmax(scores.cpu(), dim=-1)
            return torch.multinomial(probabilities, num_samples=1).squeeze(1).to(logits.device)
        if self.race:
            probabilities = torch.nn.functional.softmax(scores, dim=-1)
            return torch.argmax(probabilities / torch.empty_like(probabilities).exponential_(1), dim=-1)
        return torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def choose_token(sampler: Sampler, ids, logits, slot: int) -> None:
    """ids[0, slot] from the logits, and ids[1, slot] whether they were all finite, without a host
    synchronisation: non-finite logits (a float16 overflow) are zeroed first, so that drawing from them
    cannot fail on the device; the token read back with its flag then stops the answer."""
    import torch
    ok = torch.isfinite(logits).all()
    ids[:1, slot] = sampler(ids[:1, :slot], torch.where(ok, logits, 0.0))
    ids[1, slot] = ok


class HostQueue:
    """Values on their way from the device to the host, taken in the order they were put. This one takes them at
    once: on a CPU nothing is on its way, and on MPS reading a value waits for all the work queued before it
    anyway. `seconds` adds up the work between mark() and put() of what was taken."""

    def __init__(self):
        self.items, self.seconds = collections.deque(), 0.0

    def reserve(self, size: int, dtype) -> None:
        """A new run of at most `size` values of `dtype`: what an interrupted one left is dropped."""
        self.items.clear()
        self.seconds = 0.0

    def working(self):
        """Where the work whose results are put runs (here: where it is)."""
        return contextlib.nullcontext()

    def mark(self):
        return time.perf_counter()

    def put(self, value, since=None) -> None:
        self.seconds += time.perf_counter() - since if since is not None else 0.0
        self.items.append(value.to("cpu", copy=True))

    def ready(self) -> list:
        """The values that have arrived, oldest first, without waiting."""
        return self.take()

    def take(self, keep: int = 0) -> list:
        """All but the `keep` newest values, oldest first, waiting for them."""
        return [self._pop() for _ in range(len(self.items) - keep)]

    def _pop(self):
        return self.items.popleft()


class CudaQueue(HostQueue):
    """On CUDA each value is copied into page-locked host memory behind an event, so that putting never waits for
    the GPU and taking waits for that value alone. With `side_stream` the work runs on a stream of its own at a
    higher priority than the decoders' (working()), so that the talker goes on making codes while the GPU makes
    the speech of the ones before: nothing there may hold the host (no copy but into page-locked memory, no
    allocation). `seconds` is the GPU's time."""

    def __init__(self, side_stream: bool = False):
        import torch
        super().__init__()
        self.stream = torch.cuda.Stream(priority=-1) if side_stream else torch.cuda.current_stream()
        self.host, self.at = None, 0

    def reserve(self, size: int, dtype) -> None:
        import torch
        self.take()   # an interrupted run's values may still be on their way into this memory
        super().reserve(size, dtype)
        if self.host is None or len(self.host) < size or self.host.dtype != dtype:
            # here, before the run: allocating page-locked memory waits for the whole GPU
            self.host = torch.empty(size, dtype=dtype, pin_memory=True)
        self.at = 0

    @contextlib.contextmanager
    def working(self):
        import torch
        self.stream.wait_stream(torch.cuda.current_stream())   # its inputs come from the decoders' stream
        with torch.cuda.stream(self.stream):
            yield

    def mark(self):
        import torch
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def put(self, value, since=None) -> None:
        import torch
        target, self.at = self.host[self.at:self.at + value.numel()], self.at + value.numel()
        target.copy_(value.reshape(-1), non_blocking=True)
        event = torch.cuda.Event(enable_timing=since is not None)
        event.record()
        self.items.append((target, event, since))

    def ready(self) -> list:
        return [self._pop() for _ in itertools.takewhile(lambda item: item[1].query(), list(self.items))]

    def _pop(self):
        target, event, since = self.items.popleft()
        event.synchronize()   # that value only; later work keeps the device busy
        self.seconds += since.elapsed_time(event) / 1000 if since is not None else 0.0
        return target.clone()   # the page-locked memory serves the next run


class Decoding:
    """One sequence, its tokens chosen as generate() would choose them: the first from the prompt's forward
    (`prefill`: its output, the caller keeping what else it needs of it), then one FastDecoder step each (a CUDA
    graph where the runtime says so), each chosen on the device and sent to the host through the runtime's
    queue. Iterating yields them as they come: the first at once, then `lag` behind the device (the caller stops
    at an end token; steps past it are thrown away). The talker goes at its own pace: advance(), then take().
    Non-finite logits raise NonFiniteLogits when their token is read."""

    def __init__(self, runtime: Runtime, model, generate_kwargs: dict, prompt, prefill, **step_args):
        import torch
        self.runtime, self.model, self.step_args, self.prefill, self.steps = runtime, model, step_args, prefill, None
        self.sampler = runtime.sampler(_decoding_settings(model, generate_kwargs, prompt))
        self.length, self.budget, self.made = prompt.shape[-1], generate_kwargs["max_new_tokens"], 0
        self.ids = torch.ones((2, self.length + self.budget), dtype=torch.long, device=prompt.device)   # token, finite
        self.ids[:1, :self.length] = prompt
        self.queue = runtime.queue()
        self.queue.reserve(2 * self.budget, torch.long)
        self._choose(prefill.logits[:, -1].to(dtype=torch.float32, copy=True))

    @property
    def end(self) -> set:
        """The tokens that end the sequence."""
        return self.sampler.end

    @property
    def generated(self):
        """The tokens chosen so far, on the device: [1, made] (and the slots after them)."""
        return self.ids[:1, self.length:]

    def _choose(self, logits) -> None:
        choose_token(self.sampler, self.ids, logits, self.length + self.made)
        self.queue.put(self.ids[:, self.length + self.made])
        self.made += 1

    def advance(self) -> None:
        """One more token, chosen on the device; the first call sets up the steps."""
        if self.steps is None:
            self.steps = self.runtime.steps(self.model, cache_of(self.prefill), self.length, self.budget,
                                            **self.step_args)
            self.prefill = None   # its cache now lives in the steps' own
        slot = self.length + self.made
        self._choose(self.steps.logits_at(self.ids[0, slot - 1:slot], slot - 1))

    def take(self, keep: int = 0) -> list[int]:
        """The tokens that came back, all but the `keep` newest, waiting for them."""
        tokens = []
        for token, finite in (value.tolist() for value in self.queue.take(keep)):
            if not finite:
                raise NonFiniteLogits()
            tokens.append(token)
        return tokens

    def keep_in(self, chat: ChatCache | None, tokens: list[int]) -> None:
        """The chat's cache and ids grow by the answer's `tokens` (those read back), as far as the steps computed
        their keys and values: all but the last."""
        fed = len(tokens) - 1 if self.steps is not None else 0
        if chat is None or chat.cache is None or fed <= 0:
            return
        start, end = self.length, self.length + fed
        for layer, (keys, values) in enumerate(zip(self.steps.keys, self.steps.values)):
            chat.cache.update(keys[:, :, start:end], values[:, :, start:end], layer)
        chat.ids = chat.ids + tokens[:fed]
        if chat.rows is not None and self.steps.states is not None:
            import torch
            chat.rows = torch.cat((chat.rows, self.steps.states[None, :fed]), dim=1)

    def __iter__(self):
        yield from self.take()
        while self.made < self.budget:
            self.advance()
            yield from self.take(self.runtime.lag)
        yield from self.take()


def fast_generate(runtime: Runtime, model, inputs, sampling: Sampling, streamer, extra: dict,
                  chat: ChatCache | None = None) -> None:
    """Decode like generate(): the prompt through the model's forward (in a chat, only what its cache lacks),
    then one token at a time through a Decoding, each token handed to `streamer` as generate() would, and to
    the chat's cache after (an interrupted answer's too). The first token is shown before the steps are set up
    (a CUDA graph captured, the layers compiled), so it never waits on them."""
    import torch
    prompt = inputs["input_ids"]
    streamer.put(prompt.cpu())
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out, delta = prefill(model, inputs, extra, chat, **keep)
    text = Decoding(runtime, model, sampling.generate_kwargs(), prompt, out, rope_delta=delta)
    del out
    tokens: list[int] = []
    try:
        for token in text:
            tokens.append(token)
            streamer.put(torch.tensor([token]))
            if token in text.end:
                break
    finally:   # an answer stopped by Ctrl-C stays in the cache as in the conversation
        text.keep_in(chat, tokens)
    streamer.end()


@dataclasses.dataclass
class ChatCache:
    """What the model has computed of a conversation, kept from one turn to the next: the keys and values of the
    tokens `ids` (a transformers cache, on the model's device), the offset of their rotary positions (`delta`:
    Qwen's 3-D positions run ahead of the token count after pictures, video and sound), and for a spoken reply
    the thinker's states the talker reads (`rows`). A turn computes only what follows the longest prefix its
    prompt shares with `ids` (prefill); `reused` is how many tokens the last turn took from here."""
    cache: object = None
    ids: list = dataclasses.field(default_factory=list)
    delta: int = 0
    rows: object = None
    reused: int = 0
    pictures: dict = dataclasses.field(default_factory=dict)   # what the processor made of each picture and recording

    def clear(self) -> None:
        """A new conversation (/clear)."""
        self.forget()
        self.pictures.clear()

    def forget(self) -> None:
        """No keys and values kept (a prompt computed whole, or a turn stopped while they grew)."""
        self.cache, self.ids, self.delta, self.rows, self.reused = None, [], 0, None, 0

    def shared(self, ids: list) -> int:
        """How many tokens of the prompt `ids` the cache holds (all but its last one at most: a turn computes at
        least one token, whose logits it needs); none if its layers do not all hold its ids (a turn stopped
        while they grew)."""
        held = {getattr(keys, "shape", (0,))[-2:][0] for keys, _ in _cache_layers(self.cache, len(self.cache))} \
            if self.cache is not None else set()
        if held != {len(self.ids)}:
            return 0
        count = 0
        for held, wanted in zip(self.ids, ids[:-1]):
            if held != wanted:
                break
            count += 1
        return count

    def cut(self, length: int) -> None:
        """Keep the first `length` tokens (a turn that failed, or a prompt that parts from the cache there)."""
        if self.cache is not None and length < len(self.ids):
            self.cache.crop(length - len(self.ids))   # how many to drop: transformers' crop across its 5.x versions
        self.ids = self.ids[:length]
        self.rows = None if self.rows is None else self.rows[:, :length]


def rope_positions(model, inputs, extra: dict):
    """(positions, delta) of a prompt's tokens: Qwen's 3-D rotary positions for pictures, video and sound, from the
    model's own get_rope_index, and how far past the token count the next one sits; (None, 0) for a text model
    (and a multimodal one given only text), whose positions are the slots."""
    import torch
    core = next((m for m in (model, getattr(model, "model", None)) if hasattr(m, "get_rope_index")), None)
    if core is None or not any(key in inputs for key in ("image_grid_thw", "video_grid_thw", "input_features")):
        return None, 0
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    if "mm_token_type_ids" in inspect.signature(core.get_rope_index).parameters:   # Qwen2.5-VL
        positions, deltas = core.get_rope_index(
            ids, inputs.get("mm_token_type_ids"), image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=mask)
    else:   # Qwen2.5-Omni's thinker
        lengths = inputs["feature_attention_mask"].sum(-1) if "feature_attention_mask" in inputs else None
        positions, deltas = core.get_rope_index(ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), mask,
                                                extra.get("use_audio_in_video", False), lengths,
                                                inputs.get("video_second_per_grid"))
    return positions, int(deltas.reshape(-1)[0])


def prefill(model, inputs, extra: dict, chat: ChatCache | None = None, **kwargs):
    """The prompt through the model's forward (`kwargs` beside it: logits_to_keep, hidden states): (output, rope
    delta). In a chat (`chat`), only what follows the longest prefix the cache already holds: those tokens, the
    pictures, videos and recordings among them alone encoded, at the positions a prefill of the whole prompt
    gives them; the cache grows by them."""
    positions, delta = rope_positions(model, inputs, extra)
    ids = inputs["input_ids"][0].tolist()
    start = chat.shared(ids) if chat is not None and chat.cache is not None else 0
    suffix = _suffix(model, inputs, start, extra) if start else None
    if suffix is None:   # the whole prompt, as the model's own forward takes it
        if chat is not None:
            chat.forget()
        out = model(**inputs, **extra, **kwargs, use_cache=True)
        start, cache = 0, cache_of(out)
    else:
        start, suffix_inputs = suffix
        chat.cut(start)
        where = {} if positions is None else {"position_ids": positions[..., start:]}
        out = model(**suffix_inputs, **where, **extra, **kwargs, **{cache_keyword(model): chat.cache}, use_cache=True)
        cache = chat.cache
    if chat is not None:
        chat.cache, chat.ids, chat.delta, chat.reused = cache, ids, delta, start
    return out, delta


def _suffix(model, inputs, start: int, extra: dict):
    """(start, inputs) for the prompt's tokens from `start` on: moved back to the start of a picture, video or
    recording it would cut, with those media only (the earlier ones are in the cache). None where the suffix
    cannot be told apart (a video's sound interleaved with its pictures): then the whole prompt is computed."""
    import torch
    config = getattr(model, "config", None)
    ids = inputs["input_ids"][0]
    spans = {}   # modality -> [(first, end)] of its placeholder runs
    for modality, names in (("image", ("image_token_id", "image_token_index")),
                            ("video", ("video_token_id", "video_token_index")),
                            ("audio", ("audio_token_id", "audio_token_index"))):
        token = next((getattr(config, name) for name in names if getattr(config, name, None) is not None), None)
        marks = (ids == token).int() if token is not None else torch.zeros_like(ids)
        edges = torch.diff(torch.cat((marks.new_zeros(1), marks, marks.new_zeros(1)))).nonzero().view(-1).tolist()
        spans[modality] = list(zip(edges[::2], edges[1::2]))
        start = min([start] + [first for first, end in spans[modality] if first < start < end])
    new = {modality: sum(first < start for first, _ in runs) for modality, runs in spans.items()}   # media before
    if start == 0 or (extra.get("use_audio_in_video") and any(first >= start for runs in spans.values()
                                                              for first, _ in runs)):
        return None
    out = {"input_ids": inputs["input_ids"][:, start:]}
    for grid, pixels, modality, per_item in (("image_grid_thw", "pixel_values", "image", ()),
                                             ("video_grid_thw", "pixel_values_videos", "video",
                                              ("second_per_grid_ts", "video_second_per_grid"))):
        if grid in inputs and len(inputs[grid]) > new[modality]:
            rows = int(inputs[grid][:new[modality]].prod(-1).sum())
            out.update({grid: inputs[grid][new[modality]:], pixels: inputs[pixels][rows:]})
            out.update({key: inputs[key][new[modality]:] for key in per_item if key in inputs})
    if "input_features" in inputs and len(inputs["input_features"]) > new["audio"]:
        out.update({key: inputs[key][new["audio"]:] for key in ("input_features", "feature_attention_mask")})
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, start:]
    return start, out


# --- 10. a spoken reply: the talker on the decoding engine, token2wav in chunks, heard as made -----

class AudioOut:
    """The spoken reply as its chunks come: kept for --output_audio, and with --play heard through the default
    output device as they come, PortAudio's own thread pulling them from a queue so that generating never waits
    on the sound card. `first_s` is when the first chunk came, counted from `start`; `played` counts the samples
    handed to the device, `first_played` and `silenced` are when the first went and when `stop` silenced it."""

    def __init__(self, play: bool, start: float, stop=None):
        """`stop`, a threading.Event: once set, the sound stops at the next block the device asks for."""
        import numpy as np
        self.chunks, self.first_s, self.start, self.stop = [], None, start, stop
        self.played, self.first_played, self.silenced = 0, None, None
        self.queue, self.buffer, self.stream = collections.deque(), np.zeros(0, dtype=np.float32), None
        if play:
            import sounddevice
            self.stream = sounddevice.OutputStream(samplerate=SPEECH_SAMPLE_RATE, channels=1, dtype="float32",
                                                   callback=self._fill)
            self.stream.start()

    def _fill(self, out, frames, time_info, status) -> None:
        import numpy as np
        if self.stop is not None and self.stop.is_set():
            self.queue.clear()
            self.buffer = self.buffer[:0]
            self.silenced = self.silenced or time.perf_counter()
        while len(self.buffer) < frames and self.queue:
            self.buffer = np.concatenate((self.buffer, self.queue.popleft()))
        count = min(frames, len(self.buffer))
        out[:count, 0], out[count:, 0], self.buffer = self.buffer[:count], 0.0, self.buffer[count:]
        if count and self.first_played is None:
            self.first_played = time.perf_counter()
        self.played += count

    def heard_share(self) -> float:
        """The share of the speech made so far that was handed to the device."""
        made = sum(len(chunk) for chunk in self.chunks)
        return min(1.0, self.played / made) if made else 0.0

    def add(self, samples) -> None:
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.start
        self.chunks.append(samples)
        if self.stream:
            self.queue.append(samples)

    def close(self, drain: bool):
        """All the samples (None if there were none); with --play, after they have been heard (`drain`)."""
        import numpy as np
        if self.stream:
            while drain and (self.queue or len(self.buffer)) and not (self.stop is not None and self.stop.is_set()):
                time.sleep(0.02)
            self.stream.stop()
            self.stream.close()
        return np.concatenate(self.chunks) if self.chunks else None


class Token2Wav:
    """Qwen2.5-Omni's token2wav for one voice, as a reply's chunks need it: the DiT's ODE solved over a window of
    mel frames (the speaker encoding, the same at every evaluation, computed once), the vocoder over a stretch of
    mel. With the runtime's graphs (CUDA) both are CUDA graphs, one per length the chunk schedule needs, and the
    DiT's float32 products use TF32 (its convolutions already do): the mel moves by about 2e-4 of its size
    (bench/profile_token2wav.py). Its chunks go through a queue of their own (on CUDA, a stream of their own)."""

    def __init__(self, token2wav, voice: dict, runtime: Runtime, seed: int = 0):
        import torch
        if token2wav.dtype != torch.float32:   # as generate() does
            token2wav.float()
        self.dit, self.vocoder, self.seed = token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model, seed
        self.device = next(self.dit.parameters()).device
        self.per_code, self.block, self.mel_dim = self.dit.repeats, self.dit.block_size, self.dit.mel_dim
        self.tf32 = runtime.graphs
        self.cond = voice["cond"].to(self.device).float().view(1, -1)
        self.reference = voice["ref_mel"].to(self.device).float()
        options = {name: parameter.default for name, parameter in
                   inspect.signature(type(token2wav).forward).parameters.items()}
        self.scale, sway = options["guidance_scale"], options["sway_coefficient"]
        self.times = torch.linspace(0, 1, options["num_steps"], device=self.device, dtype=torch.float32)
        if sway is not None:
            self.times += sway * (torch.cos(torch.pi / 2 * self.times) - 1 + self.times)
        with torch.no_grad():   # the encoder's input in the DiT: the reference, then zeros for the unguided half
            encoded = self.dit.input_embed.spk_encoder(torch.cat((self.reference, torch.zeros_like(self.reference))))
        self.encoder = torch.nn.Module()
        self.encoder.forward = lambda _reference: encoded
        # the vocoder's floor on the mel's amplitude, as its own amplitude_to_db makes it (there, each call)
        self.floor = torch.exp(torch.tensor(VOCODER_FLOOR_DB / 20 * math.log(10), device=self.device))
        self.graphs: dict = {}           # window length -> (graph, noise in, codes in, mel out)
        self.vocoder_graphs: dict = {}   # mel length -> (graph, mel in, wave out)
        self.queue = runtime.queue(side_stream=True)

    def _solve(self, state, code):
        """The ODE from `state` [1, frames, mel_dim] for `code`: RK4 over self.times with classifier-free
        guidance, the steps as transformers' RungeKutta4ODESolver takes them. [1, mel_dim, frames]."""
        import torch
        speaker = self.cond.unsqueeze(1).repeat(1, state.shape[1], 1)
        embed, matmul = self.dit.input_embed, torch.backends.cuda.matmul
        encoder, embed.spk_encoder = embed.spk_encoder, self.encoder
        tf32, matmul.allow_tf32 = matmul.allow_tf32, matmul.allow_tf32 or self.tf32
        try:
            def velocity(time_step, x):
                out = self.dit(hidden_states=x, quantized_code=code, speaker_embedding=speaker,
                               condition_vector=self.reference, time_step=time_step, apply_cfg=True)
                guided, unguided = torch.chunk(out, 2, dim=0)
                return guided + (guided - unguided) * self.scale
            for t0, t1 in zip(self.times[:-1], self.times[1:]):
                dt = t1 - t0
                k1 = velocity(t0, state)
                k2 = velocity(t0 + dt * (1 / 3), state + dt * k1 * (1 / 3))
                k3 = velocity(t0 + dt * (2 / 3), state + dt * (k2 - k1 * (1 / 3)))
                k4 = velocity(t1, state + dt * (k1 - k2 + k3))
                state = state + (k1 + 3 * (k2 + k3) + k4) * dt / 8
        finally:
            embed.spk_encoder, matmul.allow_tf32 = encoder, tf32
        return state.permute(0, 2, 1)

    def vocode(self, mel):
        """The vocoder's waveform [samples] for mel [1, mel_dim, frames], left on the device: the vocoder's
        forward from its own modules, which would copy it to the host (waiting for the GPU) and make a tensor
        from a number on each call (waiting again); equal to it (tests/test_speech.py)."""
        import torch
        vocoder = self.vocoder
        decibels = 20 * torch.log10(torch.clamp(torch.exp(mel), min=self.floor)) - 20
        hidden = vocoder.conv_pre(vocoder.normalize_spectrogram(decibels, 1, VOCODER_FLOOR_DB))
        per_layer = vocoder.num_residual_blocks
        for layer in range(vocoder.num_upsample_layers):
            hidden = vocoder.ups[layer][0](hidden)
            hidden = sum(block(hidden) for block in vocoder.resblocks[layer * per_layer:(layer + 1) * per_layer])
            hidden = hidden / per_layer
        return torch.clamp(vocoder.conv_post(vocoder.activation_post(hidden)), min=-1.0, max=1.0).reshape(-1)

    def solve(self, noise, code):
        """Mel [1, mel_dim, frames] from `noise` [1, frames, mel_dim] and the codes covering those frames."""
        return self._replayed(self.graphs, noise.shape[1], self._solve, noise, code)

    def wave(self, mel):
        """The vocoder's waveform for mel [1, mel_dim, frames]."""
        return self._replayed(self.vocoder_graphs, mel.shape[2], self.vocode, mel)

    @staticmethod
    def _replayed(graphs: dict, length: int, eager, *inputs):
        """eager(*inputs), from the CUDA graph recorded for this length where there is one (its output then valid
        until its next replay on this stream)."""
        if length not in graphs:
            return eager(*inputs)
        graph, *slots, output = graphs[length]
        for slot, value in zip(slots, inputs):
            slot.copy_(value)
        graph.replay()
        return output

    def capture(self, windows: list[int], vocoder_lengths: list[int]) -> float:
        """Record the solve over each window length, and the vocoder over each mel length, as CUDA graphs
        sharing one memory pool, after warm-up runs (cuBLAS's workspace, the attention and convolution kernels
        chosen and loaded); each replayed once, on the chunks' stream (a graph's first replay uploads it,
        holding the host meanwhile). Returns seconds. A replayed vocoder also leaves the host free: run op by
        op, it held the host until the GPU had finished the chunk's solve, which stopped the talker meanwhile."""
        import torch
        start, pool, stream = time.perf_counter(), torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        def record(run, *inputs):   # (graph, its inputs, its output)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                output = run(*inputs)
            return graph, *inputs, output
        # recorded on a stream of their own: cuBLAS's workspace is per stream, and these graphs run beside
        # the decoders' (recorded on torch.cuda.graph's default stream)
        with torch.no_grad(), torch.cuda.stream(stream):
            self._solve(zeros(1, windows[0], self.mel_dim), zeros(1, windows[0] // self.per_code, dtype=torch.long))
            for length in vocoder_lengths:
                self.vocode(zeros(1, self.mel_dim, length))
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            self.graphs = {n: record(self._solve, zeros(1, n, self.mel_dim),
                                     zeros(1, n // self.per_code, dtype=torch.long)) for n in windows}
            self.vocoder_graphs = {n: record(self.vocode, zeros(1, self.mel_dim, n)) for n in vocoder_lengths}
            with self.queue.working():
                for graph, *_ in (*self.graphs.values(), *self.vocoder_graphs.values()):
                    graph.replay()
        torch.cuda.synchronize()
        return time.perf_counter() - start


class SpeechChunks:
    """One reply's speech, a chunk (SPEECH_CHUNK_SCHEDULE) at a time as its codes come: each solved over a window
    with the context the DiT reaches (a block ahead, two back), from one noise buffer drawn per reply from its
    own generator (the talker's draws stay transformers'), so that overlapping windows start from the same
    noise; the vocoder over the chunk's mel and VOCODER_OVERLAP_FRAMES more each side, trimmed at the seams. A
    run is widened backwards to a length recorded as a CUDA graph (more context behind only). Chunks start on
    token2wav's queue and are collected in order as they finish."""

    def __init__(self, token2wav: Token2Wav, max_codes: int):
        import torch
        self.model, self.queue, self.per_code = token2wav, token2wav.queue, token2wav.per_code
        self.sizes = [token2wav.block * n for n in SPEECH_CHUNK_SCHEDULE]
        self.back = token2wav.block * SPEECH_CONTEXT_BACK_BLOCKS
        self.ahead = token2wav.block * SPEECH_CONTEXT_AHEAD_BLOCKS
        frames, device = max_codes * self.per_code, token2wav.device
        self.queue.reserve(frames * SPEECH_HOP, torch.float32)
        generator = torch.Generator(device).manual_seed(token2wav.seed)
        self.noise = torch.randn((1, frames, token2wav.mel_dim), generator=generator, device=device)
        self.frames = torch.zeros((1, token2wav.mel_dim, frames), device=device)
        self.done = self.chunks_made = 0   # mel frames made; chunks started

    @staticmethod
    def graph_lengths(block: int) -> tuple[list[int], list[int]]:
        """The window lengths the schedule solves, and the mel lengths the vocoder runs over (a chunk with its
        overlaps), before its sizes settle: the lengths worth a CUDA graph."""
        sizes = [block * n for n in SPEECH_CHUNK_SCHEDULE]
        back, ahead = block * SPEECH_CONTEXT_BACK_BLOCKS, block * SPEECH_CONTEXT_AHEAD_BLOCKS
        overlap = VOCODER_OVERLAP_FRAMES
        chunks = list(zip(itertools.accumulate(sizes, initial=0), sizes + sizes[-1:]))   # (first frame, frames)
        return (sorted({done + size + ahead - max(0, done - back) for done, size in chunks}),
                sorted({min(done, overlap) + size + min(ahead, overlap) for done, size in chunks}))

    @property
    def mel(self):
        """The mel frames made so far [1, mel_dim, frames]."""
        return self.frames[:, :, :self.done]

    def codes_due(self) -> int:
        """The codes the next chunk needs (its frames and the block ahead)."""
        return (self.done + self.sizes[min(self.chunks_made, len(self.sizes) - 1)] + self.ahead) // self.per_code

    def add(self, codes, available: int, final: bool) -> list:
        """Start every chunk the `available` codes of codes [1, n] let finish (with `final`, all the rest);
        returns the waveform chunks (float32 numpy) finished by now, in order (with `final`, all of them)."""
        frames = available * self.per_code
        with self.queue.working():
            while self.done < frames and (final or self.codes_due() <= available):
                self._chunk(codes, frames)
        return [samples.numpy() for samples in (self.queue.take() if final else self.queue.ready())]

    def ready(self) -> list:
        """The chunks finished by now, in order, without waiting."""
        return [samples.numpy() for samples in self.queue.ready()]

    def _chunk(self, codes, frames: int) -> None:
        """The next chunk's waveform, started on the queue."""
        since, start = self.queue.mark(), self.done
        end = min(start + self.sizes[min(self.chunks_made, len(self.sizes) - 1)], frames)
        last = min(frames, end + self.ahead)
        first = widened(self.model.graphs, last - max(0, start - self.back), last)
        window = self.model.solve(self.noise[:, first:last], codes[:, first // self.per_code:last // self.per_code])
        # the chunk's frames, and those after it that the vocoder runs over (the next chunk rewrites them)
        ahead = min(VOCODER_OVERLAP_FRAMES, last - end)
        self.frames[:, :, start:end + ahead] = window[:, :, start - first:end + ahead - first]
        lead = min(start, VOCODER_OVERLAP_FRAMES)
        begun = widened(self.model.vocoder_graphs, lead + end - start + ahead, end + ahead)
        wave = self.model.wave(self.frames[:, :, begun:end + ahead])[(start - begun) * SPEECH_HOP:]
        self.queue.put(wave[:len(wave) - ahead * SPEECH_HOP], since)
        self.done, self.chunks_made = end, self.chunks_made + 1


def widened(graphs: dict, length: int, end: int) -> int:
    """Where a run over `length` frames ending at `end` starts: earlier, where that gives it the length of a
    recorded graph (more context behind only)."""
    wider = [recorded for recorded in graphs if length <= recorded <= end]
    return end - (min(wider) if wider else length)


def token2wav_for(model, speech: Speech, runtime: Runtime) -> Token2Wav:
    """token2wav for this voice, its CUDA graphs recorded when the runtime runs on graphs (said)."""
    token2wav = Token2Wav(model.token2wav, model.speaker_map[speech.speaker], runtime)
    if runtime.graphs:
        windows, lengths = SpeechChunks.graph_lengths(token2wav.block)
        seconds = token2wav.capture(windows, lengths)
        say(f"🔊 token2wav's windows ({', '.join(map(str, windows))} mel frames) and vocoder chunks "
            f"({', '.join(map(str, lengths))}) recorded as CUDA graphs in {seconds:.1f} s, so that the first audio "
            "does not wait on them")
    return token2wav


class SpokenReply:
    """Qwen2.5-Omni's talker beside the thinker, fed the thinker's per-token states the way transformers' full
    generate() feeds it (the prompt's last hidden states and embeddings, media zeroed, then one text token's
    hidden state plus embedding per code, then the text's end, then padding), sampling with generate()'s own
    talker settings (drawn where the runtime draws); its codes made into speech in chunks as they come, into
    `audio`. Two calls, in this order: feed(state) for each text token's state as the thinker reads on (the
    first feed starts the talker: its prompt, then its first code), finish() once the text has ended."""

    def __init__(self, loaded: Loaded, inputs, prompt_rows, first_token: int, audio: AudioOut, extra: dict):
        import torch
        model, self.runtime, self.speech = loaded.model, loaded.runtime, loaded.speech
        self.thinker, self.talker, self.voice = model.thinker, model.talker, model.speaker_map[self.speech.speaker]
        self.inputs, self.prompt_rows, self.first_token, self.audio, self.extra = \
            inputs, prompt_rows, first_token, audio, extra
        self.chunks = SpeechChunks(loaded.token2wav, self.speech.max_codes)
        device, talker = prompt_rows.device, self.talker
        self.prompt = torch.full((1, inputs["input_ids"].shape[-1] + 2), talker.codec_mask_token, device=device)
        self.prompt[:, -2:] = torch.tensor([talker.codec_pad_token, talker.codec_bos_token])   # then pad, bos
        defaults = {name.removeprefix("talker_"): parameter.default for name, parameter
                    in inspect.signature(type(model).generate).parameters.items() if name.startswith("talker_")}
        self.settings = {**defaults, "max_new_tokens": self.speech.max_codes, "min_new_tokens": self.speech.min_codes,
                         "pad_token_id": talker.codec_pad_token, "suppress_tokens": [talker.codec_bos_token]}
        embed = self.thinker.get_input_embeddings()
        self.eos_row, self.pad_row = (embed(torch.tensor([token], device=device)) for token in
                                      (talker.text_eos_token, talker.text_pad_token))
        self.row = torch.zeros_like(self.eos_row)   # what the talker reads at its next step
        self.codes: Decoding | None = None          # the talker's codes, from the first feed on
        self.read, self.total = 0, None             # codes read back; where they end, once known
        self.wav_s = 0.0                            # the host's time starting chunks

    def feed(self, state) -> None:
        """A text token's state (its final hidden state plus its embedding) for the talker's next code; the
        speech of the codes made so far when a chunk is due."""
        if self.codes is None:
            self._start(state)
        elif self.total is None and self.codes.made < self.codes.budget:
            self.row.copy_(state.view(1, -1))
            self.codes.advance()
        self._flush()

    def finish(self) -> dict:
        """After the thinker's last token: the text's end, then padding, until the talker ends; then the last
        chunks. Returns the figures: codes, the talker's milliseconds a code (timed here, where it no longer
        waits on the thinker; the host's time starting token2wav left out) and token2wav's seconds."""
        start, made, wav_s = time.perf_counter(), self.codes.made, self.wav_s
        for row in itertools.chain([self.eos_row], itertools.repeat(self.pad_row)):
            if self.total is not None or self.codes.made >= self.codes.budget:
                break
            if self.audio.stop is not None and self.audio.stop.is_set():   # Enter, or a voice over the reply
                raise KeyboardInterrupt
            self.feed(row)
        alone = time.perf_counter() - start - (self.wav_s - wav_s)
        self._flush(final=True)
        return {"speech_codes": self.total or 0, "token2wav_s": self.chunks.queue.seconds,
                "talker_ms_per_code": 1000 * alone / (self.codes.made - made) if self.codes.made > made else None}

    def _start(self, state) -> None:
        """The talker's prompt through its forward, once the thinker has processed its first token; its first code."""
        import torch
        inputs, talker, device = self.inputs, self.talker, self.prompt.device
        text_ids = torch.cat((inputs["input_ids"], torch.tensor([[self.voice["bos_token"], self.first_token]],
                                                                 device=device)), dim=1)
        embeds = torch.cat((self.prompt_rows, self.thinker.get_input_embeddings()(text_ids[:, -2:-1]),
                            state.view(1, 1, -1)), dim=1)
        mask = inputs.get("attention_mask")
        extra = {key: inputs[key] for key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid")
                 if key in inputs}
        if "feature_attention_mask" in inputs:
            extra["audio_feature_lengths"] = inputs["feature_attention_mask"].sum(dim=1)
        out = talker(input_ids=self.prompt, input_text_ids=text_ids, inputs_embeds=embeds,
                     attention_mask=None if mask is None else torch.cat((mask, mask.new_ones((1, 2))), dim=1),
                     use_audio_in_video=self.extra.get("use_audio_in_video", False), use_cache=True, **extra)

        def embed(code):   # the code's embedding plus what the talker reads of the thinker at this step
            return talker.thinker_to_talker_proj(talker.model.embed_tokens(code).view(1, -1) + self.row)
        self.codes = Decoding(self.runtime, talker, self.settings, self.prompt, out, decoder=talker.model,
                              head=talker.codec_head, embed=embed)

    def _flush(self, final: bool = False) -> None:
        """Read the codes made so far when a chunk of speech is due (or at the end), and start its speech."""
        for samples in self.chunks.ready():
            self.audio.add(samples)
        if not final and (self.codes.made < self.chunks.codes_due() or self.total is not None):
            return
        if self.total is None:
            new = self.codes.take()   # every code made so far
            ends = [i for i, code in enumerate(new) if code in self.codes.end]
            self.read += len(new)
            if ends or self.codes.made >= self.codes.budget:
                self.total = self.read - len(new) + ends[0] if ends else self.codes.made
        start = time.perf_counter()
        available = self.total if self.total is not None else self.read
        for samples in self.chunks.add(self.codes.generated, available, final or self.total is not None):
            self.audio.add(samples)
        self.wav_s += time.perf_counter() - start


def fast_speech(loaded: Loaded, inputs, sampling: Sampling, streamer, extra: dict, audio: AudioOut,
                chat: ChatCache | None = None) -> dict:
    """The thinker through a Decoding (in a chat, the prompt's tokens its cache lacks), keeping each token's
    state for the talker; the talker fed once per text token as the text streams, then alone; speech in chunks
    to `audio`. Returns its figures."""
    import torch
    thinker, prompt = loaded.model.thinker, inputs["input_ids"]
    streamer.put(prompt.cpu())
    out, delta = prefill(thinker, inputs, extra, chat, output_hidden_states=True)
    start = chat.reused if chat is not None else 0
    media = torch.isin(prompt[:, start:], torch.tensor([getattr(thinker.config, name, -1) for name in (
        "audio_token_index", "image_token_index", "video_token_index")], device=prompt.device))
    rows = out.hidden_states[-1] + out.hidden_states[0].masked_fill(media[..., None], 0)   # as transformers' talker
    if chat is not None:   # the talker reads the whole prompt's: the cache's, then these
        chat.rows = rows = rows if not start else torch.cat((chat.rows, rows), dim=1)
    states = torch.zeros((sampling.max_new_tokens, rows.shape[-1]), dtype=rows.dtype, device=prompt.device)
    text = Decoding(loaded.runtime, thinker, sampling.generate_kwargs(), prompt, out, states=states, rope_delta=delta)
    del out
    reply, tokens = None, []
    try:
        for token in text:
            tokens.append(token)
            streamer.put(torch.tensor([token]))
            if reply is not None:
                reply.feed(states[len(tokens) - 2])   # the token before's state: the step that read it made it
            elif token in text.end or text.budget == 1:
                raise RunError("the model's answer has no text to speak (it ended at once, or --max_new_tokens is "
                               "1); ask again, or raise --max_new_tokens")
            else:
                reply = SpokenReply(loaded, inputs, rows, token, audio, extra)
            if token in text.end:
                break
    finally:
        text.keep_in(chat, tokens)
    streamer.end()
    return reply.finish()


# Qwen3-Omni speaks differently: its talker (a mixture of experts) reads the thinker's token embeddings, one text
# token per frame it makes; each frame is a first code from the talker and 15 more from a small code predictor;
# code2wav (a sliding-window transformer, then causal convolutions) turns frames into sound, 1,920 samples each.

class ForwardSteps:
    """A model's own forward, one input at a time over its transformers cache: the step transformers' generate()
    takes between draws, for the models the FastDecoder does not write out (Qwen3-Omni's mixtures of experts).
    `embed(token)`, if given, makes the step's input embedding [1, hidden] (the talker's: given its token and an
    attention mask of ones too, as generate() gives them, which transformers 5.17's talker reads); `hidden` is
    the last step's final hidden state [1, hidden] when `hidden_states` is asked for (the FastDecoder's too)."""

    def __init__(self, model, cache, embed=None, hidden_states: bool = False, **forward_args):
        self.model, self.cache, self.embed, self.args = model, cache, embed, forward_args
        self.keyword, self.hidden_states, self.hidden = cache_keyword(model), hidden_states, None

    def logits_at(self, token, slot: int):
        """The next token's logits (float32, [1, vocabulary]) after `token` (a [1] tensor)."""
        import torch
        step = {"input_ids": token.view(1, 1)}
        if self.embed:
            step.update(inputs_embeds=self.embed(token).view(1, 1, -1),
                        attention_mask=torch.ones((1, self.cache.get_seq_length() + 1), dtype=torch.long,
                                                  device=token.device))
        out = self.model(**step, **self.args, **{self.keyword: self.cache}, use_cache=True,
                         output_hidden_states=self.hidden_states)
        self.follow(out)
        return out.logits[:, -1].float()

    def follow(self, out) -> None:
        """Keep what a forward (the prompt's too) leaves for the next step."""
        self.cache = cache_of(out)
        if self.hidden_states:
            self.hidden = out.hidden_states[0][-1][:, -1]   # the talker's: (its layers' states, codes); the last


class TalkerFrames:
    """Qwen3-Omni's talker beside the thinker, as transformers' generate() runs it, one frame a step: its prompt
    from the conversation's user turns (text as the thinker's embeddings, media as the thinker's hidden states at
    `accept_hidden_layer`), the assistant's first text token and the voice; then each step reads the next text
    token's embedding (then the text's end, then padding) plus the frame before, summed over its 16 codes. The
    first code of a frame is drawn with generate()'s talker settings, the 15 others by the code predictor with
    its own (top-k 50, top-p 0.8), where the runtime draws. The talker and the code predictor step on the
    runtime's decoder (CUDA graphs where it runs them: the code predictor's 16 positions a frame one recorded
    step, its head chosen on the device), or through their own forward passes. feed(token) after each text
    token, finish() after the text's end; `frames` [1, 16, n] holds the frames made, `ended` once the talker
    ended the speech."""

    def __init__(self, loaded: Loaded, inputs, prompt_out, extra: dict, stop=None, chat: ChatCache | None = None):
        import torch
        model, runtime, speech = loaded.model, loaded.runtime, loaded.speech
        self.stop, self.pad_id = stop, model.config.tts_pad_token_id
        self.talker, self.predictor, config = model.talker, model.talker.code_predictor, model.config
        self.runtime, self.inputs, self.extra = runtime, inputs, extra
        ids, device = inputs["input_ids"], inputs["input_ids"].device
        self.embed_text = model.thinker.get_input_embeddings()
        project = self.talker.text_projection
        special = project(self.embed_text(torch.tensor([[config.tts_bos_token_id, config.tts_eos_token_id,
                                                         config.tts_pad_token_id]], device=device)))
        self.bos_row, self.eos_row, self.pad_row = special[:, 0:1], special[:, 1:2], special[:, 2:3]
        self.user = self._user_rows(model, ids, prompt_out, chat)
        starts = ((ids[0, :-1] == config.im_start_token_id) & (ids[0, 1:] == config.assistant_token_id)).nonzero()
        self.text = ids[0, int(starts[-1]):].tolist()   # the assistant's turn, as the talker reads it: token ids
        self.text_end = None                            # where that text ends, once the thinker has ended
        self.speaker = config.talker_config.speaker_id[speech.speaker.lower()]
        talker_config = config.talker_config
        vocabulary = talker_config.text_config.vocab_size
        defaults = {name.removeprefix("talker_"): parameter.default for name, parameter
                    in inspect.signature(type(model).generate).parameters.items() if name.startswith("talker_")}
        self.settings = {**defaults, "max_new_tokens": speech.max_codes, "min_new_tokens": speech.min_codes,
                         "eos_token_id": talker_config.codec_eos_token_id,
                         "suppress_tokens": [i for i in range(vocabulary - 1024, vocabulary)
                                             if i != talker_config.codec_eos_token_id]}
        self.groups, self.predictor_cache = talker_config.num_code_groups, cache_keyword(self.predictor)
        empty = torch.zeros((1, 0), dtype=torch.long, device=device)
        with warnings.catch_warnings():   # a repetition penalty over the codes alone, as generate() applies it
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
            self.sampler = runtime.sampler(_decoding_settings(self.talker, self.settings, empty))
        self.unit = loaded.predictor if runtime.fast else None   # the code predictor on the fast decoder
        if self.unit is None:   # through its own forward
            self.predictor_sampler = runtime.sampler(_decoding_settings(
                self.predictor, predictor_settings(model, self.groups), empty))
        self.budget = speech.max_codes
        self.ids = torch.ones((2, self.budget + 1), dtype=torch.long, device=device)   # first codes, finite
        self.residual = torch.ones((2, self.groups - 1), dtype=torch.long, device=device)
        self.frames = torch.zeros((1, self.groups, self.budget), dtype=torch.long, device=device)
        self.made = self.framed = 0   # first codes drawn; frames complete (their 15 codes drawn)
        self.steps, self.total, self.read = None, None, 0   # frames of speech, once known; first codes read back
        self.queue = runtime.queue()
        self.queue.reserve(2 * (self.budget + 1), torch.long)
        self.talker_s = self.predictor_s = 0.0
        self.next_input = torch.zeros((1, talker_config.text_config.hidden_size), dtype=self.talker.dtype,
                                      device=device)   # the talker's next input

    def _user_rows(self, model, ids, prompt_out, chat: ChatCache | None):
        """The talker's rows for the prompt's user turns: the thinker's embeddings of their text, projected, and
        its hidden states of their pictures, videos and recordings, projected: in a chat, those before what the
        thinker computed now (`chat.reused`) from the rows kept, the whole prompt's kept for the next turn."""
        import torch
        config = model.config
        thinker_config = config.thinker_config
        media = torch.isin(ids[0], torch.tensor([thinker_config.audio_token_id, thinker_config.image_token_id,
                                                 thinker_config.video_token_id], device=ids.device))
        starts = (ids[0] == config.im_start_token_id).nonzero().view(-1).tolist()
        user = torch.zeros_like(media)
        for first, end in zip(starts, starts[1:] + [ids.shape[-1]]):
            if first + 1 < ids.shape[-1] and int(ids[0, first + 1]) == config.user_token_id:
                user[first:end] = True
        rows = torch.empty((1, ids.shape[-1], self.talker.config.text_config.hidden_size), dtype=self.talker.dtype,
                           device=ids.device)   # the whole prompt's, as generate() projects them, then the user's
        rows[0, ~media] = self.talker.text_projection(self.embed_text(ids[:, ~media]))[0].to(rows.dtype)
        start = chat.reused if chat is not None else 0
        kept = media[:min(start, chat.rows.shape[1])] if start else media[:0]   # earlier turns' media: all kept
        if bool(kept.any()):
            rows[0, :len(kept)][kept] = chat.rows[0, :len(kept)][kept]
        if bool(media[start:].any()):
            hidden = prompt_out.hidden_states[config.talker_config.accept_hidden_layer][0]
            rows[0, start:][media[start:]] = self.talker.hidden_projection(hidden[media[start:]]).to(rows.dtype)
        if chat is not None:
            chat.rows = rows
        rows = rows[:, user]
        return rows, ids[:, user]

    def _row(self, index: int):
        """The projected embedding of the assistant turn's token `index`, the text's end after it, then padding."""
        import torch
        if index < (len(self.text) if self.text_end is None else self.text_end):
            return self.talker.text_projection(self.embed_text(torch.tensor([[self.text[index]]],
                                                                              device=self.ids.device)))
        return self.eos_row if index == self.text_end else self.pad_row

    def feed(self, token: int) -> None:
        """The thinker's next text token: the talker starts once the assistant's first is known, then makes a frame
        for each token the text grows by, a token behind it: generate() hands the talker no state for the text's
        last token (the thinker never reads it), so the text's end takes its place (the end-of-turn token, or
        the last word when --max_new_tokens cut the text)."""
        self.text.append(token)
        if self.steps is None and len(self.text) >= 4:
            self._start()
        elif self.steps is not None:
            self._step_while(lambda: self.made + 4 < len(self.text))

    def finish(self) -> None:
        """The text has ended: the talker reads its end, then padding, until it ends the speech (or its budget)."""
        self.text_end = max(len(self.text) - 1, 4)
        if self.steps is None:
            self._start()
        self._step_while(lambda: True, final=True)

    def _step_while(self, more, final: bool = False) -> None:
        """Frames while `more()`; `final`: the text has ended, so on until the talker's end (or its budget)."""
        while not self.ended and self.made < self.budget and more():
            if self.stop is not None and self.stop.is_set():   # Enter, or a voice over the reply
                raise KeyboardInterrupt
            self._step()
            self._read(self.runtime.lag and QWEN3_CODES_LAG)
        if final:   # every code read: where the speech ends is known
            self._read(0)
            if self.total is None:   # the budget: the last first code has no frame
                self.total = self.made - 1

    @property
    def ended(self) -> bool:
        return self.total is not None

    @property
    def available(self) -> int:
        """The frames known to be speech: made, their codes read back finite, before the talker's end."""
        return min(self.framed, max(self.read - 1, 0)) if self.total is None else min(self.framed, self.total)

    def _read(self, keep: int) -> None:
        """The first codes that came back, all but the `keep` newest (the device runs ahead by them): where the
        talker ended the speech, once one of them is its end; the frames' codes checked finite."""
        for code, finite in (value.tolist() for value in self.queue.take(keep)):
            if not finite:
                raise NonFiniteLogits()
            if self.total is None and code == self.talker.config.codec_eos_token_id:
                self.total = self.read   # the frames before it
            self.read += 1

    def _start(self) -> None:
        """The talker's prompt: the user turns, then the assistant's first three tokens over zeros, four pads over
        the codec's think/no-think marks and the voice, the text's beginning over the codec's pad, its first token
        over the codec's start."""
        import torch
        talker, config, device = self.talker, self.talker.config, self.ids.device
        user_rows, user_ids = self.user
        text = torch.cat([self._row(i) for i in range(4)], dim=1)
        text_part = torch.cat((text[:, :3], self.pad_row.expand(1, 4, -1), self.bos_row, text[:, 3:4]), dim=1)
        codec = torch.tensor([[config.codec_nothink_id, config.codec_think_bos_id, config.codec_think_eos_id,
                               self.speaker, config.codec_pad_id, config.codec_bos_id]], device=device)
        codec_part = torch.cat((torch.zeros((1, 3, text_part.shape[-1]), dtype=text_part.dtype, device=device),
                                talker.get_input_embeddings()(codec)), dim=1)
        embeds = torch.cat((user_rows, text_part + codec_part), dim=1)
        ids = torch.cat((user_ids, torch.full((1, embeds.shape[1] - user_ids.shape[1]), self.pad_id,
                                              device=device)), dim=1)
        extra = {key: self.inputs[key] for key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid")
                 if key in self.inputs}
        if "feature_attention_mask" in self.inputs:
            extra["audio_feature_lengths"] = self.inputs["feature_attention_mask"].sum(dim=1)
        start = time.perf_counter()
        out = talker(inputs_embeds=embeds, talker_input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                     output_hidden_states=True,
                     use_audio_in_video=self.extra.get("use_audio_in_video", False), **extra)
        self._choose(out.logits[:, -1].float())
        self._read(0)
        self.prompt_length = ids.shape[1]
        if self.runtime.fast:
            self.steps = self.runtime.steps(talker, cache_of(out), ids.shape[1], self.budget, decoder=talker.model,
                                            head=talker.codec_head, embed=lambda _: self.next_input)
            self.steps.hidden.copy_(out.hidden_states[0][-1][:, -1])
        else:
            self.steps = ForwardSteps(talker, None, embed=lambda _: self.next_input, hidden_states=True,
                                      generation_step=0)   # counted by generate(), which the forward only hands back
            self.steps.follow(out)
        self.talker_s += time.perf_counter() - start

    def _choose(self, logits) -> None:
        """The next first code, on the device, on its way to the host with whether its logits, and the frame
        before's codes, were finite."""
        choose_token(self.sampler, self.ids, logits, self.made)
        if self.made:
            self.ids[1, self.made] &= self.residual[1].all()
        self.queue.put(self.ids[:, self.made])
        self.made += 1

    def _step(self) -> None:
        """The frame of the last first code (its 15 codes from the code predictor), then the next first code."""
        start = time.perf_counter()
        code = self.ids[0, self.made - 1:self.made]
        if self.unit is not None:
            total = self.unit.frame(self.steps.hidden, code, self.residual)
        else:
            total = self._residuals_by_forward(self.talker.get_input_embeddings()(code.view(1, 1)).view(1, -1))
        self.next_input.copy_(total + self._row(3 + self.made).view(1, -1))
        self.frames[0, 0, self.framed] = code.view(())
        self.frames[0, 1:, self.framed] = self.residual[0]
        self.framed += 1
        self.predictor_s += time.perf_counter() - start
        self._choose(self.steps.logits_at(code, self.prompt_length + self.made - 1))   # at the code's slot
        self.talker_s += time.perf_counter() - start

    def _residuals_by_forward(self, first):
        """The same through the code predictor's own forward, as generate() runs it."""
        import torch
        embeddings = self.predictor.get_input_embeddings()
        out = self.predictor(inputs_embeds=torch.stack((self.steps.hidden, first), dim=1), use_cache=True)
        total, cache = first, cache_of(out)
        for group in range(self.groups - 1):
            choose_token(self.predictor_sampler, self.residual, out.logits[:, -1].float(), group)
            residual = self.residual[:1, group:group + 1]
            total = total + embeddings[group](residual).view(1, -1)
            if group < self.groups - 2:
                out = self.predictor(input_ids=residual, **{self.predictor_cache: cache}, use_cache=True,
                                     generation_steps=group + 1)
        return total


def predictor_settings(model, groups: int) -> dict:
    """The code predictor's sampling, as Qwen3-Omni's generate() asks for it: the talker's do_sample mirrored,
    top-k 50 and top-p 0.8 when sampling."""
    do_sample = inspect.signature(type(model).generate).parameters["talker_do_sample"].default
    return {"do_sample": do_sample, "max_new_tokens": groups - 1, **({"top_k": 50, "top_p": 0.8} if do_sample else {})}


class CodePredictor:
    """Qwen3-Omni's code predictor on the FastDecoder, ready at load time for every reply: a frame's 15 further
    codes from the talker's last hidden state (position 0) and the frame's first code (position 1), each drawn
    code's embedding at the next position, its head (one of 15) chosen on the device by the position. With the
    runtime's graphs the whole frame (16 positions, 15 draws) is one CUDA graph; its draws race exponential
    variates there (Sampler.race: multinomial would wait for the GPU)."""

    def __init__(self, model, runtime: Runtime):
        import torch
        talker, predictor = model.talker, model.talker.code_predictor
        self.groups, self.graph = talker.config.num_code_groups, None
        self.embed_first, self.embeddings = talker.get_input_embeddings(), predictor.get_input_embeddings()
        device, dtype, width = talker.device, talker.dtype, talker.config.text_config.hidden_size
        self.sampler = runtime.sampler(_decoding_settings(predictor, predictor_settings(model, self.groups),
                                                          torch.zeros((1, 0), dtype=torch.long, device=device)))
        self.hidden, self.input = (torch.zeros((1, width), dtype=dtype, device=device) for _ in range(2))
        self.code = torch.zeros((1,), dtype=torch.long, device=device)
        self.group = torch.zeros((1,), dtype=torch.long, device=device)
        self.residual = torch.ones((2, self.groups - 1), dtype=torch.long, device=device)   # codes, finite
        heads = torch.stack([head.weight for head in predictor.lm_head])   # [15, codes, hidden]
        self.steps = FastDecoder(predictor, None, 0, self.groups, runtime.graphs, runtime.decoder == "compiled",
                                 decoder=predictor.model,
                                 rope_delta=0, head=lambda x: torch.mm(x, heads.index_select(0, self.group)[0].t()),
                                 embed=lambda _: self.input)
        if runtime.graphs:
            self._capture()

    def frame(self, hidden, code, residual):
        """The frame of `code` ([1], the talker's first) after the talker's `hidden` [1, hidden]: its 15 codes
        into residual[:, :15] (codes, finite), and its 16 codes' embeddings summed [1, hidden]."""
        self.hidden.copy_(hidden)
        self.code.copy_(code)
        if self.graph is not None:
            self.graph.replay()
            total = self.total
        else:
            total = self._frame(masked=False)
        residual.copy_(self.residual)
        return total

    def _frame(self, masked: bool):
        def logits_at(slot: int):   # `masked`: the step over all slots, its position set on the device (a graph's)
            self.group.fill_(max(slot - 1, 0))
            if not masked:
                return self.steps.logits_at(self.code, slot)
            self.steps.position.fill_(slot)
            return self.steps._masked_step()
        total = first = self.embed_first(self.code).view(1, -1)
        self.input.copy_(self.hidden)
        logits_at(0)
        self.input.copy_(first)
        logits = logits_at(1)
        for group in range(self.groups - 1):
            choose_token(self.sampler, self.residual, logits, group)
            embedded = self.embeddings[group](self.residual[0, group:group + 1])
            total = total + embedded
            if group < self.groups - 2:
                self.input.copy_(embedded)
                logits = logits_at(group + 2)
        return total

    def _capture(self) -> None:
        """Record the frame as one CUDA graph, after two warm-up runs on a side stream."""
        import torch
        self.sampler.race = True
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._frame(masked=True)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.total = self._frame(masked=True)


def code_predictor_for(model, runtime: Runtime) -> "CodePredictor":
    """Qwen3-Omni's code predictor on the fast decoder, a frame recorded as one CUDA graph where graphs run (said)."""
    start = time.perf_counter()
    predictor = CodePredictor(model, runtime)
    if runtime.graphs:
        say(f"🔊 The code predictor's frame (16 positions, 15 draws) recorded as one CUDA graph in "
            f"{time.perf_counter() - start:.1f} s")
    return predictor


class Code2WavChunks:
    """Qwen3-Omni's code2wav over a reply's frames as they come, each chunk exactly what code2wav over the whole
    reply gives for it (within rounding): its sliding-window transformer runs on with its cache over the new
    frames only; its convolutions rerun over CODE2WAV_CONTEXT_FRAMES before the chunk (they reach about 9.1
    frames back) and over the frame after it, whose samples wait for the next chunk (the transposed convolutions
    look ahead by less than one frame). Chunks grow by QWEN3_CHUNK_FRAMES."""

    def __init__(self, code2wav, max_frames: int):
        import torch
        from transformers import DynamicCache
        self.model, self.per_frame = code2wav, int(code2wav.total_upsample)
        self.transformer, self.cache = code2wav.pre_transformer, DynamicCache(config=code2wav.config)
        self.keyword = cache_keyword(self.transformer)
        weight = code2wav.code_embedding.weight
        self.hidden = torch.zeros((1, weight.shape[1], max_frames), dtype=weight.dtype, device=weight.device)
        self.encoded = self.done = self.chunks_made = 0   # frames through the transformer; frames made into sound
        self.seconds = 0.0

    def due(self) -> int:
        """The frames the next chunk needs (its own and the one after)."""
        size = QWEN3_CHUNK_FRAMES[min(self.chunks_made, len(QWEN3_CHUNK_FRAMES) - 1)]
        return self.done + size + CODE2WAV_AHEAD_FRAMES

    def add(self, frames, available: int, final: bool) -> list:
        """The sound of every frame of frames [1, 16, n] that `available` frames let be made now (with `final`,
        all of them), as float32 numpy chunks."""
        if self.done >= available or not (final or available >= self.due()):
            return []
        import torch
        start = time.perf_counter()
        model, end = self.model, available if final else available - CODE2WAV_AHEAD_FRAMES
        with torch.no_grad():
            if available > self.encoded:
                codes = frames[:, :, self.encoded:available]
                embeds = model.code_embedding(codes + model.code_offset).mean(1)
                out = self.transformer(inputs_embeds=embeds, **{self.keyword: self.cache}, use_cache=True)
                self.hidden[:, :, self.encoded:available] = out.last_hidden_state.permute(0, 2, 1)
                self.encoded = available
            first = max(0, self.done - CODE2WAV_CONTEXT_FRAMES)
            wave = self.hidden[:, :, first:available]
            for blocks in model.upsample:
                for block in blocks:
                    wave = block(wave)
            for block in model.decoder:
                wave = block(wave)
            wave = wave.clamp(min=-1, max=1).reshape(-1)[(self.done - first) * self.per_frame:
                                                          (end - first) * self.per_frame]
            samples = wave.float().cpu().numpy()
        self.done, self.chunks_made = end, self.chunks_made + 1
        self.seconds += time.perf_counter() - start
        return [samples]


def staged_speech(loaded: Loaded, inputs, sampling: Sampling, streamer, extra: dict, audio: AudioOut,
                  chat: ChatCache | None = None) -> dict:
    """Qwen3-Omni's spoken reply as it is made: the thinker a token at a time, the talker a frame behind each
    token, code2wav in chunks as frames come, into `audio`. Returns its figures. In a chat on the fast decoder the
    thinker computes what its cache lacks, and the talker's rows of the earlier turns' media come from the cache
    (`rows`); through the parts' own forwards the prompt is computed whole."""
    import torch
    model, prompt = loaded.model, inputs["input_ids"]
    if chat is not None and (not loaded.runtime.fast or chat.rows is None):
        chat.forget()
    chat = chat if loaded.runtime.fast else None
    streamer.put(prompt.cpu())
    media = _has_media(model.thinker, prompt)   # the talker reads their hidden states
    out, delta = prefill(model.thinker, inputs, extra, chat, output_hidden_states=media)
    settings = {**sampling.generate_kwargs(), "eos_token_id": model.config.im_end_token_id}   # as generate() ends it
    text = Decoding(loaded.runtime, model.thinker, settings, prompt, out, rope_delta=delta)
    talker = TalkerFrames(loaded, inputs, out, extra, audio.stop, chat)
    del out
    sound = Code2WavChunks(model.code2wav, loaded.speech.max_codes)
    tokens = []
    try:
        for token in text:
            tokens.append(token)
            streamer.put(torch.tensor([token]))
            talker.feed(token)
            for samples in sound.add(talker.frames, talker.available, final=False):
                audio.add(samples)
            if token in text.end:
                break
    finally:   # a reply stopped by Ctrl-C stays in the cache as in the conversation
        text.keep_in(chat, tokens)
    streamer.end()
    talker.finish()
    for samples in sound.add(talker.frames, talker.available, final=True):
        audio.add(samples)
    return {"speech_codes": talker.available, "token2wav_s": sound.seconds,
            "talker_ms_per_code": 1000 * (talker.talker_s - talker.predictor_s) / max(talker.made, 1),
            "predictor_ms_per_frame": 1000 * talker.predictor_s / max(talker.framed, 1)}


# --- 11. an answer: generated, streamed, timed ---------------------------------------------------

def effective_sampling(generation_config, sampling: Sampling) -> dict:
    """What decoding will really do: the flags over the model's own generation_config."""
    kwargs = sampling.generate_kwargs()
    settings = {"max_new_tokens": sampling.max_new_tokens,
                "do_sample": bool(kwargs.get("do_sample", generation_config.do_sample))}
    if settings["do_sample"]:
        settings.update({k: kwargs.get(k, getattr(generation_config, k, None)) for k in ("temperature", "top_p", "top_k")})
    return settings


def describe_sampling(generation_config, sampling: Sampling) -> str:
    settings = effective_sampling(generation_config, sampling)
    if not settings["do_sample"]:
        return "🎯 Greedy decoding" + (" (--temperature 0)" if sampling.temperature == 0 else "")
    values = {k: settings[k] for k in ("temperature", "top_p", "top_k")}
    return "🎲 Sampling: " + ", ".join(f"{k} {v}" for k, v in values.items() if v is not None)


def make_streamer(tokenizer, stream: bool, stop=None):
    """A TextStreamer that prints to stdout as text is finalised (when `stream`) and notes when each
    token arrives. It runs in the decoding loop's own thread: TextIteratorStreamer's second thread
    made CUDA decoding several times slower (bench/stream_overhead.py). Once `stop` (a threading.Event:
    Enter, or a voice over the reply) is set, the next token stops the answer as Ctrl-C does."""
    from transformers import TextStreamer

    class PrintingStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.token_times: list[float] = []
            self.pieces: list[str] = []

        def put(self, value):
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            if not self.next_tokens_are_prompt:
                self.token_times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.pieces.append(text)
            if stream and text:
                if getattr(stop, "before_words", None):   # a spoken turn's status line gives way to the words
                    stop.before_words()
                    stop.before_words = None
                write_stdout(text)

        @property
        def text(self) -> str:
            return "".join(self.pieces)

    return PrintingStreamer()


def finite_guard():
    """For transformers' generate(): a logits processor that stops it when the scores turn NaN or +inf,
    or none is finite (the -inf that top-k and suppressed tokens leave are fine)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteGuard(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if bool(scores.isnan().any() | scores.isposinf().any()) or not bool(scores.isfinite().any()):
                raise NonFiniteLogits()
            return scores
    return LogitsProcessorList([FiniteGuard()])


def speech_kwargs(model, inputs, sampling: Sampling, speech: Speech) -> dict:
    """Arguments for an Omni model's full generate(): sampling settings go to the thinker only, and so
    do the pictures: un-prefixed pixel values would reach Qwen2.5-Omni's talker too, which rejects them
    (transformers 5.17-5.24). Grid sizes stay shared: the talker needs them for positions. Qwen3-Omni's
    generate() stops the text at Qwen's own end-of-turn id unless told the checkpoint's."""
    kwargs = dict(inputs)
    if "thinker_eos_token_id" in inspect.signature(type(model).generate).parameters:
        kwargs["thinker_eos_token_id"] = model.config.im_end_token_id
    for key in ("pixel_values", "pixel_values_videos"):
        if key in kwargs:
            kwargs[f"thinker_{key}"] = kwargs.pop(key)
    thinker = {f"thinker_{key}": value for key, value in sampling.generate_kwargs().items()}
    return {**kwargs, **thinker, "speaker": speech.speaker, "talker_max_new_tokens": speech.max_codes,
            "talker_min_new_tokens": speech.min_codes, "thinker_logits_processor": finite_guard(),
            "talker_logits_processor": finite_guard()}


def generate_text(model, inputs, sampling: Sampling, streamer, extra: dict, chat: ChatCache | None = None) -> None:
    """transformers' generate(); in a chat, continuing from the cache where the prompt's new tokens are text alone
    (generate() places them after the cached ones, at the positions it kept), else from the whole prompt."""
    from transformers import DynamicCache
    kwargs = dict(inputs)
    if chat is not None:
        ids = inputs["input_ids"]
        start = chat.shared(ids[0].tolist())
        if start and not _has_media(model, ids[0, start:]):
            chat.cut(start)
            kwargs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
        else:
            chat.forget()
            start, chat.cache = 0, DynamicCache()
        kwargs[cache_keyword(model)], chat.reused = chat.cache, start
    try:
        out = model.generate(**kwargs, **sampling.generate_kwargs(), **extra, streamer=streamer,
                             logits_processor=finite_guard(), return_dict_in_generate=True)
    except BaseException:
        if chat is not None:   # stopped part-way, its layers may hold more than others
            chat.forget()
        raise
    if chat is not None:
        chat.ids = out.sequences[0, :chat.cache.get_seq_length()].tolist()


def _has_media(model, ids) -> bool:
    """Whether the token ids hold a picture's, video's or recording's placeholders."""
    config = model.config
    return any(token is not None and bool((ids == token).any()) for token in (
        getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id",
                                                 "video_token_index", "audio_token_id", "audio_token_index")))


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generation: the text, the spoken reply if any, and when each token came."""
    text: str
    wav: object | None          # 24 kHz float32 samples
    prompt_tokens: int
    token_times: tuple[float, ...]
    start: float                # perf_counter() when generation began
    end: float
    first_audio_s: float | None = None   # from the start to the first chunk of speech
    speech_figures: dict = dataclasses.field(default_factory=dict)   # the talker's and token2wav's
    first_played: float | None = None    # perf_counter() when its first sample went to the speakers (--play)


def generate_answer(loaded: Loaded, inputs, sampling: Sampling, show: str, use_audio_in_video: bool = False,
                    chat: ChatCache | None = None, stop=None) -> Answer:
    """Generate as the runtime decided at load time, printing the answer to stdout as it comes, once at the
    end, or not at all (--json); when it speaks, the spoken reply too; in a chat, from what its cache holds.
    Ctrl-C (or `stop` set) raises Interrupted with the text so far."""
    runtime, model, speech = loaded.runtime, loaded.model, loaded.speech
    streamer = make_streamer(getattr(loaded.processor, "tokenizer", loaded.processor), show == SHOW_STREAM, stop)
    extra = {"use_audio_in_video": True} if use_audio_in_video else {}   # Omni interleaves a video's sound
    start = time.perf_counter()
    audio, figures = AudioOut(speech.play, start, stop) if runtime.speaks else None, {}
    try:
        if runtime.speaks == "code2wav" and runtime.decoder != "generate":
            figures = staged_speech(loaded, inputs, sampling, streamer, extra, audio, chat)
        elif runtime.fast and runtime.speaks:
            figures = fast_speech(loaded, inputs, sampling, streamer, extra, audio, chat)
        elif runtime.fast:
            fast_generate(runtime, model, inputs, sampling, streamer, extra, chat)
        elif runtime.speaks:   # the whole reply at once, at the end
            with warnings.catch_warnings():   # Qwen3-Omni's talker: its repetition penalty over the codes alone
                warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
                _, wav = model.generate(**speech_kwargs(model, inputs, sampling, speech), **extra,
                                        thinker_streamer=streamer)
            audio.add(wav.reshape(-1).float().cpu().numpy())
        else:
            generate_text(model, inputs, sampling, streamer, extra, chat)
    except BaseException as exc:   # out of memory, Ctrl-C: the answer so far keeps its line, then it rises
        if audio:
            audio.close(drain=False)
        end_answer(show, streamer.text, exc)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise stopped_answer(streamer.text, audio, stop) from exc
        if isinstance(exc, NonFiniteLogits):
            raise NonFiniteLogits(streamer.text) from exc
        raise
    end = time.perf_counter()
    end_answer(show, streamer.text)
    wav = audio.close(drain=True) if audio else None   # with --play, once it has been heard
    if stop is not None and stop.is_set():   # stopped while it was heard
        raise stopped_answer(streamer.text, audio, stop)
    return Answer(streamer.text, wav, int(inputs["input_ids"].shape[-1]), tuple(streamer.token_times), start, end,
                  audio.first_s if audio else None, figures, audio.first_played if audio else None)


def stopped_answer(text: str, audio: AudioOut | None, stop) -> Interrupted:
    """An answer stopped part-way. A spoken one stopped in a conversation (`stop`: Enter, a voice over it) keeps
    its words in proportion to the speech heard (the speech the talker had made so far, where it had not ended),
    to the word before: what the person heard is what the conversation holds."""
    if audio is None or stop is None or not audio.stream:
        return Interrupted(text)
    kept = round(len(text) * audio.heard_share())
    heard = text[:kept]
    if kept < len(text) and not text[kept].isspace() and " " in heard:   # not half a word (text without spaces: to
        heard = heard.rsplit(" ", 1)[0]                                     # the character)
    return Interrupted(heard.rstrip(), audio.first_played, audio.silenced)


def peak_memory(device: str) -> tuple[int | None, str]:
    """Peak memory of the device used: CUDA max allocated, MPS max allocated (what tensors took, not the
    driver's reserved pool; before PyTorch kept an MPS peak, what was allocated at the end), or process RSS."""
    import torch
    if device == "cuda":
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())), \
            "CUDA max allocated"
    if device == "mps":
        accelerator = getattr(torch, "accelerator", None)
        try:   # torch.accelerator keeps MPS's peak in recent PyTorch
            if accelerator.current_accelerator().type == "mps":
                return int(accelerator.max_memory_allocated()), "MPS max allocated"
        except (AttributeError, RuntimeError, TypeError, ValueError):
            pass
        return int(torch.mps.current_allocated_memory()), "MPS allocated at the end; no MPS peak in this PyTorch"
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), "peak process RSS"
    except ImportError:   # Windows
        import psutil
        return psutil.Process().memory_info().rss, "process RSS"


@dataclasses.dataclass(frozen=True)
class Stats:
    """The figures of one answer, for the stats line, --verbose and --json."""
    device: str
    load_s: float | None = 0.0           # None: nothing was loaded here (--server)
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    media_decode_s: float = 0.0
    decode_s: float | None = None        # first to last new token
    second_token_s: float | None = None  # first to second: the fast decoder's setup (graph capture, compiling)
    speech_s: float | None = None        # talker + token2wav, after the last text token
    device_map: dict | None = None       # where the weights went
    dtype: str = ""
    audio_seconds: float | None = None   # length of the spoken reply
    first_audio_s: float | None = None   # from the start of generation to the first chunk of speech
    speech_codes: int | None = None      # the talker's codes, 50 a second
    talker_ms_per_code: float | None = None
    token2wav_s: float | None = None
    predictor_ms_per_frame: float | None = None   # Qwen3-Omni's code predictor (15 codes a frame)
    reused_tokens: int | None = None     # a chat's: the prompt's tokens taken from what earlier turns computed
    started_at: float | None = None      # perf_counter() when generating began (for a spoken turn's figures)
    first_played_s: float | None = None  # from the start to the first sample handed to the speakers (--play)

    def record(self) -> dict:
        """The figures for --json (where the weights went and their dtype are in its reproducibility record)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name not in ("peak_memory_kind", "device_map", "dtype", "started_at")}

    @property
    def real_time_factor(self) -> float | None:
        """Seconds spent making speech per second of speech: below 1 is faster than real time."""
        return self.speech_s / self.audio_seconds if self.speech_s is not None and self.audio_seconds else None


def stats_of(answer: Answer, loaded: Loaded, media_decode_s: float, reused: int | None = None) -> Stats:
    times, figures = answer.token_times, {}
    if times:
        figures.update(ttft_s=times[0] - answer.start, decode_s=times[-1] - times[0])
        if len(times) > 1:
            figures.update(decode_tokens_per_s=(len(times) - 1) / figures["decode_s"],
                           second_token_s=times[1] - times[0])
    if answer.wav is not None:
        figures.update(speech_s=answer.end - (times[-1] if times else answer.start),
                       audio_seconds=len(answer.wav) / SPEECH_SAMPLE_RATE, first_audio_s=answer.first_audio_s,
                       first_played_s=answer.first_played and answer.first_played - answer.start,
                       **answer.speech_figures)
    peak, kind = peak_memory(loaded.plan.device)
    return Stats(device=loaded.plan.device, load_s=loaded.load_s, prompt_tokens=answer.prompt_tokens,
                 new_tokens=len(times), peak_memory_bytes=peak, peak_memory_kind=kind, media_decode_s=media_decode_s,
                 device_map=loaded.device_map, dtype=loaded.plan.dtype, reused_tokens=reused, started_at=answer.start,
                 **figures)


def describe_stats(stats: Stats) -> str:
    reused = f" ({stats.reused_tokens} reused, {stats.prompt_tokens - stats.reused_tokens} computed)" \
        if stats.reused_tokens is not None else ""
    parts = ([] if stats.load_s is None else [f"load {stats.load_s:.1f} s"]) + \
        [f"prompt {stats.prompt_tokens} tokens{reused}"]
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    speed = f" at {stats.decode_tokens_per_s:.1f} tokens/s" if stats.decode_tokens_per_s else ""
    parts.append(f"{stats.new_tokens} new tokens{speed}")
    if stats.audio_seconds is not None:
        parts.append(f"speech {stats.audio_seconds:.1f} s of audio, the first after {stats.first_audio_s:.2f} s, the "
                     f"rest {stats.speech_s:.1f} s after the text (real-time factor {stats.real_time_factor:.2f})")
    if stats.media_decode_s:
        parts.append(f"media decoded in {stats.media_decode_s:.2f} s")
    if stats.peak_memory_bytes is not None:
        parts.append(f"peak memory {stats.peak_memory_bytes / GB:.2f} GB ({stats.peak_memory_kind})")
    return f"📈 {stats.device}: " + " · ".join(parts)


def describe_stages(stats: Stats) -> str:
    """--verbose: where the time went, stage by stage."""
    parts = ([] if stats.load_s is None else [f"load {stats.load_s:.2f} s"]) + \
        [f"media decode {stats.media_decode_s:.2f} s"]
    if stats.ttft_s is not None:
        reused = "" if stats.reused_tokens is None else \
            f" ({stats.prompt_tokens - stats.reused_tokens} tokens computed, {stats.reused_tokens} reused)"
        parts.append(f"encoding and prefill {stats.ttft_s:.2f} s{reused}")
    if stats.decode_s is not None:
        parts.append(f"decode {stats.decode_s:.2f} s ({max(stats.new_tokens - 1, 0)} tokens, the first of them "
                     f"after {stats.second_token_s or 0:.2f} s)")
    if stats.speech_s is not None:
        parts.append(f"first audio {stats.first_audio_s:.2f} s · speech after the text {stats.speech_s:.2f} s")
    if stats.speech_codes:
        talker = f", {stats.talker_ms_per_code:.2f} ms a code" if stats.talker_ms_per_code else ""
        parts.append(f"talker {stats.speech_codes} codes{talker} · token2wav {stats.token2wav_s:.2f} s")
    return "⏱️ " + " · ".join(parts)


# --- 12. one turn: inputs, the answer, the spoken reply; the CPU when memory runs out ----------

@dataclasses.dataclass(frozen=True)
class Outcome:
    """One answer and how it was made."""
    text: str
    stats: Stats
    sampling: dict                 # what decoding really did (the flags over the model's defaults)
    audio_path: Path | None = None


def fit_context(sampling: Sampling, window: int | None, prompt_tokens: int, model_id: str,
                about: str = "", hint: str = "") -> Sampling:
    """The sampling settings for a prompt of this many tokens (`about` them, where they were estimated): a prompt
    the model cannot read is refused before generating; an answer that would run past the window is cut to fit."""
    if not window:
        return sampling
    if prompt_tokens >= window:
        raise UsageError(f"--prompt: the prompt is {about}{prompt_tokens:,} tokens (with the chat template and any "
                         f"attached files), and {model_id} reads at most {window:,}; shorten it, or attach "
                         f"fewer or smaller files (--max_pixels){hint}")
    room = window - prompt_tokens
    if sampling.max_new_tokens <= room:
        return sampling
    say(f"⚠️ The prompt is {about}{prompt_tokens:,} tokens and the model reads at most {window:,}: the answer stops "
        f"after {room:,} tokens, not --max_new_tokens {sampling.max_new_tokens:,}")
    return dataclasses.replace(sampling, max_new_tokens=room, min_new_tokens=min(sampling.min_new_tokens, room))


def write_wav(path: Path, samples, rate: int) -> None:
    """A 16-bit PCM WAV (made whole in memory, so that a pipe or a device takes it too), written by write_output."""
    import soundfile
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, subtype="PCM_16", format="WAV")
    write_output(path, buffer.getvalue(), f"--output_audio {path}")


def answer(loaded: Loaded, options: Options, facts: ModelFacts, messages: list, media: Media,
           chat: ChatCache | None = None, stop=None) -> Outcome:
    """One turn: inputs through the processor, generation (in a chat, from what its cache holds), the spoken
    reply when the runtime speaks."""
    import torch
    sampling = effective_sampling(loaded.model.generation_config, options.sampling)
    inputs = prepare_inputs(loaded.processor, messages, loaded.model.device, media, chat and chat.pictures)
    wanted = fit_context(options.sampling, facts.context_window, int(inputs["input_ids"].shape[-1]), facts.model_id,
                         hint="; /clear starts a new conversation" if options.interactive else "")
    use_audio_in_video = bool(media.use_audio_in_video and media.videos)
    with torch.inference_mode():
        result = generate_answer(loaded, inputs, wanted, options.show, use_audio_in_video, chat, stop)
    stats = stats_of(result, loaded, media.decode_s, chat.reused if chat is not None else None)
    if not loaded.runtime.speaks:
        return Outcome(result.text, stats, sampling)
    if result.wav is None or not len(result.wav):
        raise RunError("the model answered in text but produced no speech" + (", so no WAV was written" if
                       options.output_audio else "") + "; keep the default system prompt, which Qwen2.5-Omni needs "
                       "to speak")
    if options.play:
        say(f"🔊 Played {stats.audio_seconds:.1f} s of speech, the first after {stats.first_audio_s:.2f} s")
    if options.output_audio is None:
        return Outcome(result.text, stats, sampling)
    write_wav(options.output_audio, result.wav, SPEECH_SAMPLE_RATE)
    say(f"🔊 Wrote {stats.audio_seconds:.1f} s of speech to {options.output_audio}")
    return Outcome(result.text, stats, sampling, options.output_audio)


def with_fallbacks(step, plan: Plan, hw: Hardware, facts: ModelFacts, options: Options, workload: Workload):
    """step(plan), and once more on another plan, fit-checked: on the CPU when memory ran out on an
    accelerator, in a wider dtype when the logits overflowed. A second failure is an error."""
    from accelerate.utils.memory import clear_device_cache
    try:
        return step(plan)
    except NonFiniteLogits as exc:
        retry = retry_plan(hw, facts, options, workload, plan, overflowed=True)
        dropped = "; the text above is dropped" if exc.text and options.show == SHOW_STREAM else ""
        why = (f"⚠️ The logits turned NaN or infinite in {plan.dtype}: the model's activations overflow it"
               f"{dropped}; retrying once in {retry.dtype} on {_device_name(retry.device)}")
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if plan.device == "cpu":
            raise RunError(f"out of memory on the CPU; try a smaller model such as {SMALLER_MODEL_HINT} "
                           "or fewer --max_new_tokens") from exc
        retry = retry_plan(hw, facts, options, workload, plan, overflowed=False)
        why = f"⚠️ Out of memory on {plan.device}: freed it, retrying once on the CPU"
    clear_device_cache(garbage_collection=True)
    for line in (why, *retry.reasons):
        say(line)
    try:
        return step(retry)
    except NonFiniteLogits as exc:
        raise RunError(DAMAGED.format(dtype=f"{retry.dtype} too")) from exc
    except Exception as exc:
        if is_out_of_memory(exc):
            raise RunError(f"out of memory on {plan.device} and on {'the CPU' if retry.device == 'cpu' else retry.device}"
                           f"; try a smaller model such as {SMALLER_MODEL_HINT} or fewer --max_new_tokens") from exc
        raise


def answer_once(info: ModelInfo, facts: ModelFacts, plan: Plan, hw: Hardware, options: Options, media: Media,
                speech: Speech | None) -> Outcome:
    """Load, answer the one prompt; once more on another plan if memory runs out or the logits overflow."""
    messages = build_messages(options.prompt or "", options.system_prompt, media, info.kind)

    def attempt(attempt_plan: Plan) -> Outcome:
        loaded = load(info, attempt_plan, hw, options, speech)
        try:
            return answer(loaded, options, facts, messages, media)
        finally:
            del loaded   # not kept alive by a traceback while the retry loads its own copy
    return with_fallbacks(attempt, plan, hw, facts, options, workload_of(options, media))


def answer_record(outcome: Outcome, plan_record: dict | None, reproducibility: dict, packages: tuple) -> dict:
    """--json: the answer, the plan, the figures and what it takes to reproduce the run (never an API key)."""
    versions = {"python": platform.python_version(),
                **{name: importlib.import_module(name).__version__ for name in packages}}
    return {"text": outcome.text, "audio_path": str(outcome.audio_path) if outcome.audio_path else None,
            "plan": plan_record, "stats": outcome.stats.record(),
            "reproducibility": {**reproducibility, "versions": versions}}


# --- 13. a serving engine: the same command over the OpenAI protocol (--server) -------------
# This path imports neither torch nor transformers: it starts at once, on a machine without them.

def server_client(options: Options):
    """An OpenAI client for the engine: no retries (an error is said at once), a short connect timeout."""
    openai = _require("openai", "openai", "--server")
    key = os.environ.get(options.api_key_env) or "none"   # local engines take any key; the client wants one
    return openai.OpenAI(base_url=options.server, api_key=key, max_retries=0,
                         timeout=openai.Timeout(SERVER_READ_TIMEOUT_S, connect=SERVER_CONNECT_TIMEOUT_S))


def _data_url(mime: str, data: bytes) -> str:
    import base64
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image_part(image, max_pixels: int) -> dict:
    """A picture as a JPEG data URL, scaled to --max_pixels first (the engine sees what the tool would)."""
    import io
    width, height = image.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return {"type": "image_url", "image_url": {"url": _data_url("image/jpeg", buffer.getvalue())}}


def audio_part(samples) -> dict:
    """A recording (16 kHz mono, as decoded) as the protocol's input_audio: a base64 WAV."""
    import base64
    import io
    import soundfile
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, AUDIO_SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                                   "format": "wav"}}


def video_part(video: Video) -> dict:
    """A video file whole, as a data URL in vLLM's and SGLang's video_url part."""
    import mimetypes
    mime = mimetypes.guess_type(video.path)[0] or "video/mp4"
    return {"type": "video_url", "video_url": {"url": _data_url(mime, Path(video.path).read_bytes())}}


def protocol_messages(messages: list[dict], max_pixels: int) -> list[dict]:
    """The conversation in the protocol's form: text, then pictures, recordings and videos as content parts;
    a message of text alone as a plain string (engines without multimodal support take that)."""
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = [{"type": "text", "text": item["text"]} if item["type"] == "text" else
                     image_part(item["image"], max_pixels) if item["type"] == "image" else
                     audio_part(item["audio"]) if item["type"] == "audio" else video_part(item["clip"])
                     for item in content]
            content = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
        converted.append({"role": message["role"], "content": content})
    return converted


def server_request(options: Options, messages: list[dict]) -> tuple[dict, dict]:
    """The request, and what goes beyond the protocol (top-k and audio-in-video: vLLM's and SGLang's
    documented extensions; other engines ignore them)."""
    sampling = options.sampling
    request = {"model": options.model_id, "messages": protocol_messages(messages, options.max_pixels),
               "max_tokens": sampling.max_new_tokens, "stream": True, "stream_options": {"include_usage": True}}
    for name, value in (("temperature", sampling.temperature), ("top_p", sampling.top_p), ("seed", options.seed)):
        if value is not None:
            request[name] = value
    extra = {"top_k": sampling.top_k} if sampling.top_k is not None else {}
    if options.use_audio_in_video:
        extra["mm_processor_kwargs"] = {"use_audio_in_video": True}
    return request, extra


def served_models(client) -> list[str] | None:
    """The models the engine offers (/v1/models), or None if it will not say."""
    try:   # retried: an engine may close the connection its error came on, which the client would reuse
        return [model.id for model in client.with_options(max_retries=2).models.list()]
    except Exception:   # the engine's listing is a courtesy: any failure means "unknown"
        return None


def server_error(exc: Exception, client, options: Options, partial: bool) -> Exception:
    """An engine's failure as one line: what happened, at which URL, what to do. Others pass unchanged."""
    import openai
    where = f"--server {options.server}"
    transport = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")   # the client's own
    if partial and (transport or isinstance(exc, openai.APIConnectionError)):
        return RunError(f"{where}: the connection broke mid-answer ({exc.__cause__ or exc}); the answer above is "
                        "incomplete")
    if isinstance(exc, openai.APITimeoutError):
        return RunError(f"{where}: no answer within {SERVER_READ_TIMEOUT_S:.0f} s; the engine may be busy or "
                        "still loading the model; try again")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return RunError(f"{where}: cannot connect ({cause}); check the address and that the engine is running")
    if not isinstance(exc, openai.APIStatusError):
        return exc
    body = exc.body
    if not isinstance(body, dict):   # a streamed request's error body comes unparsed
        try:
            body = json.loads(exc.response.text)
        except ValueError:
            body = {}
    body = body if isinstance(body, dict) else {}
    error = body.get("error")
    message = str((error.get("message") if isinstance(error, dict) else error) or body.get("message")
                  or body.get("detail") or exc.response.text.strip()[:300] or exc.message).strip()
    code = exc.status_code
    if code == 401:
        unset = "" if os.environ.get(options.api_key_env) else " (it is not set)"
        return RunError(f"{where}: the engine refused the API key (401); put a key it accepts in "
                        f"{options.api_key_env}{unset}, or name another variable with --api_key_env")
    if code in (400, 404, 422, 500):   # an engine that loads models on demand fails (500) on one it cannot find
        offered = served_models(client)
        if offered is not None and options.model_id not in offered:
            return UsageError(f"--model_id {options.model_id}: {options.server} does not serve it ({code}: "
                              f"{message}); it serves: " + (", ".join(offered) or "nothing yet"))
    if code == 404:
        return RunError(f"{where}: not found (404: {message}); an OpenAI base URL usually ends in /v1")
    what = "the engine failed" if code >= 500 else "the engine refused the request"
    return RunError(f"{where}: {what} ({code}): {message}")


def server_answer(client, options: Options, messages: list[dict], show: str) -> Outcome:
    """One answer from the engine, streamed as it comes (server-sent events), timed from here: the time
    to the first token, and the tokens a second from the engine's own count (its usage) when it gives it."""
    request, extra = server_request(options, messages)
    parts, times, usage, served, chunks = [], [], None, None, 0
    start = time.perf_counter()
    try:
        stream = client.chat.completions.create(**request, extra_body=extra or None)
        for chunk in stream:
            served, usage, chunks = chunk.model or served, chunk.usage or usage, chunks + 1
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    times.append(time.perf_counter())
                    parts.append(choice.delta.content)
                    if show == SHOW_STREAM:
                        write_stdout(choice.delta.content)
    except BaseException as exc:   # the answer so far keeps its line; the error is said after it
        end_answer(show, "".join(parts), exc)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted("".join(parts)) from exc
        if isinstance(exc, Exception):
            raise server_error(exc, client, options, bool(parts)) from exc
        raise
    if not chunks:   # a web page, or an empty stream: no engine answered, and an empty answer would look like one
        kind = stream.response.headers.get("content-type", "").split(";")[0] or "no content type"
        raise RunError(f"--server {options.server}: what came back is not an answer over the OpenAI protocol "
                       f"({'an HTML page' if 'html' in kind else 'an empty stream' if 'event-stream' in kind else kind})"
                       "; give the engine's OpenAI base URL (it usually ends in /v1)")
    text = "".join(parts)
    end_answer(show, text)
    new = usage.completion_tokens if usage else len(parts)   # without usage, a streamed piece is about a token
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    stats = Stats(device=options.server, load_s=None, prompt_tokens=usage.prompt_tokens if usage else 0,
                  new_tokens=new, ttft_s=times[0] - start if times else None, decode_s=span or None,
                  decode_tokens_per_s=(new - 1) / span if span else None)
    sampling = {key: request[key] for key in ("max_tokens", "temperature", "top_p", "seed") if key in request}
    return Outcome(text, stats, {**sampling, **extra, "served_model": served})


def server_info(options: Options) -> ModelInfo:
    """The served model as the chat sees it: any input may go; the engine says what it refuses."""
    return ModelInfo(options.model_id, "", "multimodal", frozenset({"text", "image", "audio", "video"}))


def serve_once(options: Options, media: Media) -> int:
    """--server with one --prompt: the request, the answer, the stats line (and --json)."""
    client = server_client(options)
    say(f"🌐 Asking {options.model_id} at {options.server} (the OpenAI protocol; nothing is loaded here)")
    messages = build_messages(options.prompt or "", options.system_prompt, media, "multimodal")
    outcome = server_answer(client, options, messages, options.show)
    say(describe_stats(outcome.stats))
    if options.json:
        sampling = {key: value for key, value in outcome.sampling.items() if key != "served_model"}
        record = answer_record(outcome, None, {"server": options.server, "model_id": options.model_id,
                                               "served_model": outcome.sampling.get("served_model"),
                                               "seed": options.seed, "sampling": sampling}, ("openai",))
        write_stdout(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


# --- 14. chat --------------------------------------------------------------------------------

CHAT_HELP = ("Commands: /image PATH, /audio PATH, /video PATH (attach to your next message) · /clear (forget the "
             "conversation) · /save FILE (the conversation as JSON) · /stats (the last answer's figures) · /help · "
             "/exit (or Ctrl-D). Ctrl-C stops an answer.")


@dataclasses.dataclass
class Conversation:
    """The chat so far: the messages the model sees (their media inside them), and a record to save."""
    info: ModelInfo
    options: Options
    messages: list = dataclasses.field(default_factory=list)
    record: list = dataclasses.field(default_factory=list)      # {"role", "text", "attachments"}
    pending: Media = dataclasses.field(default_factory=Media)   # attached to the next message
    pending_paths: list = dataclasses.field(default_factory=list)
    turn_decode_s: float = 0.0                                  # the last message's media decode time
    last: Outcome | None = None                                 # the last answer, for /stats
    cache: ChatCache | None = None                              # what the model computed of it (not --no_kv_reuse)
    stop: object = None                                         # a threading.Event that stops an answer (--voice)

    def __post_init__(self):
        self.clear()

    def clear(self) -> None:
        self.messages = build_messages("", self.options.system_prompt, Media(), self.info.kind)[:-1]   # system only
        self.record, self.pending_paths = [], []
        if self.cache is not None:
            self.cache.clear()
        self.pending = Media(use_audio_in_video=self.options.use_audio_in_video)

    def attach(self, modality: str, path: str) -> None:
        """Decode a file now (so a bad one is said at once) for the next message."""
        if modality not in self.info.inputs:
            raise UsageError(f"/{modality}: {self.info.model_id} cannot take {modality}")
        start = time.perf_counter()
        if modality == "image":
            self.pending.images.append(load_image(path, "/image"))
        elif modality == "audio":
            self.pending.audios += audio_pieces(load_audio(path, "/audio"), f"/audio {path}")
        else:
            self.pending.videos.append(load_video(path, self.options.fps, self.options.use_audio_in_video, "/video",
                                                  self.options.max_pixels, video_budget(self.info, self.options,
                                                                                        f"/video {path}")))
        self.pending.decode_s += time.perf_counter() - start
        self.pending_paths.append(path)

    def ask(self, text: str) -> None:
        self.messages.append(build_messages(text, None, self.pending, self.info.kind)[-1])
        self.record.append({"role": "user", "text": text, "attachments": self.pending_paths})
        self.turn_decode_s = self.pending.decode_s
        self.pending, self.pending_paths = Media(use_audio_in_video=self.options.use_audio_in_video), []
        if self.cache is not None:
            self.cache.reused = len(self.cache.ids)   # what a failed turn goes back to

    def media(self) -> Media:
        media = media_of(self.messages, self.options.use_audio_in_video)
        media.decode_s = self.turn_decode_s
        return media

    def take_back(self) -> None:
        """The last question failed: forget it (its media go with it), and what the cache took of it."""
        self.messages.pop()
        self.record.pop()
        if self.cache is not None:
            self.cache.cut(self.cache.reused)

    def reply(self, text: str, stats: Stats | None = None) -> None:
        content = text if self.info.kind == "text" else [{"type": "text", "text": text}]
        self.messages.append({"role": "assistant", "content": content})
        figures = {} if stats is None else {"prompt_tokens": stats.prompt_tokens, "reused_tokens": stats.reused_tokens}
        self.record.append({"role": "assistant", "text": text, "attachments": [], **figures})


def _attach(chat: Conversation, command: str, rest: str) -> None:
    if not rest:
        raise UsageError(f"{command} needs a file: {command} PATH")
    chat.attach(command[1:], rest)
    say(f"📎 {rest} will go with your next message")


def _clear(chat: Conversation, command: str, rest: str) -> None:
    chat.clear()
    say("🧹 Cleared: a new conversation")


def _save(chat: Conversation, command: str, rest: str) -> None:
    if not rest:
        raise UsageError("/save needs a file: /save chat.json")
    target = Path(rest).expanduser()
    if target.is_dir() or not target.parent.is_dir():
        raise UsageError(f"/save {rest}: give a file in a folder that exists")
    text = json.dumps({"model_id": chat.info.model_id, "messages": chat.record}, indent=2, ensure_ascii=False)
    write_output(target, (text + "\n").encode("utf-8"), f"/save {rest}")
    say(f"💾 Saved {len(chat.record)} messages to {target}")


def _stats(chat: Conversation, command: str, rest: str) -> None:
    say(describe_stats(chat.last.stats) + "\n" + describe_stages(chat.last.stats) if chat.last else "No answer yet")


# /command -> what it does with (conversation, command, the rest of the line); None leaves the chat
CHAT_COMMANDS = {"/help": lambda chat, command, rest: say(CHAT_HELP), "/image": _attach, "/audio": _attach,
                 "/video": _attach, "/clear": _clear, "/save": _save, "/stats": _stats, "/exit": None, "/quit": None}


def _next_line(queue: list, terminal: bool) -> str | None:
    """The next message or command; None at the end of input (Ctrl-D)."""
    if queue:
        return queue.pop()
    while True:
        if terminal:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        try:
            line = read_stdin(line=True) if sys.stdin is not None else ""
        except KeyboardInterrupt:   # Ctrl-C at the prompt: a new prompt
            say("")
            continue
        except UsageError as exc:   # bytes that are not text: said, and the chat goes on
            say(f"Error: {exc}")
            continue
        return line or None


def _chat_turn(conversation: Conversation, run_turn) -> Interrupted | None:
    """Answer the last message with run_turn(); a failed turn is one Error: line and the chat goes on. Returns
    how an answer stopped part-way was stopped."""
    try:
        conversation.last = run_turn()
    except Interrupted as exc:
        conversation.reply(exc.text)
        say("⏹️ Stopped; the answer so far stays in the conversation" + (" (as far as it was heard)" if
                                                                         exc.first_sound else ""))
        return exc
    except Exception as exc:   # out of memory, a bad turn: the session goes on
        if conversation.options.debug:
            traceback.print_exc()
        conversation.take_back()
        what = one_line(exc) if isinstance(exc, (UsageError, RunError)) else f"{type(exc).__name__}: {one_line(exc, 300)}"
        say(f"Error: {'out of memory; /clear starts a shorter conversation' if is_out_of_memory(exc) else what}")
        return None
    conversation.reply(conversation.last.text, conversation.last.stats)
    if conversation.options.verbose:
        say(describe_stages(conversation.last.stats))
    return None


def chat(info: ModelInfo, facts: ModelFacts, plan: Plan, hw: Hardware, options: Options, media: Media,
         speech: Speech | None = None) -> int:
    """--interactive: load once, then answer message after message, keeping the history (and what the model
    computed of it, unless --no_kv_reuse)."""
    workload = workload_of(options, media)
    current = [with_fallbacks(lambda p: load(info, p, hw, options, speech), plan, hw, facts, options, workload)]
    conversation = Conversation(info, options, cache=ChatCache() if options.kv_reuse else None)

    def attempt(turn_plan: Plan) -> Outcome:   # a retry's plan loads the model anew, for the rest of the chat
        if current[0] is None or current[0].plan is not turn_plan:
            current[0] = None
            if conversation.cache is not None:   # computed on the other device: started again from the history
                conversation.cache.clear()
            current[0] = load(info, turn_plan, hw, options, speech)
        wav = options.output_audio and options.output_audio.with_name(
            f"{options.output_audio.stem}-{sum(m['role'] == 'user' for m in conversation.record)}"
            f"{options.output_audio.suffix}")
        return answer(current[0], dataclasses.replace(options, output_audio=wav or None), facts,
                      conversation.messages, conversation.media(), conversation.cache, conversation.stop)

    loop = voice_loop if options.voice else chat_loop
    return loop(conversation, media, lambda: with_fallbacks(
        attempt, current[0].plan if current[0] else plan, hw, facts, options, workload))


def server_chat(options: Options, media: Media) -> int:
    """--interactive with --server: the whole history goes with each request."""
    client = server_client(options)
    say(f"🌐 Chatting with {options.model_id} at {options.server} (the OpenAI protocol; nothing is loaded here)")
    conversation = Conversation(server_info(options), options)
    return chat_loop(conversation, media, lambda: server_answer(client, options, conversation.messages,
                                                                options.show))


def chat_loop(conversation: Conversation, media: Media, run_turn) -> int:
    """Message after message, each answered by run_turn(); commands from CHAT_COMMANDS. From a terminal
    it prompts; from a pipe it reads one message per line. The flags' media go with the first message."""
    options = conversation.options
    conversation.pending = media
    conversation.pending_paths = [*options.image_paths, *options.audio_paths, *options.video_paths]
    terminal = stdin_is_terminal()
    say("💬 Chat: type a message and press Enter; /help lists the commands")
    queue = [options.prompt] if options.prompt else []
    while (line := _next_line(queue, terminal)) is not None:
        line = line.strip()
        if not line:
            continue
        if not line.startswith("/"):
            conversation.ask(line)
            _chat_turn(conversation, run_turn)
            continue
        command, _, rest = line.partition(" ")
        if command in CHAT_COMMANDS and CHAT_COMMANDS[command] is None:
            break
        try:
            if command not in CHAT_COMMANDS:
                raise UsageError(f"{command}: unknown command; /help lists them")
            CHAT_COMMANDS[command](conversation, command, rest.strip())
        except (UsageError, RunError, OSError) as exc:
            say(f"Error: {one_line(exc)}")
    say("👋 Bye")
    return EXIT_OK


# · a spoken conversation (--voice): the microphone, where speech starts and ends, turn after turn

class Listener:
    """The default microphone, and where the person starts and stops speaking in what it hears (Silero VAD, on
    32 ms windows at 16 kHz). PortAudio calls `_heard` on its own thread: each block is resampled to 16 kHz if the
    device runs at another rate and goes through the detector there (about 1 ms a window); a finished utterance
    goes to `turns`, which the main thread waits on. While a reply is made (`replying`) the microphone is
    ignored (it would hear the speakers), unless `barge_in`: then speech that starts sets `stop`, which silences
    the reply at the next block the speakers ask for and stops its words at the next token."""

    def __init__(self, end_silence_ms: int, barge_in: bool, stop):
        import numpy as np
        import sounddevice
        from silero_vad import VADIterator, load_silero_vad
        with warnings.catch_warnings():   # torch.jit.load's deprecation, as Silero's model loads
            warnings.simplefilter("ignore")
            model = load_silero_vad()
        self.vad = VADIterator(model, threshold=0.5, sampling_rate=AUDIO_SAMPLE_RATE,
                               min_silence_duration_ms=end_silence_ms, speech_pad_ms=VOICE_PAD_MS)
        self.barge_in, self.stop, self.turns = barge_in, stop, queue.Queue()
        self.recent = self.pending = np.zeros(0, dtype=np.float32)   # the last second heard; samples not windowed yet
        self.speech, self.onset, self.level, self.replying, self.deaf = None, 0.0, 0.0, False, False
        self.position = self.origin = 0   # samples heard; where the detector's count began (it restarts after a reply)
        self.barged = None                # (the voice's onset, when the detector saw it: stream seconds, perf_counter())
        rate = int(sounddevice.query_devices(kind="input")["default_samplerate"])
        self.resample = None if rate == AUDIO_SAMPLE_RATE else _require("soxr", "soxr", "--voice").ResampleStream(
            rate, AUDIO_SAMPLE_RATE, 1, dtype="float32")
        self.stream = sounddevice.InputStream(samplerate=rate, channels=1, dtype="float32", callback=self._heard,
                                              blocksize=VOICE_WINDOW * rate // AUDIO_SAMPLE_RATE,
                                              finished_callback=lambda: self.turns.put(None))

    def __enter__(self):
        self.stream.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stream.stop()
        self.stream.close()

    def _heard(self, indata, frames, time_info, status) -> None:
        import numpy as np
        block = np.ascontiguousarray(indata[:, 0], dtype=np.float32)
        self.pending = np.concatenate((self.pending, self.resample.resample_chunk(block) if self.resample else block))
        while len(self.pending) >= VOICE_WINDOW:
            window, self.pending = self.pending[:VOICE_WINDOW], self.pending[VOICE_WINDOW:]
            self._window(window)

    def _window(self, window) -> None:
        """One 32 ms window: the detector's verdict, the utterance so far, a turn when it ends."""
        import numpy as np
        import torch
        self.position += len(window)
        self.level = float(np.sqrt(np.mean(window ** 2)))
        self.recent = np.concatenate((self.recent, window))[-AUDIO_SAMPLE_RATE:]
        if self.replying and not self.barge_in:   # half-duplex: what it hears is the speakers
            self.deaf = True
            return
        if self.deaf:   # the first window after a reply: the detector starts afresh from here
            self.vad.reset_states()
            self.speech, self.origin, self.deaf = None, self.position - len(window), False
        event = self.vad(torch.from_numpy(window)) or {}
        if "start" in event:
            start = self.origin + event["start"]
            self.speech = self.recent[max(0, len(self.recent) - (self.position - start)):]
            self.onset = start / AUDIO_SAMPLE_RATE
            if self.replying:   # a voice over the reply stops it
                self.barged = (self.onset, self.position / AUDIO_SAMPLE_RATE, time.perf_counter())
                self.stop.set()
        elif self.speech is not None:
            self.speech = np.concatenate((self.speech, window))
        if "end" in event and self.speech is not None:
            samples = self.speech[:len(self.speech) - (self.position - self.origin - event["end"])]
            self.turns.put(Heard(samples, self.onset, (self.origin + event["end"]) / AUDIO_SAMPLE_RATE,
                                 self.position / AUDIO_SAMPLE_RATE, time.perf_counter()))
            self.speech = None

    def next_turn(self, show):
        """The next utterance (a Heard); None when the microphone stopped or stdin ended (Ctrl-D). show(state,
        level) draws the status line meanwhile."""
        while True:
            try:
                return self.turns.get(timeout=0.1)
            except queue.Empty:
                show("hearing you" if self.speech is not None else "listening", self.level)


@dataclasses.dataclass(frozen=True)
class Heard:
    """An utterance: its 16 kHz samples; where it started and ended in the microphone's stream (seconds); when the
    detector was sure it had ended (stream seconds, and perf_counter() then)."""
    samples: object
    start: float
    end: float
    told: float
    told_at: float


class Turn(threading.Event):
    """What stops a spoken turn's reply once set (Enter, a voice over it), and what to do before its first words
    are printed (`before_words`: the status line cleared)."""
    before_words = None


def status_line(terminal: bool):
    """show(state, level): one line at a terminal, redrawn in place (listening / hearing you / thinking, a level
    meter while listening; it gives way to the reply's words); nothing in a pipe."""
    def show(state: str, level: float = 0.0) -> None:
        if terminal:
            meter = "▁▂▃▄▅▆▇█"[min(7, int(level * 40))] * 3 if state in ("listening", "hearing you") else ""
            sys.stderr.write(("\r🎙️ " + f"{state} {meter}" if state else "\r").ljust(40) + "\r")
            sys.stderr.flush()
    return show


def watch_keys(stop, turns: queue.Queue) -> None:
    """On a thread of its own: Enter stops a reply (sets `stop`); Ctrl-D at a terminal ends the conversation (the
    end of a stdin that is not a terminal, /dev/null say, ends nothing: the keys are simply not there)."""
    def watch() -> None:
        try:   # the descriptor itself: a daemon thread blocked in the buffered reader's lock breaks the exit
            while os.read(sys.stdin.fileno(), 4096):
                stop.set()
        except (OSError, ValueError, AttributeError):   # no stdin, or one that cannot be read: no keys
            return
        if stdin_is_terminal():
            turns.put(None)
    threading.Thread(target=watch, daemon=True).start()


def voice_loop(conversation: Conversation, media: Media, run_turn) -> int:
    """--voice: each utterance the microphone hears is a turn of the conversation, answered aloud as it is made
    (in text where the model cannot speak); the flags' media go with the first. Enter or Ctrl-C stops a reply;
    Ctrl-C while listening, or Ctrl-D, leaves."""
    options = conversation.options
    conversation.stop = stop = Turn()
    conversation.pending = media
    conversation.pending_paths = [*options.image_paths, *options.audio_paths, *options.video_paths]
    show = status_line(sys.stderr.isatty())
    listener = Listener(options.end_silence_ms, options.barge_in, stop)
    say("🎙️ Talk: speak, then pause to let it answer; " + ("speaking over a reply stops it (headphones)" if
        options.barge_in else "Enter stops a reply, the microphone resting while it plays") + "; Ctrl-D leaves")
    watch_keys(stop, listener.turns)
    with contextlib.suppress(KeyboardInterrupt), listener:   # Ctrl-C while listening leaves
        while (heard := listener.next_turn(show)) is not None:
            seconds = len(heard.samples) / AUDIO_SAMPLE_RATE
            conversation.pending.audios += audio_pieces(heard.samples, f"What you said ({seconds:.0f} s)")
            conversation.pending_paths.append(f"(spoken {heard.start:.2f}-{heard.end:.2f} s)")
            conversation.ask("")
            show("thinking")
            stop.clear()
            stop.before_words = lambda: show("")
            listener.barged, listener.replying, conversation.last = None, True, None
            try:
                stopped = _chat_turn(conversation, run_turn)
            finally:
                listener.replying = False
            show("")
            say(describe_turn(heard, conversation.last, stopped, listener.barged))
    show("")
    say("👋 Bye")
    return EXIT_OK


def describe_turn(heard: Heard, outcome: Outcome | None, stopped: Interrupted | None, barged) -> str:
    """A spoken turn's figures: when the voice was heard (stream seconds), how long the detector took to be sure
    it had ended, from then to the reply's first sound (its first words, where it has no voice), and what
    stopped it."""
    stats = outcome.stats if outcome else None
    if stats is not None and stats.started_at is not None:
        after = stats.first_played_s if stats.first_played_s is not None else stats.ttft_s
        first = None if after is None else stats.started_at + after
    else:
        first = stopped.first_sound if stopped else None
    what = "first words" if stats is not None and stats.first_played_s is None else "first sound"
    line = (f"🗣️ You spoke {heard.start:.2f}-{heard.end:.2f} s; the detector was sure {heard.told - heard.end:.2f} s "
            f"later" + (f"; {what} {first - heard.told_at:.2f} s after that" if first is not None else ""))
    if barged is not None:
        line += f"; your voice at {barged[0]:.2f} s (detected at {barged[1]:.2f} s) stopped the reply"
        if stopped is not None and stopped.silenced:
            line += f", silent {max(0.0, stopped.silenced - barged[2]):.2f} s later"
    return line


# --- 15. self-test, offline ----------------------------------------------------------------

QWEN_CHAT_TEMPLATE = (   # Qwen2.5 Instruct's chat format (without tool calls)
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SELF_TEST_CORPUS = ["Hello! How can I help you today?", "The cat sat on the warm blanket.",
                    "Explain quantum computing in simple terms.", "A cup of coffee on a wooden table."]


def train_tokenizer(corpus: list[str], special_tokens: list[str], chat_template: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen's pre-tokenizer, trained here on a few sentences."""
    from transformers import Qwen2Tokenizer
    tokenizer = Qwen2Tokenizer().train_new_from_iterator([corpus * 4], vocab_size=vocab_size, show_progress=False,
                                                         new_special_tokens=special_tokens)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_qwen2(folder: Path, corpus: list[str] = SELF_TEST_CORPUS,
                     special_tokens: list[str] = QWEN_SPECIAL_TOKENS) -> Path:
    """A random-weight Qwen2 checkpoint of 0.1 M parameters, saved like a real one.

    initializer_range 0.2 rather than 0.02: near-flat logits would make it answer only newlines."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = train_tokenizer(corpus, special_tokens, QWEN_CHAT_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"))}
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         max_window_layers=2, tie_word_embeddings=True, initializer_range=0.2, **ids)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def self_test(hw: Hardware, options: Options) -> int:
    """Check this installation offline: a tiny model through the real loading and generation path."""
    quiet_libraries(options.debug)
    with tempfile.TemporaryDirectory(prefix="run_multimodal_selftest_") as folder:
        start = time.perf_counter()
        build_tiny_qwen2(Path(folder))
        say(f"🧪 Built a tiny random-weight Qwen2 model in {time.perf_counter() - start:.1f} s")
        info = resolve_model(folder)
        facts = model_facts(load_config(info, False), info, False)
        options = dataclasses.replace(options, prompt="Say hello.", show=SHOW_ONCE,
                                      sampling=Sampling(max_new_tokens=8, temperature=0))
        plan = choose_plan(hw, facts, options)
        for line in plan.reasons:
            say(line)
        say("🧪 Its answer on stdout comes from random weights: gibberish is what a working installation prints")
        stats = answer_once(info, facts, plan, hw, options, Media(), None).stats
    say(describe_stats(stats))
    if stats.new_tokens < 1:
        raise RunError("self-test: the tiny model generated no tokens")
    say(f"✅ Self-test passed: torch, transformers and accelerate work, and generation runs on {stats.device}")
    return EXIT_OK


# --- 16. run -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """The whole job, in the order the data flows."""
    options = options_from_args(args)
    if options.self_test:
        hw = detect_hardware()
        check_device_available(hw, options)
        for line in describe_hardware(hw):
            say(line)
        return self_test(hw, options)
    if options.server:   # a serving engine answers: nothing about this machine matters
        media = load_media(options)
        return server_chat(options, media) if options.interactive else serve_once(options, media)

    options, info, media, speech = check_inputs(options)

    # The plan: from config.json alone (no weights) and the hardware, real or described.
    quiet_libraries(options.debug)
    facts = model_facts(load_config(info, options.trust_remote_code), info, options.trust_remote_code)
    if not options.dry_run:
        check_model_folder(info)
    hw = simulated_hardware(options.hardware) if options.hardware else detect_hardware()
    check_device_available(hw, options)
    for line in describe_hardware(hw):
        say(line)
    say(describe_model(info, facts, loading_components(facts, options.speaks)))
    plan = choose_plan(hw, facts, options, workload_of(options, media))
    for line in plan.reasons:
        say(line)
    if options.dry_run:
        return dry_run(info, facts, plan, hw, options, media)
    if not plan.proceeds:
        raise RunError(does_not_fit_message(facts, plan, hw))

    if options.seed is not None:
        from transformers import set_seed
        set_seed(options.seed)
    if options.interactive or options.voice:
        return chat(info, facts, plan, hw, options, media, speech)
    if options.answer_to_stderr:
        say(f"🔊 stdout carries the spoken reply (--output_audio {options.output_audio}): the answer's text comes here")
    with contextlib.redirect_stdout(sys.stderr) if options.answer_to_stderr else contextlib.nullcontext():
        outcome = answer_once(info, facts, plan, hw, options, media, speech)
    say(describe_stats(outcome.stats))
    if options.verbose:
        say(describe_stages(outcome.stats))
    if options.json:
        stats = outcome.stats
        record = answer_record(outcome, plan_as_dict(facts, plan, hw), {
            "model_id": info.model_id, "revision": info.revision or None, "path": info.path, "dtype": stats.dtype,
            "device_map": stats.device_map, "seed": options.seed, "sampling": outcome.sampling},
            ("torch", "transformers", "accelerate"))
        write_stdout(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


def check_inputs(options: Options) -> tuple:
    """Everything the user typed, checked before anything heavy happens: (options, the model's info, the media
    decoded, the spoken reply's settings). A voice conversation with a model that hears but cannot speak answers
    in text, said once."""
    check_speech_outputs(options)
    check_media_paths(options)
    info = resolve_model(options.model_id)
    check_modalities(options, info)
    check_checkpoint(info, options)
    if options.voice and not (info.model_type in SPEAKING_MODEL_TYPES and info.speaks and _has_talker_weights(info)):
        say(f"🔇 {info.model_id} hears but does not speak here: its replies come in text")
        options = dataclasses.replace(options, play=False, system_prompt=options.system_prompt
                                      if options.custom_system_prompt else None)
    return options, info, load_media(options, info), choose_speech(options, info)


def main(argv: list[str] | None = None) -> int:
    # An operation MPS lacks runs on the CPU instead of stopping the run; read when torch is imported.
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)   # SIGTERM stops like Ctrl-C, cleanly
    try:
        return run(args)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE, args.debug)
    except RunError as exc:
        return _fail(exc, EXIT_FAILURE, args.debug)
    except OutputClosed:
        return EXIT_OUTPUT_CLOSED
    except Terminated:
        say("\n⏹️ Terminated")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        say("\n⏹️ Interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:   # anything unexpected: one line, the traceback with --debug
        message = f"{type(exc).__name__}: {one_line(exc, 300)}"
        if is_out_of_memory(exc):
            message = f"out of memory ({message})"
        error = RunError(message + " (run again with --debug for the traceback)")
        error.__cause__ = exc   # --debug shows where it came from
        return _fail(error, EXIT_FAILURE, args.debug)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(exc: Exception, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    print(f"Error: {one_line(exc) or type(exc).__name__}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
