"""Loading and validating images and audio.

`load_image` turns anything image-like (a PIL image, a path, bytes, a binary file object, a numpy array or a
torch tensor) into a fully decoded RGB `PIL.Image.Image`, oriented as a viewer shows it. `load_audio` turns
anything audio-like (a path, bytes, a file object, an `(array, sampling_rate)` pair, a `datasets`-style dict)
into a mono float32 numpy array at the requested sample rate. `audio_duration` tells how long audio is,
cheaply where it can, and `describe` names a media object in a few words for messages.

Every failure is a `phimm.errors.MediaError` (`ImageError`, `AudioError`) or, for an object of a type that is
not media at all, an `UnsupportedMediaError`; the message names the input, says what was wrong (with the
sizes and limits involved) and what to do about it.

Choices worth knowing:

* Images larger than `max_pixels` are refused from their header, before any pixel is decoded
  (decompression-bomb guard). PIL's own `DecompressionBombError` is reported as an `ImageError` too.
* Images are decoded in full, so a truncated or corrupt PNG/JPEG is refused rather than padded; phimm never
  changes `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` (left `False`, PIL's default).
* Transparent images (RGBA, LA, palette with transparency) are composited on white. 16-bit grayscale
  (`I;16*`) is scaled to 8 bits (value / 257); 32-bit integer (`I`) images are read as 0..65535 the same way
  (negative values clipped to 0). Float (`F`) images in [0, 1] are scaled by 255, others are read as
  0..255 and clipped. Animated / multi-frame images give their first frame. EPS is not opened (PIL would run
  Ghostscript on it).
* Arrays as images: numpy arrays are HxW, HxWxC (C in 1, 3, 4) and, when the last axis can't hold channels,
  CxHxW; torch tensors are CxHxW first, then HxWxC. uint8 is used as is, uint16 scaled by 1/257, bool maps to
  0/255, floats must lie in [0, 1] (a tolerance of 1e-3 is clipped).
* Arrays as audio: 1-D is mono; for 2-D the channel axis is the smaller one when it is at most 8
  (`[samples, channels]` on a tie). Integer samples are scaled to [-1, 1] by their dtype's range (unsigned
  ones are offset-binary: 128 is silence in uint8). A pair may be given as `(array, rate)` or, as
  `scipy.io.wavfile.read` returns it, `(rate, array)`.
* Resampling uses `torchaudio.transforms.Resample`, cached per rate pair. For pairs whose sinc kernel would be
  huge (rates with a tiny common divisor, like 16001 -> 16000) it falls back to exact FFT resampling, which
  needs no kernel. Output length is ceil(n * sample_rate / sampling_rate), as torchaudio's.
* `min_samples` counts samples of the output (after resampling); audio with no samples at all is always refused.
  The default `min_samples=1` accepts a single sample.
* Strings starting with ``data:`` are read as data URIs (base64 or percent-encoded). URLs are not downloaded.
* Dicts: ``{"bytes"}`` / ``{"path"}`` (as `datasets` gives, bytes first), ``{"url"}`` (chat messages) for both;
  ``{"array", "sampling_rate"}`` and OpenAI-style ``{"data": <base64>, "format": ...}`` for audio.

The package is split by concern: `phimm.media.sources` (describing inputs, sniffing bytes, reading files,
streams and data URIs), `phimm.media.image` (`load_image`) and `phimm.media.audio` (`load_audio`,
`audio_duration`, and the steps on their own: `decode_audio`, `mix_down`, `resample`).
"""

from __future__ import annotations

from phimm.errors import AudioError, ImageError, MediaError, UnsupportedMediaError  # noqa: F401 (as before the split)

from .audio import MAX_AUDIO_SECONDS, MAX_SAMPLE_RATE, SAMPLE_RATE, audio_duration, load_audio
from .image import MAX_IMAGE_PIXELS, load_image
from .sources import describe

__all__ = [
    "SAMPLE_RATE",
    "MAX_IMAGE_PIXELS",
    "MAX_AUDIO_SECONDS",
    "MAX_SAMPLE_RATE",
    "load_image",
    "load_audio",
    "audio_duration",
    "describe",
]
