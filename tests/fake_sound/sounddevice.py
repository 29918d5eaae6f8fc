"""A microphone and speakers where there are none (the tests' machines have neither): the part of sounddevice
the tool uses, driven by the environment. Only the hardware is simulated; the tool's callbacks, the voice
detector and the model run as they do with real devices.

  FAKE_MIC=a.wav@1.0,b.wav@4.5   what the microphone hears: recordings placed at those seconds of its stream,
                                 silence elsewhere; FAKE_MIC_SECONDS long (default: 2 s after the last ends)
  FAKE_MIC_RATE=16000            the microphone's own rate (a Mac's is often 48000)
  FAKE_SPEED=1.0                 how fast the stream runs against the wall clock (1: real time)
  FAKE_LOG=path                  a line a block: "mic WALL STREAM_SECONDS" and "out WALL PEAK"
  FAKE_NO_INPUT=1, FAKE_NO_OUTPUT=1   no such device
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

__version__ = "0.0-simulated"


class PortAudioError(Exception):
    pass


def query_devices(kind=None):
    if kind == "input" and os.environ.get("FAKE_NO_INPUT") or kind == "output" and os.environ.get("FAKE_NO_OUTPUT"):
        raise PortAudioError(f"Error querying device -1 (no default {kind} device)")
    rate = float(os.environ.get("FAKE_MIC_RATE", 16000)) if kind == "input" else 48000.0
    return {"name": f"simulated {kind}", "default_samplerate": rate}


def _log(line: str) -> None:
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(line + "\n")


def _heard(rate: int) -> np.ndarray:
    """The microphone's whole stream at `rate`."""
    import soundfile
    import soxr
    placed = []
    for item in filter(None, os.environ.get("FAKE_MIC", "").split(",")):
        path, at = item.rsplit("@", 1)
        samples, source = soundfile.read(path, dtype="float32", always_2d=True)
        placed.append((float(at), soxr.resample(samples.mean(axis=1), source, rate).astype(np.float32)))
    end = max([at + len(samples) / rate for at, samples in placed], default=0) + 2
    stream = np.zeros(int(float(os.environ.get("FAKE_MIC_SECONDS", end)) * rate), dtype=np.float32)
    for at, samples in placed:
        stream[int(at * rate):int(at * rate) + len(samples)] = samples[:len(stream) - int(at * rate)]
    return stream


class _Stream:
    def __init__(self, samplerate=None, channels=1, dtype="float32", callback=None, blocksize=None,
                 finished_callback=None, **kwargs):
        self.rate, self.callback, self.finished = int(samplerate), callback, finished_callback
        self.blocksize = blocksize or self.rate // 50
        self.running = False

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self):
        """As PortAudio's Pa_StopStream: once it returns, the callback is not running (and will not run again)."""
        self.running = False
        thread = getattr(self, "thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    close = stop

    abort = stop


class InputStream(_Stream):
    def _run(self):
        stream, speed = _heard(self.rate), float(os.environ.get("FAKE_SPEED", 1.0))
        began = time.perf_counter()
        for start in range(0, len(stream) - self.blocksize + 1, self.blocksize):
            if not self.running:
                return
            time.sleep(max(0.0, began + (start + self.blocksize) / self.rate / speed - time.perf_counter()))
            _log(f"mic {time.perf_counter():.4f} {(start + self.blocksize) / self.rate:.4f}")
            self.callback(stream[start:start + self.blocksize, None].copy(), self.blocksize, None, None)
        if self.finished:
            self.finished()


class OutputStream(_Stream):
    def _run(self):
        began, block = time.perf_counter(), 0
        while self.running:
            out = np.zeros((self.blocksize, 1), dtype=np.float32)
            self.callback(out, self.blocksize, None, None)
            _log(f"out {time.perf_counter():.4f} {float(np.abs(out).max()):.3e}")
            block += 1
            time.sleep(max(0.0, began + block * self.blocksize / self.rate - time.perf_counter()))
