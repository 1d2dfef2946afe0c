"""The English text normaliser of `phimm eval asr`: Whisper's own, from the package whisper-normalizer.

`CORPUS` holds phimm's default normaliser (`phimm.eval.normalize.EnglishTextNormalizer`, and what `AsrTask` uses
when given none) equal to the package's normaliser called directly, string for string; `WHISPER_BEHAVIOUR` pins
what that normaliser does to the cases that differ from phimm's earlier hand-written one, so that an upgrade of
the package that changes them is noticed.
"""

from __future__ import annotations

import pytest
import whisper_normalizer.english as whisper_english
from hypothesis import given, settings
from hypothesis import strategies as st

from phimm.eval.asr import AsrTask
from phimm.eval.normalize import (
    EnglishNumberNormalizer,
    EnglishSpellingNormalizer,
    EnglishTextNormalizer,
)

WHISPER = whisper_english.EnglishTextNormalizer()  # the package's normaliser, called directly
NORMALIZE = EnglishTextNormalizer()

CARDINALS = [
    "one", "two", "three", "seven", "ten", "eleven", "twelve", "thirteen", "nineteen", "twenty",
    "twenty five", "twenty-five", "Twenty-Five apples", "ninety nine", "one hundred", "a hundred men",
    "one hundred and five", "two hundred thirty four", "eleven hundred", "a thousand years",
    "two thousand and nineteen", "five hundred thousand", "one million two hundred thousand", "two million",
    "2 million", "1.5 billion", "three trillion", "one of them", "the one and only", "ones and twos",
    "zero", "I have two cats and three dogs", "HE HAD TWENTY ONE CHILDREN", "He had 21 children.",
    "thousand thousand", "hundred and and", "a lot of people", "one two three four",
]

ORDINALS = [
    "first", "second", "a second time", "third", "fourth", "the fourth of july", "twenty first century",
    "the twenty-second of may", "one hundredth", "the thousandth visitor", "fifty third street", "1st 2nd 3rd 4th",
    "the 21st of march", "THE THIRTEENTH CHAPTER", "ninety ninth", "second best",
]

DECIMALS = [
    "zero point five", "point five", "two point", "three point one four", "one point five percent",
    "ZERO POINT ZERO ONE", "0.5", "3.14", "it weighs four point two kilos", "nine point nine nine",
    "the point is five", "twenty point five",
]

YEARS_AND_DIGITS = [
    "nineteen ninety nine", "twenty twenty", "two thousand and five", "in the nineteen sixties",
    "the 1990s and 21st", "in eighteen forty eight", "nineteen oh five", "oh five", "oh my god", "oh, I see",
    "Oh no", "call five five five oh one two three", "five five five, one two three four", "555-1234",
    "(555) 123-4567", "one oh one", "room four oh four", "double o seven", "seven seven seven", "zero zero seven",
    "1,000 people", "1,234,567", "10,000", "the year 2001", "June 5th, 1999", "at 5:30 pm", "10km 5kg",
    "COVID-19", "mp3", "4x4", "the 80s", "the eighties", "route sixty six",
]

CURRENCIES = [
    "$5", "$20", "$5.50", "it costs $5.50", "$1,000", "$20 million", "five dollars", "ten dollars",
    "one dollar", "a dollar", "twenty five dollars", "five dollars and ten cents", "five cents", "50 cents",
    "one cent", "£3.50", "£3", "three pounds fifty", "ten pounds", "€20", "twenty euros", "€1.99",
    "fifty cents", "$0.50", "¢5", "5¢", "a hundred dollars", "two hundred dollars and fifty cents",
    "$2 and ¢7", "US$5", "price: $ 5", "five bucks",
]

PERCENT_AND_SYMBOLS = [
    "fifty percent", "fifty per cent", "5 percent", "20%", "100 %", "a 3.5% rise", "% of it", "Q&A session",
    "rock & roll", "AT&T", "a/b testing", "email@example.com", "#hashtag", "5 + 3 = 8", "C++", "50/50",
    "10°C", "©2024", "temp: -5", "* note *", "~approximately", "under_score",
]

CONTRACTIONS = [
    "I won't go", "won't", "can't", "you can't stop", "you cannot stop", "shan't", "ain't", "let's go",
    "y'all", "Y'ALL COME BACK", "wanna", "gonna wanna gotta", "kinda sorta", "dunno", "i'ma", "imma",
    "woulda coulda shoulda", "'cause I said so", "the cause of it", "ma'am", "o'clock", "o'brien's dog",
    "they're here and we've seen it", "I'm sure she'll know", "he'd like that", "I'd been there",
    "It's been a while since he'd been there", "he's gone", "she's done", "it's got legs", "that's it", "it's",
    "it's fine", "it’s fine", "It's   OK...", "the dog's bone", "John's book", "johns book", "wasn't",
    "didn't", "DON'T DO THAT", "I'LL BE THERE", "you'd", "we'll", "should've", "'t", "rock 'n' roll",
]

TITLES = [
    "Mr. Smith", "mr smith", "MR. SMITH", "Mrs. Smith", "Mr. and Mrs. Smith", "Ms. Smith", "Dr. Jones",
    "Dr. Jones met St. John", "St. Paul", "the st. lawrence", "Prof. Brown", "Capt. Hook", "Gov. Davis",
    "Gen. Lee", "Sen. Warren", "Rep. Ocasio-Cortez", "Pres. Lincoln", "Rev. King", "Hon. member",
    "Lt. Dan", "Col. Mustard", "John Smith Jr.", "John Smith Sr.", "Esq.", "Asst. manager", "Ald. Brown",
]

BRITISH = [
    "colour", "flavour favourite", "honourable behavioural neighbours", "organise", "realise organisation analysed",
    "recognised apologising", "centre", "centre theatre metres", "centred", "travelled cancelling",
    "grey aluminium programme", "catalogue dialogue defence", "jewellery judgement ageing", "THE COLOUR RED",
    "color realize center four hour advise surprise exercise", "licence", "practise", "tyre", "cheque",
    "mould", "plough", "sceptical", "manoeuvre", "paediatric", "oestrogen",
]

LIBRISPEECH = [
    "CHAPTER ONE", "CHAPTER TWENTY THREE", "CHAPTER XII", "HE SAID THAT HE WOULD COME",
    "HE SAID THAT HIS FATHER HAD GONE TO LONDON IN EIGHTEEN FIFTY",
    "THE CENTRE OF THE CITY IN NINETEEN OH FIVE", "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES",
    "NOR IS MISTER QUILTER'S MANNER LESS INTERESTING THAN HIS MATTER",
    "SHE WAS FOUR AND TWENTY YEARS OLD", "IT WAS THE FIRST OF MAY", "I DON'T KNOW SAID ALICE",
    "HE HAD A HUNDRED AND FIFTY POUNDS A YEAR", "THE O'NEILLS CAME AT TEN O'CLOCK",
    "SAINT JOHN'S WOOD", "AT HALF PAST TWO", "ONE OF THE TWO",
]

PUNCTUATION_AND_SPACING = [
    "HELLO World", "  spaced   out\ttext \n", "Hello, world! How are you?", "well-known state-of-the-art",
    "the end.", "e.g. this", "i.e., that", "U.S.A.", 'He said: "Stop!"', "wait... what?", "yes; no: maybe",
    "it's — well — fine", "(parenthetical) remark", "[laughter] hello (inaudible) there <noise>", "{noise} hi",
    "café naïve résumé", "straße œuvre", "Ångström", "", "   ", "...", "!!!", "a -- b", "self-driving cars",
    "x-ray", "twenty-one-year-old", "uh I um think hmm so", "mm-hmm yes", "Um, well, er, fine", "uh",
    "umbrella hummingbird", "hmm... mhm", "‘quoted’ “double”", "tab\tand\nnewline",
]

MIXED = [
    "Mr. Smith didn't pay twenty-five dollars for the colour TV, um, OK?",
    "Dr. O'Brien's organisation spent $3.5 million in nineteen ninety nine.",
    "It's 50% off -- that's five dollars, not ten!",
    "Ms. Jones won't travel to St. Louis until the twenty first.",
    "WE'LL MEET AT THE THEATRE AT HALF PAST SEVEN",
    "She paid £3.50 for a grey jumper; he paid $4.",
    "The temperature rose by two point five degrees in the nineteen eighties.",
    "Call me at five five five, oh one two three, OK?",
]

CORPUS = (CARDINALS + ORDINALS + DECIMALS + YEARS_AND_DIGITS + CURRENCIES + PERCENT_AND_SYMBOLS + CONTRACTIONS
          + TITLES + BRITISH + LIBRISPEECH + PUNCTUATION_AND_SPACING + MIXED)


def test_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 200
    assert len(set(CORPUS)) == len(CORPUS)
    # and it exercises the normaliser: most strings change
    assert sum(WHISPER(s) != s for s in CORPUS) > len(CORPUS) // 2


def test_default_normalizer_is_the_package():
    default = AsrTask().normalizer
    diverging = [(s, WHISPER(s), NORMALIZE(s), default(s)) for s in CORPUS
                 if not WHISPER(s) == NORMALIZE(s) == default(s)]
    assert not diverging, diverging


@pytest.mark.parametrize("text", CORPUS)
def test_normalizer_equals_package(text):
    assert NORMALIZE(text) == WHISPER(text)


@pytest.mark.parametrize("text", [
    "twenty five", "zero point five", "one hundred and five", "oh five", "five dollars", "fifty percent",
    "the fourth of july", "nineteen ninety nine", "one", "a lot", "",
])
def test_number_normalizer_equals_package(text):
    assert EnglishNumberNormalizer()(text) == whisper_english.EnglishNumberNormalizer()(text)


@pytest.mark.parametrize("text", ["colour", "the colour grey", "organise centre", "travelled", "color", ""])
def test_spelling_normalizer_equals_package(text):
    assert EnglishSpellingNormalizer()(text) == whisper_english.EnglishSpellingNormalizer()(text)


# What Whisper's normaliser does, literally (where phimm's earlier hand-written one differed, and a few anchors).
WHISPER_BEHAVIOUR = [
    ("zero point five", "0.5"),
    ("oh five", "05"),
    ("nineteen oh five", "1905"),
    ("CHAPTER ONE", "chapter one"),  # "1" is written back as "one"
    ("one of them", "one of them"),
    ("Ms. Smith", "ms smith"),
    ("Mr. and Mrs. Smith", "mister and missus smith"),
    ("Dr. Jones met St. John", "doctor jones met saint john"),
    ("Col. Mustard", "colonel mustard"),
    ("John's book", "john is book"),  # every 's is "is"
    ("the cause of it", "the because of it"),
    ("you cannot stop", "you cannot stop"),
    ("I won't go", "i will not go"),
    ("y'all", "you all"),
    ("It's been a while since he'd been there", "it has been a while since he had been there"),
    ("Um, well, er, fine", "well er fine"),  # hesitations: hmm mm mhm mmm uh um
    ("[laughter] hello (inaudible) there <noise>", "hello there"),
    ("five dollars and ten cents", "$5.10"),
    ("50 cents", "¢50"),
    ("£3.50", "£3.50"),
    ("fifty percent", "50%"),
    ("twenty first century", "21st century"),
    ("1,000 people", "1000 people"),
    ("colour organise centre", "color organize center"),
    ("Mr. Smith didn't pay twenty-five dollars for the colour TV, um, OK?",
     "mister smith did not pay $25 for the color tv ok"),
]


@pytest.mark.parametrize("text, expected", WHISPER_BEHAVIOUR)
def test_whisper_behaviour(text, expected):
    assert " ".join(NORMALIZE(text).split()) == expected


WORDS = ["the", "Colour", "twenty", "five", "hundred", "and", "one", "point", "percent", "dollars", "don't",
         "it's", "Mr.", "uh", "1,000", "3.5", "$5", "first", "sixties", "a", "thousand", "O'Brien's", "café",
         "oh", "zero", "cents", "£", "%", "&", "CHAPTER"]
SEPARATORS = [" ", ", ", ". ", "-", "! ", "  "]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=12))
def test_normalizer_equals_package_on_random_text(pieces):
    text = "".join(w + s for w, s in pieces)
    assert NORMALIZE(text) == WHISPER(text)
