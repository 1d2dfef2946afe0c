"""English text normalisation for word error rates: Whisper's own `EnglishTextNormalizer`.

Published ASR numbers (the Open ASR leaderboard, the Whisper and Phi-4-multimodal papers) are word error rates
after OpenAI Whisper's English normaliser: lower case, no punctuation, numbers written as digits, one spelling
per word, contractions and titles expanded, hesitations dropped, so that a model is not charged for writing
"Mr. Smith paid $25" where the reference says "MISTER SMITH PAID TWENTY FIVE DOLLARS". For `phimm eval asr`'s
WER to compare with those numbers, the normaliser here is that one, called from the maintained package
`whisper-normalizer` (a copy of `whisper/normalizers/english.py`; phimm's `eval` extra installs it), not a
rewrite: its quirks are the published numbers' quirks ("zero point five" -> "0.5", "oh five" -> "05",
"CHAPTER ONE" -> "chapter one", "Ms." -> "ms", "John's" -> "john is").

The three classes are thin wrappers that import the package when they are made, so that `phimm.eval` imports
without it; each call is the package's call, output unchanged.
"""

from __future__ import annotations

__all__ = [
    "EnglishTextNormalizer",
    "EnglishNumberNormalizer",
    "EnglishSpellingNormalizer",
]


def _whisper_english():
    """The package's `whisper_normalizer.english` module."""
    try:
        from whisper_normalizer import english
    except ImportError as e:  # pragma: no cover - whisper-normalizer is in phimm's `eval` extra
        raise ImportError("WER normalisation needs whisper-normalizer: pip install 'phimm[eval]' "
                          "(or pip install whisper-normalizer)") from e
    return english


class _Whisper:
    """Calls the package's class of the same name."""

    def __init__(self):
        self._normalizer = getattr(_whisper_english(), type(self).__name__)()

    def __call__(self, text: str) -> str:
        return self._normalizer(text)


class EnglishTextNormalizer(_Whisper):
    """Whisper's English text normaliser (`whisper_normalizer.english.EnglishTextNormalizer`), the one behind
    published WERs: brackets and hesitations dropped, contractions and titles expanded, punctuation and
    diacritics removed, numbers and currencies as digits (`EnglishNumberNormalizer`), British spellings as
    American ones (`EnglishSpellingNormalizer`), whitespace collapsed.

    >>> EnglishTextNormalizer()("Mr. Smith didn't pay twenty-five dollars for the colour TV, um, OK?")
    'mister smith did not pay $25 for the color tv ok'
    """


class EnglishNumberNormalizer(_Whisper):
    """Whisper's spelled-out numbers to digits (`whisper_normalizer.english.EnglishNumberNormalizer`), on text that
    is already lower case without punctuation: "twenty five" -> "25", "zero point five" -> "0.5", "five dollars"
    -> "$5"."""


class EnglishSpellingNormalizer(_Whisper):
    """Whisper's British-to-American spellings, word by word (`whisper_normalizer.english.EnglishSpellingNormalizer`):
    "colour" -> "color", "organise" -> "organize", "centre" -> "center"."""
