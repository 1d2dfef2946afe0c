"""The English text normaliser of `phimm eval asr`, against literal tables of input -> expected output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phimm.eval.normalize import (
    BRITISH_TO_AMERICAN,
    EnglishNumberNormalizer,
    EnglishSpellingNormalizer,
    EnglishTextNormalizer,
)

NORMALIZE = EnglishTextNormalizer()

CASE_AND_PUNCTUATION = [
    ("HELLO World", "hello world"),
    ("  spaced   out\ttext \n", "spaced out text"),
    ("Hello, world! How are you?", "hello world how are you"),
    ("well-known state-of-the-art", "well known state of the art"),
    ("the end.", "the end"),
    ("e.g. this", "e g this"),
    ("a/b testing", "a b testing"),
    ("Q&A session", "q a session"),
    ("email@example.com", "email example com"),
    ('He said: "Stop!"', "he said stop"),
    ("café naïve résumé", "cafe naive resume"),
    ("straße œuvre", "strasse oeuvre"),
    ("[laughter] hello (inaudible) there <noise>", "hello there"),
    ("", ""),
    ("   ", ""),
    ("...", ""),
]

CONTRACTIONS = [
    ("I won't go", "i will not go"),
    ("you can't stop", "you can not stop"),
    ("you cannot stop", "you can not stop"),
    ("they're here and we've seen it", "they are here and we have seen it"),
    ("I'm sure she'll know", "i am sure she will know"),
    ("he'd like that", "he would like that"),
    ("It's been a while since he'd been there", "it has been a while since he had been there"),
    ("let's go", "let us go"),
    ("that's it", "that is it"),
    ("it’s fine", "it is fine"),  # a typographic apostrophe
    ("It's   OK...", "it is ok"),
    ("the dog's bone", "the dogs bone"),  # a possessive keeps its s
    ("o'brien's dog", "obriens dog"),
    ("o'clock", "oclock"),
    ("ma'am", "madam"),
    ("gonna wanna gotta", "going to want to got to"),
    ("Mr. and Mrs. Smith", "mister and missus smith"),
    ("Dr. Jones met St. John", "doctor jones met saint john"),
]

FILLERS = [
    ("uh I um think hmm so", "i think so"),
    ("mm-hmm yes", "yes"),
    ("Um, well, er, fine", "well fine"),
    ("uh", ""),
    ("umbrella hummingbird", "umbrella hummingbird"),  # whole words only
]

NUMBERS = [
    ("twenty five", "25"),
    ("twenty-five", "25"),
    ("Twenty-Five apples", "25 apples"),
    ("one hundred and five", "105"),
    ("two thousand and nineteen", "2019"),
    ("nineteen ninety nine", "1999"),
    ("twenty twenty", "2020"),
    ("eleven hundred", "1100"),
    ("five hundred thousand", "500000"),
    ("one million two hundred thousand", "1200000"),
    ("two million", "2000000"),
    ("2 million", "2000000"),
    ("1.5 billion", "1500000000"),
    ("a hundred men", "100 men"),
    ("a thousand years", "1000 years"),
    ("one two three four", "1234"),
    ("zero", "0"),
    ("three point one four", "3.14"),
    ("twenty first century", "21st century"),
    ("the fourth of july", "the 4th of july"),
    ("one hundredth", "100th"),
    ("in the nineteen sixties", "in the 1960s"),
    ("fifty percent", "50%"),
    ("fifty per cent", "50%"),
    ("one point five percent", "1.5%"),
    ("ten dollars", "$10"),
    ("five cents", "5¢"),
    ("1,000 people", "1000 people"),
    ("1,234,567", "1234567"),
    ("$20", "$20"),
    ("20%", "20%"),
    ("it costs $5.50", "it costs $5.50"),
    ("3.14", "3.14"),
    ("the 1990s and 21st", "the 1990s and 21st"),
    ("10km 5kg", "10 km 5 kg"),
    ("COVID-19", "covid 19"),
    ("one of them", "1 of them"),
    ("oh", "oh"),
]

SPELLING = [
    ("colour flavour favourite", "color flavor favorite"),
    ("honourable behavioural neighbours", "honorable behavioral neighbors"),
    ("realise organisation analysed", "realize organization analyzed"),
    ("recognised apologising", "recognized apologizing"),
    ("centre theatre metres", "center theater meters"),
    ("centred", "centered"),
    ("travelled cancelling", "traveled canceling"),
    ("grey aluminium programme", "gray aluminum program"),
    ("catalogue dialogue defence", "catalog dialog defense"),
    ("jewellery judgement ageing", "jewelry judgment aging"),
    # American spellings and words that only look British stay as they are
    ("color realize center four hour advise surprise exercise", "color realize center 4 hour advise surprise exercise"),
]

MIXED = [
    ("Mr. Smith didn't pay twenty-five dollars for the colour TV, um, OK?",
     "mister smith did not pay $25 for the color tv ok"),
    ("HE HAD TWENTY ONE CHILDREN", "he had 21 children"),
    ("He had 21 children.", "he had 21 children"),
    ("THE CENTRE OF THE CITY IN NINETEEN OH FIVE", "the center of the city in 19 oh 5"),
]


@pytest.mark.parametrize(
    "text, expected", CASE_AND_PUNCTUATION + CONTRACTIONS + FILLERS + NUMBERS + SPELLING + MIXED
)
def test_english_text_normalizer(text, expected):
    assert NORMALIZE(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("twenty five", "25"),
        ("one hundred and five", "105"),
        ("the one and only", "the 1 and only"),
        ("and one", "and 1"),  # "and" joins numbers only after hundred / thousand
        ("hundred and and", "100 and and"),
        ("point five", "point 5"),  # a decimal point needs a number before it
        ("two point", "2 point"),
        ("zero point five", "0 point 5"),
        ("a second time", "a 2nd time"),
        ("a lot", "a lot"),
        ("thousand thousand", "10001000"),
        ("five dollars", "$5"),
        ("5 percent", "5%"),
        ("", ""),
    ],
)
def test_number_normalizer(text, expected):
    assert EnglishNumberNormalizer()(text) == expected


def test_spelling_table_is_british_to_american():
    assert len(BRITISH_TO_AMERICAN) > 500
    for british, american in [("colour", "color"), ("organisation", "organization"), ("theatre", "theater"),
                              ("travelling", "traveling"), ("analyse", "analyze"), ("grey", "gray")]:
        assert BRITISH_TO_AMERICAN[british] == american
    # no American spelling is rewritten, and nothing maps to itself
    assert not set(BRITISH_TO_AMERICAN) & set(BRITISH_TO_AMERICAN.values())
    assert all(k != v for k, v in BRITISH_TO_AMERICAN.items())


def test_spelling_normalizer_custom_table():
    spell = EnglishSpellingNormalizer({"colour": "color"})
    assert spell("the colour grey") == "the color grey"


def test_fillers_can_be_kept():
    assert EnglishTextNormalizer(remove_fillers=False)("uh hello") == "uh hello"


WORDS = ["the", "Colour", "twenty", "five", "hundred", "and", "one", "point", "percent", "dollars", "don't",
         "it's", "Mr.", "uh", "1,000", "3.5", "$5", "first", "sixties", "a", "thousand", "O'Brien's", "café"]
SEPARATORS = [" ", ", ", ". ", "-", "! ", "  "]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=12))
def test_normalizer_output_is_normal(pieces):
    text = "".join(w + s for w, s in pieces)
    out = NORMALIZE(text)
    assert out == out.strip() and "  " not in out
    assert out == out.lower()
    assert not set(out) & set(",!?;:\"'()[]-")
    assert NORMALIZE(out) == out  # normalising twice changes nothing
