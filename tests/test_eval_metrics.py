"""The metrics of `phimm eval` against hand-checked values: WER / CER, the official VQAv2 accuracy (its answer
normalisation cases included), exact match and ANLS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phimm.eval.metrics import (
    ErrorCounts,
    anls,
    cer,
    char_errors,
    exact_match,
    levenshtein,
    vqa_accuracy,
    vqa_normalize_answer,
    vqa_process_digit_article,
    vqa_process_punctuation,
    wer,
    word_errors,
)
from phimm.eval.normalize import EnglishTextNormalizer

# ---- WER / CER -----------------------------------------------------------------------------------------------


def test_word_errors_by_hand():
    # the cat SAT on THE mat -> the cat SIT on mat: one substitution, one deletion, six reference words
    counts = word_errors("the cat sat on the mat", "the cat sit on mat")
    assert (counts.substitutions, counts.deletions, counts.insertions, counts.reference_length) == (1, 1, 0, 6)
    assert wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)


def test_wer_is_a_corpus_rate_not_a_mean_of_rates():
    # 1 substitution in 3 words, 1 insertion in 2 words: 2 / 5 = 0.4 (the mean of rates would be 0.4167)
    assert wer(["a b c", "d e"], ["a x c", "d e f"]) == pytest.approx(0.4)


def test_wer_edge_cases():
    assert wer("hello world", "hello world") == 0.0
    assert wer("hello world", "") == 1.0  # everything deleted
    assert wer("a", "a b c") == 2.0  # insertions can take WER past 100 %
    assert wer("", "") == 0.0
    # an empty reference adds its insertions to the errors and nothing to the words
    assert wer(["", "a b"], ["x", "a b"]) == pytest.approx(0.5)
    assert word_errors("", "x y") == ErrorCounts(insertions=2)


def test_wer_with_normalizer():
    norm = EnglishTextNormalizer()
    assert wer("Twenty-five colours.", "25 colors", normalizer=norm) == 0.0
    assert wer("Twenty-five colours.", "25 colors") == 1.0  # raw: both words wrong
    assert wer(["HELLO, World!"], ["hello world"], normalizer=norm) == 0.0


def test_wer_input_checks():
    with pytest.raises(ValueError):
        wer(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        wer("a", ["a"])


def test_cer_by_hand():
    # "abc d" -> "abd d": one substitution in five characters (the space counts)
    assert cer("abc d", "abd d") == pytest.approx(0.2)
    counts = char_errors("kitten", "sitting")
    assert (counts.substitutions, counts.deletions, counts.insertions) == (2, 0, 1)
    assert cer("kitten", "sitting") == pytest.approx(3 / 6)
    assert cer(["ab", "cd"], ["ab", "c"]) == pytest.approx(1 / 4)
    assert cer("a  b ", "a b") == 0.0  # whitespace runs are one space


# ---- VQAv2: the official answer normalisation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes", "yes"),
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("u.s.a.", "usa"),
        ("1,000", "1000"),  # a comma between digits: every mark is deleted, none becomes a space
        ("red,white", "red white"),  # else a mark not touching a space becomes a space
        ("red, white", "red white"),  # and one touching a space is deleted
        ("a/b", "a b"),
        ("well-known", "well known"),
        ("yes!", "yes "),
        ("(left)", " left "),
        ("it's", "it's"),  # the apostrophe is not one of the marks
        ("what?", "what "),
        ('"quoted"', " quoted "),
        ("x=y+z", "x y z"),
        ("@home", " home"),
        ("10,000 people, maybe", "10000 people maybe"),
    ],
)
def test_vqa_process_punctuation(text, expected):
    assert vqa_process_punctuation(text) == expected


def test_vqa_period_strip_is_limited_to_32():
    # the official call passes re.UNICODE (32) where re.sub's count goes: the 33rd period on stays
    assert vqa_process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Two dogs", "2 dogs"),  # lower case, number words to digits, articles dropped
        ("a none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only none, zero ... ten
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt it", "isn't it"),
        ("yall", "y'all"),
        ("Im", "im"),  # the capitalised key never matches: the text is lower case by then
        ("  several   spaces  ", "several spaces"),
    ],
)
def test_vqa_process_digit_article(text, expected):
    assert vqa_process_digit_article(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [(" Two\n", "2"), ("The dog.", "dog"), ("Yes!", "yes"), ("1,000", "1000"), ("black and\twhite", "black and white")],
)
def test_vqa_normalize_answer(text, expected):
    assert vqa_normalize_answer(text) == expected


# ---- VQAv2 accuracy -------------------------------------------------------------------------------------------


def test_vqa_accuracy_leave_one_out_by_hand():
    answers = ["2"] * 3 + ["3"] * 7
    # "two" -> "2" matches 3 humans: leaving out one of those 3 leaves 2 matches (2/3), leaving out any of the
    # other 7 leaves 3 (1); (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("4", answers) == 0.0
    one = ["cat"] + ["dog"] * 9  # 1 match: (0 + 9 * 1/3) / 10 = 0.3
    assert vqa_accuracy("cat", one) == pytest.approx(0.3)
    two = ["cat"] * 2 + ["dog"] * 8  # 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("cat", two) == pytest.approx(0.6)
    assert vqa_accuracy("anything", []) == 0.0


@given(st.integers(min_value=0, max_value=10))
def test_vqa_accuracy_against_the_closed_form(matches):
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    expected = (matches * min(1, (matches - 1) / 3) + (10 - matches) * min(1, matches / 3)) / 10
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)
    assert 0.0 <= vqa_accuracy("yes", answers) <= 1.0


def test_vqa_accuracy_normalises_as_the_official_evaluation():
    # the prediction is always normalised
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("The two", ["2"] * 10) == 1.0
    # the answers get the punctuation step only, and only when they differ
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes."] * 5 + ["yes"] * 5) == 1.0
    # so an article in the human answers is kept, while the prediction loses its own
    assert vqa_accuracy("a dog", ["a dog"] * 5 + ["dog"] * 5) == 1.0  # matches the 5 "dog"
    assert vqa_accuracy("a dog", ["a dog"] * 10) == 0.0


def test_vqa_accuracy_2021_revision():
    # the VQA API's last revision normalises nothing where the humans agree
    assert vqa_accuracy("Yes", ["yes"] * 10, revision=2021) == 0.0
    assert vqa_accuracy("yes\n", ["yes"] * 10, revision=2021) == 1.0
    # and both sides fully where they disagree
    assert vqa_accuracy("a dog", ["a dog"] * 5 + ["dog"] * 5, revision=2021) == 1.0
    assert vqa_accuracy("Two", ["2"] * 5 + ["two"] * 5, revision=2021) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", ["x"], revision=2020)


# ---- exact match ----------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("Two", ["2"]) == 1.0
    assert exact_match("The dog.", ["dog", "cat"]) == 1.0
    assert exact_match("dogs", ["dog"]) == 0.0
    assert exact_match("two dogs", "2 dogs") == 1.0
    assert exact_match("", ["yes"]) == 0.0


# ---- ANLS -----------------------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_anls_by_hand():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5 characters
    assert anls(" HELLO ", ["hello"]) == 1.0  # lower case, stripped
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ab", ["ac"]) == 0.0  # NL = 0.5 is not below the threshold
    assert anls("abcd", ["abce"]) == pytest.approx(0.75)  # NL = 0.25
    assert anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)  # the best answer counts
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("ab", "ac", threshold=0.6) == pytest.approx(0.5)
    # "$ 12.50" vs "$12.50": one deletion in 7 characters
    assert anls("$ 12.50", ["$12.50"]) == pytest.approx(1 - 1 / 7)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=12), st.lists(st.text(max_size=12), min_size=1, max_size=4))
def test_scores_are_in_unit_interval(prediction, answers):
    for score in (anls(prediction, answers), vqa_accuracy(prediction, answers), exact_match(prediction, answers)):
        assert 0.0 <= score <= 1.0
    assert anls(answers[0], answers) == 1.0


def test_hand_written_references_are_normalised_like_the_official_annotations():
    from phimm.eval.vqa import VqaTask

    answers = ["three"] * 10
    # the official metric normalises the prediction ("three" -> "3") but not unanimous references
    assert VqaTask().scores("three", answers)["accuracy"] == 0.0
    assert VqaTask(normalize_references=True).scores("three", answers)["accuracy"] == 1.0
    assert VqaTask(normalize_references=True).scores("two", answers)["accuracy"] == 0.0
