"""The metrics of `phimm eval`: WER and CER (with jiwer), VQAv2 accuracy, exact match and ANLS.

ASR: `wer` and `cer` are corpus rates, as published numbers are: the edits summed over all utterances divided by
the reference words (characters) summed over all utterances; not a mean of per-utterance rates. Pass
`normalizer=EnglishTextNormalizer()` (`phimm.eval.normalize`: Whisper's own, from whisper-normalizer) for the
normalised rates (`phimm eval asr` reports both).

VQA: `vqa_accuracy` follows the official VQAv2 evaluation (`vqaEval.py` of the VQA API) to the letter, quirks
included, so that numbers compare with published ones:

- the prediction: newlines and tabs become spaces, it is stripped, then `vqa_process_punctuation` and
  `vqa_process_digit_article` are applied (`vqa_normalize_answer`);
- the human answers: when they are not all the same, `vqa_process_punctuation` is applied to each (and nothing
  else: the official annotations are already lower case, with digits);
- accuracy: for each of the human answers left out in turn, `min(1, matches among the others / 3)`; the
  mean of these. With ten answers, that is `min(#matching humans / 3, 1)` averaged over the ten 9-of-10 subsets.

That is the evaluation of the VQAv2 challenges (2016 to 2021); `revision=2021` gives the VQA API's last
revision, which normalises only where the humans disagree.

`exact_match` is 1 when the prediction, after the same normalisation, equals one of the answers after the same
normalisation. `anls` is the average normalised Levenshtein similarity of document VQA (DocVQA, ST-VQA):
`max over answers of (1 - NL)` where `NL = edit distance / longer length` after lower-casing and stripping
(and collapsing inner whitespace), and 0 where `NL >= 0.5`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "ErrorCounts",
    "word_errors",
    "char_errors",
    "wer",
    "cer",
    "levenshtein",
    "vqa_process_punctuation",
    "vqa_process_digit_article",
    "vqa_normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "anls",
]


# --------------------------------------------------------------------------------------------------------------
# WER / CER
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ErrorCounts:
    """Edit operations of a hypothesis against a reference (words or characters); they add up with `+`."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / reference length; with an empty reference, 0.0 for an empty hypothesis, else 1.0 per
        inserted unit (the rate is then the number of insertions)."""
        if self.reference_length == 0:
            return float(self.insertions)
        return self.errors / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


def _jiwer():
    try:
        import jiwer
    except ImportError as e:  # pragma: no cover - jiwer is in phimm's `eval` extra
        raise ImportError("WER and CER need jiwer: pip install 'phimm[eval]' (or pip install jiwer)") from e
    return jiwer


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Word-level edits (jiwer's alignment) of `hypothesis` against `reference`, both split on whitespace."""
    ref_words = reference.split()
    hyp_words = hypothesis.split()
    if not ref_words:
        return ErrorCounts(insertions=len(hyp_words))
    if not hyp_words:
        return ErrorCounts(deletions=len(ref_words), reference_length=len(ref_words))
    out = _jiwer().process_words(" ".join(ref_words), " ".join(hyp_words))
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, len(ref_words))


def char_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Character-level edits of `hypothesis` against `reference`; whitespace runs count as one space and the
    ends are stripped (so a space between words is a character, as in jiwer's CER)."""
    ref = " ".join(reference.split())
    hyp = " ".join(hypothesis.split())
    if not ref:
        return ErrorCounts(insertions=len(hyp))
    if not hyp:
        return ErrorCounts(deletions=len(ref), reference_length=len(ref))
    out = _jiwer().process_characters(ref, hyp)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, len(ref))


def _pairs(references, hypotheses) -> list[tuple[str, str]]:
    if isinstance(references, str) != isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must both be strings or both be sequences of strings")
    if isinstance(references, str):
        return [(references, hypotheses)]
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return list(zip(references, hypotheses))


def _corpus_rate(references, hypotheses, normalizer, count) -> float:
    total = ErrorCounts()
    for ref, hyp in _pairs(references, hypotheses):
        if normalizer is not None:
            ref, hyp = normalizer(ref), normalizer(hyp)
        total = total + count(ref, hyp)
    return total.rate


def wer(
    references: str | Sequence[str],
    hypotheses: str | Sequence[str],
    normalizer: Callable[[str], str] | None = None,
) -> float:
    """Word error rate of one pair of strings or of a corpus (edits summed / reference words summed), after
    `normalizer` on both sides if given. 0.25 means 25 %."""
    return _corpus_rate(references, hypotheses, normalizer, word_errors)


def cer(
    references: str | Sequence[str],
    hypotheses: str | Sequence[str],
    normalizer: Callable[[str], str] | None = None,
) -> float:
    """Character error rate, like `wer` but on characters (spaces between words count)."""
    return _corpus_rate(references, hypotheses, normalizer, char_errors)


# --------------------------------------------------------------------------------------------------------------
# VQAv2 accuracy (the official evaluation's normalisation and averaging)
# --------------------------------------------------------------------------------------------------------------

# The official evaluation's contractions table (`word=replacement`): a word written without its apostrophe gets
# it back. The capitalised keys never match (the text is lower case by then); they are kept as the official has them.
_VQA_CONTRACTIONS: dict[str, str] = dict(pair.split("=") for pair in """
'ow'sat='ow's'at 'ows'at='ow's'at aint=ain't arent=aren't cant=can't couldn'tve=couldn't've
couldnt=couldn't couldnt've=couldn't've couldve=could've didnt=didn't doesnt=doesn't dont=don't
hadn'tve=hadn't've hadnt=hadn't hadnt've=hadn't've hasnt=hasn't havent=haven't he'dve=he'd've
hed=he'd hed've=he'd've hes=he's howd=how'd howll=how'll hows=how's I'dve=I'd've Id've=I'd've Im=I'm
isnt=isn't it'dve=it'd've itd=it'd itd've=it'd've itll=it'll Ive=I've let's=let's maam=ma'am
mightn'tve=mightn't've mightnt=mightn't mightnt've=mightn't've mightve=might've mustnt=mustn't
mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
shant=shan't she'dve=she'd've she's=she's shed've=she'd've shouldn'tve=shouldn't've
shouldnt=shouldn't shouldnt've=shouldn't've shouldve=should've somebody'd=somebodyd
somebody'dve=somebody'd've somebodyd've=somebody'd've somebodyll=somebody'll somebodys=somebody's
someone'dve=someone'd've someoned=someone'd someoned've=someone'd've someonell=someone'll
someones=someone's something'dve=something'd've somethingd=something'd somethingd've=something'd've
somethingll=something'll thats=that's there'dve=there'd've thered=there'd thered've=there'd've
therere=there're theres=there's they'dve=they'd've theyd=they'd theyd've=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't we'dve=we'd've wed've=we'd've werent=weren't
weve=we've whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've who'dve=who'd've whod=who'd whod've=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldn'tve=wouldn't've wouldnt=wouldn't
wouldnt've=wouldn't've wouldve=would've y'all'dve=y'all'd've y'alld've=y'all'd've y'allll=y'all'll
yall=y'all yall'd've=y'all'd've yall'll=y'all'll you'dve=you'd've youd=you'd youd've=you'd've
youll=you'll youre=you're youve=you've
""".split())
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = frozenset(("a", "an", "the"))
# The marks the official evaluation handles, in its order (the order matters: each decision looks at the
# text as it was before any replacement, but replacements compound). Periods have their own rule below.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")
# The official pattern, kept as written: its `(?!<=\d)` was meant as a look-behind but is a look-ahead that
# always holds, so the pattern removes every period that is not followed by a digit.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_IN_DIGITS = re.compile(r"(\d)(,)(\d)")


def vqa_process_punctuation(text: str) -> str:
    """The official evaluation's punctuation step.

    Each punctuation mark of its list is deleted where it touches a space (or anywhere, when the text has a
    comma between digits), else replaced by a space; then periods not followed by a digit are removed (at most
    32 of them: the official call passes `re.UNICODE`, whose value is 32, where `count` goes).
    """
    out = text
    comma_in_digits = _VQA_COMMA_IN_DIGITS.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or comma_in_digits:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=32)


def vqa_process_digit_article(text: str) -> str:
    """The official evaluation's second step: lower case, words split on whitespace, number words "none",
    "zero" ... "ten" to digits, articles dropped, apostrophe-less contractions restored ("dont" -> "don't")."""
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(word)
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation normalises it before comparing."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, revision: int = 2016) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers (normally ten), in [0, 1].

    As the official evaluation: each human answer is left out in turn, the prediction scores
    `min(1, #matches among the remaining answers / 3)` against the rest, and these scores are averaged.

    `revision=2016` (the default) normalises as the evaluation of the VQAv2 challenges and their evaluation
    server: the prediction always (`vqa_normalize_answer`), the human answers with the punctuation step only and
    only when they differ. `revision=2021` follows the VQA API's last change: newlines, tabs and outer spaces
    go from every answer, and the prediction and the answers get both steps, but only when the answers differ
    (so "Yes" against ten "yes" scores 0 there, 1 here).
    """
    if revision not in (2016, 2021):
        raise ValueError(f"revision must be 2016 or 2021, not {revision!r}")
    answers = list(answers)
    if not answers:
        return 0.0
    differ = len(set(answers)) > 1
    if revision == 2016:
        predicted = vqa_normalize_answer(prediction)
        if differ:
            answers = [vqa_process_punctuation(a) for a in answers]
    else:
        answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        predicted = prediction.replace("\n", " ").replace("\t", " ").strip()
        if len(set(answers)) > 1:
            answers = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in answers]
            predicted = vqa_process_digit_article(vqa_process_punctuation(predicted))
    matches = [a == predicted for a in answers]
    total_matches = sum(matches)
    scores = [min(1.0, (total_matches - m) / 3.0) for m in matches]
    return sum(scores) / len(scores)


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 when the prediction equals one of the answers, both normalised as the official VQA evaluation
    normalises predictions (`vqa_normalize_answer`); else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    predicted = vqa_normalize_answer(prediction)
    return 1.0 if any(vqa_normalize_answer(a) == predicted for a in answers) else 0.0


# --------------------------------------------------------------------------------------------------------------
# ANLS
# --------------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one prediction (DocVQA, ST-VQA): the best over the answers
    of `1 - NL`, where `NL = levenshtein / max(len)` on lower-cased, stripped text, counted as 0 where
    `NL >= threshold`. In [0, 1]."""
    if isinstance(answers, str):
        answers = [answers]
    predicted = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        gold = " ".join(answer.strip().lower().split())
        longest = max(len(gold), len(predicted))
        distance = levenshtein(gold, predicted) / longest if longest else 0.0
        score = 1.0 - distance if distance < threshold else 0.0
        best = max(best, score)
    return best
