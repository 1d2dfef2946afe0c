"""Speech for the toy domain: eSpeak NG through ctypes on the `espeakng-loader` wheel (no system packages).

Synchronous mode: `espeak_Synth` returns once the callback has seen every sample. Each process sets up its own
engine (again after a fork), calls are serialised by a lock, and each utterance runs on a freshly loaded library
so that its samples depend only on the arguments (see `_Engine`).
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import os
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0

# spec ranges: words per minute and eSpeak pitch (0-100)
RATE_RANGE = (130, 210)
PITCH_RANGE = (30, 70)

# English voices of eSpeak NG 1.52 (lang/gmw/en*), minus en-Shaw, which reads Shavian script
ENGLISH_VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd")

_CALLBACK_T = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _data_path() -> str:
    import espeakng_loader

    return espeakng_loader.get_data_path()


@lru_cache(maxsize=1)
def variant_names() -> tuple[str, ...]:
    """Voice variant names (files of the data dir's `voices/!v/`), sorted; "" stands for no variant."""
    folder = Path(_data_path()) / "voices" / "!v"
    return ("",) + tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))


def _declare(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_T]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None


class _Engine:
    """The process's eSpeak NG.

    eSpeak NG keeps state between utterances in static variables no API resets (the pitch flutter's phase, among
    others), so the same call would give slightly different samples depending on what was said before.
    For outputs that depend only on the arguments, every utterance runs on a freshly loaded library: a private
    copy of the .so (so no other user of the library in this process shares or keeps it loaded) is opened,
    initialised, used and closed again: about 2 ms an utterance on top of the synthesis."""

    def __init__(self) -> None:
        import espeakng_loader

        self.pid = os.getpid()
        self._tmp = tempfile.mkdtemp(prefix="phimm-espeak-")
        self.lib_path = os.path.join(self._tmp, "libespeak-ng-phimm.so")
        shutil.copyfile(espeakng_loader.get_library_path(), self.lib_path)
        atexit.register(self._cleanup, self.pid, self._tmp)
        self.data_path = _data_path().encode()
        self._libc = ctypes.CDLL(None)
        self._libc.srand.argtypes = [ctypes.c_uint]
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK_T(self._on_samples)  # kept: the library holds only a raw pointer
        self.sample_rate = self._run(lambda lib: None, b"en")[1]

    @staticmethod
    def _cleanup(pid: int, folder: str) -> None:
        if os.getpid() == pid:  # forked children leave the parent's copy alone
            shutil.rmtree(folder, ignore_errors=True)

    def _on_samples(self, wav, n, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on

    def _run(self, body, voice: bytes):
        """Open a fresh library, initialise it, select `voice`, run `body(lib)`, close it: (result, rate)."""
        lib = ctypes.CDLL(self.lib_path, mode=ctypes.RTLD_LOCAL)
        try:
            _declare(lib)
            sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path, 0)
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({sr}); is the espeakng-loader data dir intact?")
            lib.espeak_SetSynthCallback(self._callback)
            if lib.espeak_SetVoiceByName(voice) != _EE_OK:
                raise ValueError(f"eSpeak NG has no voice {voice.decode()!r}; see ENGLISH_VOICES, variant_names()")
            try:
                return body(lib), int(sr)
            finally:
                lib.espeak_Terminate()
        finally:
            handle = lib._handle
            del lib
            _ctypes.dlclose(handle)

    def synth(self, voice: bytes, text: str, rate: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data, len(data))

        def body(lib):
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
            lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
            lib.espeak_ng_SetRandSeed(seed)  # else seeded from the clock by espeak_Initialize
            self._libc.srand(seed & 0xFFFFFFFF)  # the speechPlayer voices (Reed, caleb) draw noise from libc rand()
            self._chunks = []
            err = lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if err != _EE_OK:
                raise RuntimeError(f"espeak_Synth failed with code {err}")

        try:
            self._run(body, voice)
            chunks = self._chunks
        finally:
            self._chunks = []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


_lock = threading.Lock()
_engine: _Engine | None = None


def _get_engine() -> _Engine:
    global _engine
    if _engine is None or _engine.pid != os.getpid():  # a forked child sets up its own
        _engine = _Engine()
    return _engine


class Speaker:
    """Synthesises English speech. All `Speaker`s of a process share one engine; calls are serialised, and the
    samples depend only on the arguments (not on earlier calls)."""

    def __init__(self) -> None:
        with _lock:
            self.sample_rate = _get_engine().sample_rate

    def say(self, text: str, voice: str = "en", variant: str = "m3", rate: int = 170, pitch: int = 50,
            pitch_range: int = 50, seed: int = 0) -> tuple[np.ndarray, int]:
        """`text` spoken -> (float32 samples in [-1, 1], sample rate). `variant` "" means the voice's default;
        `seed` seeds the synthesiser's noise (breathy voices, Klatt frication).

        Leading and trailing silence is trimmed to a few milliseconds so durations track the words."""
        if variant and variant not in variant_names():  # eSpeak NG would silently use the default voice
            raise ValueError(f"unknown voice variant {variant!r}; see variant_names()")
        name = voice if not variant else f"{voice}+{variant}"
        with _lock:
            engine = _get_engine()
            pcm = engine.synth(name.encode(), text, rate, pitch, pitch_range, seed)
            sr = engine.sample_rate
        x = pcm.astype(np.float32) / 32768.0
        return trim_silence(x, sr), sr


def trim_silence(x: np.ndarray, sr: int, threshold: float = 1e-3, keep_s: float = 0.02) -> np.ndarray:
    """Cut leading/trailing samples below `threshold`, keeping `keep_s` seconds of margin each side."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    if loud.size == 0:
        return x
    keep = int(keep_s * sr)
    return x[max(0, loud[0] - keep): loud[-1] + 1 + keep]


def add_noise(x: np.ndarray, snr_db: float, rng) -> np.ndarray:
    """`x` plus white Gaussian noise at `snr_db` dB below its mean power, clipped to [-1, 1].

    `rng` is a `random.Random` (or anything with `.getrandbits`), so the noise is deterministic given its state."""
    x = np.asarray(x, dtype=np.float32)
    power = float(np.mean(x.astype(np.float64) ** 2)) if x.size else 0.0
    if power == 0.0:
        return x.copy()
    gen = np.random.default_rng(rng.getrandbits(63))
    noise = gen.standard_normal(x.shape).astype(np.float32) * np.float32(np.sqrt(power / 10 ** (snr_db / 10)))
    return np.clip(x + noise, -1.0, 1.0).astype(np.float32)


def resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample mono float32 audio with phimm.media's resampler (torchaudio's cached sinc kernel), clipped to
    [-1, 1]; equal rates give the samples unchanged (not clipped)."""
    if orig_sr == new_sr:
        return np.asarray(x, dtype=np.float32)
    from phimm.media.audio import resample as media_resample  # deferred: torch / torchaudio only when needed

    return np.clip(media_resample(x, int(orig_sr), int(new_sr)), -1.0, 1.0).astype(np.float32)
