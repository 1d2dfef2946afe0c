"""English text normalisation for word error rates, in the style of Whisper's `EnglishTextNormalizer`.

Published ASR numbers (the Open ASR leaderboard, the Whisper and Phi-4-multimodal papers) are word error rates after
such a normaliser: lower case, no punctuation, numbers written as digits, one spelling per word, contractions
expanded and hesitations dropped, so that a model is not charged for writing "Mr. Smith paid $25" where the
reference says "MISTER SMITH PAID TWENTY FIVE DOLLARS".

`EnglishTextNormalizer()(text)` does, in order:

1. lower case; curly quotes and backticks become plain apostrophes;
2. drops spans in brackets (`[noise]`, `(laughs)`, `<unk>`) and hesitations (`uh`, `um`, `hmm`, ...);
3. expands contractions (`won't` -> `will not`, `they're` -> `they are`, `it's` -> `it is`, `gonna` ->
   `going to`) and titles (`mr` -> `mister`, `dr` -> `doctor`); a possessive `'s` loses its apostrophe;
4. removes punctuation and symbols (diacritics too: `café` -> `cafe`), keeping `$ £ € ¢ %` and a decimal point
   between digits; `1,000` -> `1000`; letters and digits written together are split (`10km` -> `10 km`) except
   ordinals and decades (`21st`, `1990s`);
5. writes numbers as digits (`EnglishNumberNormalizer`): `twenty five` -> `25`, `one hundred and five` -> `105`,
   `nineteen ninety nine` -> `1999`, `three point one four` -> `3.14`, `twenty first` -> `21st`,
   `fifty percent` -> `50%`, `five dollars` -> `$5`;
6. one spelling per word (`EnglishSpellingNormalizer`): British to American (`colour` -> `color`, `realise` ->
   `realize`, `centre` -> `center`, `travelled` -> `traveled`, ...);
7. collapses whitespace.

Each step is applied to reference and hypothesis alike, so a choice that is arbitrary (`one` -> `1`) costs nothing.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "EnglishTextNormalizer",
    "EnglishNumberNormalizer",
    "EnglishSpellingNormalizer",
    "BRITISH_TO_AMERICAN",
    "FILLER_WORDS",
]

# --------------------------------------------------------------------------------------------------------------
# spelling: British -> American
# --------------------------------------------------------------------------------------------------------------


def _expand(stems: str, british: str, american: str, endings: str) -> dict[str, str]:
    """For each stem and ending: stem + british + ending -> stem + american + ending."""
    return {
        stem + british + ending: stem + american + ending
        for stem in stems.split()
        for ending in [""] + endings.split()
    }


def _spelling_table() -> dict[str, str]:
    table: dict[str, str] = {}
    # colour -> color, favourite -> favorite, behavioural -> behavioral
    table.update(_expand(
        "col flav fav hon hum lab neighb rum sav vap harb behavi endeav arm od parl rig vig splend cand clam "
        "val tum savi ferv ard ranc",
        "our", "or",
        "s ed ing ful fully less able ably ite ites er ers al ally ist ists hood hoods ly y ous",
    ))
    # centre -> center (centred, centring below)
    table.update(_expand(
        "cent theat met lit fib calib sab somb spect lust meag scept kilomet centimet millimet mit goit nit "
        "saltpet louv",
        "re", "er",
        "s",
    ))
    table.update({"centred": "centered", "centring": "centering", "metred": "metered", "fibred": "fibered",
                  "sombrely": "somberly", "manoeuvre": "maneuver", "manoeuvres": "maneuvers",
                  "manoeuvred": "maneuvered", "manoeuvring": "maneuvering", "manoeuvrable": "maneuverable",
                  "ochre": "ocher"})
    # realise -> realize, organisation -> organization
    ize_stems = (
        "real organ recogn apolog critic emphas memor special summar sympath util civil character author "
        "familiar final priorit modern minim maxim normal standard visual mobil legal ideal harmon colon "
        "agon patron scrutin fertil jeopard categor capital central energ hypnot neutral symbol econom "
        "tranquil immun industrial stabil steril subsid synchron terror vandal vocal ostrac polar popular "
        "public revital sanit satir computer custom dramat fantas fossil glamor global human hospital "
        "initial item liberal local magnet marginal material moral nation natural optim personal plagiar "
        "pressur privat radical random vapor demon"
    )
    table.update(_expand(ize_stems, "ise", "ize", "s d r rs"))
    table.update(_expand(ize_stems, "is", "iz", "ing ation ations able"))
    # analyse -> analyze
    table.update(_expand("anal paral catal breathal hydrol electrol dial", "yse", "yze", "s d r rs"))
    table.update(_expand("anal paral catal breathal hydrol electrol dial", "ys", "yz", "ing"))
    # catalogue -> catalog
    table.update(_expand("catal anal dial monol prol epil", "ogue", "og", "s"))
    table.update({"catalogued": "cataloged", "cataloguing": "cataloging"})
    # defence -> defense
    table.update({"defence": "defense", "defences": "defenses", "offence": "offense", "offences": "offenses",
                  "licence": "license", "licences": "licenses", "pretence": "pretense", "pretences": "pretenses"})
    # travelled -> traveled: a final l doubled before -ed, -ing, -er
    table.update(_expand(
        "trave cance labe leve mode signa fue marve counse quarre tota tunne channe dia equa funne grove jewe "
        "libe pane peda riva shove snorke swive towe trowe unrave yode beve chise disheve drive due ename "
        "grave hove initia kenne reve spira",
        "ll", "l",
        "ed ing er ers",
    ))
    for key in [k for k in table if k.endswith("ll") and table[k].endswith("l") and not table[k].endswith("ll")]:
        del table[key]  # the bare stems ("travell") are not words
    table.update({"marvellous": "marvelous", "marvellously": "marvelously", "jewellery": "jewelry",
                  "woollen": "woolen", "woollens": "woolens", "counsellor": "counselor", "counsellors": "counselors",
                  "enrolment": "enrollment", "enrolments": "enrollments", "fulfil": "fulfill", "fulfils": "fulfills",
                  "fulfilment": "fulfillment", "skilful": "skillful", "skilfully": "skillfully", "wilful": "willful",
                  "wilfully": "willfully", "instalment": "installment", "instalments": "installments",
                  "distil": "distill", "distils": "distills", "enthral": "enthrall", "enthrals": "enthralls",
                  "instil": "instill", "instils": "instills"})
    # one by one
    table.update({
        "grey": "gray", "greys": "grays", "greyer": "grayer", "greyest": "grayest", "greyish": "grayish",
        "aluminium": "aluminum", "cheque": "check", "cheques": "checks", "chequebook": "checkbook", "tyre": "tire",
        "tyres": "tires", "plough": "plow", "ploughs": "plows", "ploughed": "plowed", "ploughing": "plowing",
        "ploughman": "plowman", "programme": "program", "programmes": "programs", "mould": "mold",
        "moulds": "molds", "moulded": "molded", "mouldy": "moldy", "moult": "molt", "moulting": "molting",
        "smoulder": "smolder", "smouldering": "smoldering", "moustache": "mustache", "moustaches": "mustaches",
        "sceptic": "skeptic", "sceptics": "skeptics", "sceptical": "skeptical", "scepticism": "skepticism",
        "pyjamas": "pajamas", "draught": "draft", "draughts": "drafts", "draughty": "drafty", "kerb": "curb",
        "kerbs": "curbs", "storey": "story", "storeys": "stories", "storeyed": "storied", "gaol": "jail",
        "gaols": "jails", "gaoler": "jailer", "aeroplane": "airplane", "aeroplanes": "airplanes",
        "paediatric": "pediatric", "paediatrician": "pediatrician", "encyclopaedia": "encyclopedia",
        "encyclopaedias": "encyclopedias", "anaemia": "anemia", "anaemic": "anemic", "anaesthetic": "anesthetic",
        "anaesthesia": "anesthesia", "oestrogen": "estrogen", "foetus": "fetus", "foetal": "fetal",
        "haemorrhage": "hemorrhage", "haemoglobin": "hemoglobin", "mediaeval": "medieval", "ageing": "aging",
        "judgement": "judgment", "judgements": "judgments", "acknowledgement": "acknowledgment",
        "acknowledgements": "acknowledgments", "artefact": "artifact", "artefacts": "artifacts", "cosy": "cozy",
        "cosier": "cozier", "cosiest": "coziest", "cosiness": "coziness", "practise": "practice",
        "practised": "practiced", "practises": "practices", "practising": "practicing", "annexe": "annex",
        "sulphur": "sulfur", "sulphate": "sulfate", "yoghurt": "yogurt", "whilst": "while", "amongst": "among",
        "doughnut": "donut", "doughnuts": "donuts", "pedlar": "peddler", "speciality": "specialty",
        "specialities": "specialties", "tonne": "ton", "tonnes": "tons", "behove": "behoove", "mum": "mom",
        "mums": "moms", "oedema": "edema", "orthopaedic": "orthopedic", "palaeontology": "paleontology",
        "leukaemia": "leukemia", "diarrhoea": "diarrhea", "oesophagus": "esophagus",
        "manoeuvrability": "maneuverability", "waggon": "wagon", "waggons": "wagons", "gramme": "gram",
        "grammes": "grams", "kilogramme": "kilogram", "kilogrammes": "kilograms",
    })
    return {k: v for k, v in table.items() if k != v}


BRITISH_TO_AMERICAN: dict[str, str] = _spelling_table()


class EnglishSpellingNormalizer:
    """Maps British spellings to American ones, word by word (`BRITISH_TO_AMERICAN`, or a table you pass)."""

    def __init__(self, table: dict[str, str] | None = None):
        self.table = dict(BRITISH_TO_AMERICAN if table is None else table)

    def __call__(self, text: str) -> str:
        return " ".join(self.table.get(word, word) for word in text.split())


# --------------------------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------------------------

_ONES = {w: i for i, w in enumerate("one two three four five six seven eight nine".split(), start=1)}
_TEENS = {w: i for i, w in enumerate(
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split(), start=10)}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}

_ORDINAL_ONES = {w: i for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth".split(), start=1)}
_ORDINAL_TEENS = {w: i for i, w in enumerate(
    "tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth".split(),
    start=10)}
_ORDINAL_TENS = {w: 10 * i for i, w in enumerate(
    "twentieth thirtieth fortieth fiftieth sixtieth seventieth eightieth ninetieth".split(), start=2)}
_ORDINAL_SCALES = {"thousandth": 10**3, "millionth": 10**6, "billionth": 10**9, "trillionth": 10**12}
_PLURAL_TENS = {w: 10 * i for i, w in enumerate(
    "twenties thirties forties fifties sixties seventies eighties nineties".split(), start=2)}

# a word -> (kind, value, suffix); suffix "" for cardinals, "st"/"nd"/"rd"/"th" for ordinals, "s" for decades
_NUMBER_WORDS: dict[str, tuple[str, int, str]] = {"zero": ("zero", 0, ""), "hundred": ("hundred", 100, "")}
_NUMBER_WORDS.update({w: ("ones", v, "") for w, v in _ONES.items()})
_NUMBER_WORDS.update({w: ("teens", v, "") for w, v in _TEENS.items()})
_NUMBER_WORDS.update({w: ("tens", v, "") for w, v in _TENS.items()})
_NUMBER_WORDS.update({w: ("scale", v, "") for w, v in _SCALES.items()})
_NUMBER_WORDS.update({w: ("ones", v, "ord") for w, v in _ORDINAL_ONES.items()})
_NUMBER_WORDS.update({w: ("teens", v, "ord") for w, v in _ORDINAL_TEENS.items()})
_NUMBER_WORDS.update({w: ("tens", v, "ord") for w, v in _ORDINAL_TENS.items()})
_NUMBER_WORDS.update({w: ("scale", v, "ord") for w, v in _ORDINAL_SCALES.items()})
_NUMBER_WORDS["hundredth"] = ("hundred", 100, "ord")
_NUMBER_WORDS.update({w: ("tens", v, "s") for w, v in _PLURAL_TENS.items()})

_CURRENCY_BEFORE = {"dollar": "$", "dollars": "$", "pound": "£", "pounds": "£", "euro": "€", "euros": "€"}
_CURRENCY_AFTER = {"cent": "¢", "cents": "¢"}
_DIGITS_RE = re.compile(r"\d+(?:\.\d+)?")


def _ordinal_suffix(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


class _Run:
    """Reads one run of number words into digits.

    A run is cut into chunks, each an ordinary cardinal ("two thousand and five"); a word that cannot extend the
    current chunk starts the next one, and the chunks' digits are written side by side, so that digit
    sequences and years come out as they are read: "one two three" -> "123", "nineteen ninety nine" -> "1999",
    "twenty twenty" -> "2020".
    """

    def __init__(self):
        self.chunks: list[str] = []
        self.total = 0  # the part of the current chunk above the last scale word
        self.group = 0  # the current chunk's part below a thousand
        self.last: str | None = None  # kind of the last word in the current chunk
        self.last_scale: int | None = None
        self.decimals: str | None = None

    @property
    def empty(self) -> bool:
        return not self.chunks and self.last is None

    def flush(self) -> None:
        if self.last is not None:
            text = str(self.total + self.group)
            if self.decimals is not None:
                text += "." + self.decimals
            self.chunks.append(text)
        self.total = self.group = 0
        self.last = self.last_scale = None
        self.decimals = None

    def can_take(self, kind: str, value: int) -> bool:
        last = self.last
        if last is None:
            return True
        if self.decimals is not None:
            return False
        if kind == "ones":
            return last in ("tens", "hundred", "scale")
        if kind in ("teens", "tens"):
            return last in ("hundred", "scale")
        if kind == "hundred":
            return last in ("ones", "teens", "tens") and self.group < 100
        if kind == "scale":
            return last in ("ones", "teens", "tens", "hundred") and (self.last_scale is None or value < self.last_scale)
        return False  # zero

    def add(self, kind: str, value: int) -> None:
        if not self.can_take(kind, value):
            self.flush()
        if kind == "zero":
            self.last = "zero"
            self.flush()
            return
        if kind in ("ones", "teens", "tens"):
            self.group = self.group + value if self.last in ("tens", "hundred") else value
        elif kind == "hundred":
            self.group = (self.group or 1) * 100
        elif kind == "scale":
            self.total += (self.group or 1) * value
            self.group = 0
            self.last_scale = value
        self.last = kind

    def add_decimal_digit(self, digit: int) -> None:
        self.decimals = (self.decimals or "") + str(digit)

    def text(self) -> str:
        self.flush()
        return "".join(self.chunks)


class EnglishNumberNormalizer:
    """Writes spelled-out English numbers as digits, in a text that is already lower case without punctuation.

    Cardinals ("two hundred and five" -> "205"), digit sequences and years ("one two three" -> "123",
    "nineteen ninety nine" -> "1999"), decimals ("three point one four" -> "3.14"), ordinals ("twenty first" ->
    "21st", "fourth" -> "4th"), decades ("the nineteen sixties" -> "the 1960s"), "a hundred"/"a thousand",
    digits with a scale word ("2 million" -> "2000000"), percentages ("fifty percent" -> "50%") and currencies
    ("five dollars" -> "$5", "ten cents" -> "10¢").
    """

    def __call__(self, text: str) -> str:
        words = text.split()
        out: list[str] = []
        i = 0
        while i < len(words):
            number, i = self._read_number(words, i)
            if number is None:
                out.append(words[i])
                i += 1
                continue
            if number[-1].isdigit():
                number, i = self._read_unit(number, words, i)
            out.append(number)
        return " ".join(out)

    @staticmethod
    def _read_unit(number: str, words: list[str], i: int) -> tuple[str, int]:
        """A percent or currency word after a number: "50 percent" -> "50%", "5 dollars" -> "$5"."""
        word = words[i] if i < len(words) else None
        if word == "percent":
            return number + "%", i + 1
        if word == "per" and i + 1 < len(words) and words[i + 1] == "cent":
            return number + "%", i + 2
        if word in _CURRENCY_BEFORE:
            return _CURRENCY_BEFORE[word] + number, i + 1
        if word in _CURRENCY_AFTER:
            return number + _CURRENCY_AFTER[word], i + 1
        return number, i

    @staticmethod
    def _read_number(words: list[str], i: int) -> tuple[str | None, int]:
        """The number starting at words[i] and the index after it, or (None, i) if there is none."""
        n = len(words)
        word = words[i]
        if _DIGITS_RE.fullmatch(word):
            # digits, possibly with a scale word: "2 million" -> "2000000", "1.5 billion" -> "1500000000"
            if i + 1 < n and words[i + 1] in _SCALES:
                scaled = float(word) * _SCALES[words[i + 1]]
                if scaled == int(scaled):
                    return str(int(scaled)), i + 2
            return word, i + 1
        run = _Run()
        suffix = ""
        if word == "a" and i + 1 < n and words[i + 1] in ("hundred", "thousand", "million", "billion", "trillion"):
            run.add("ones", 1)  # "a hundred", "a thousand"
            i += 1
        while i < n:
            word = words[i]
            entry = _NUMBER_WORDS.get(word)
            if entry is not None:
                kind, value, tag = entry
                run.add(kind, value)
                i += 1
                if tag:  # an ordinal or a decade ends the number
                    suffix = "s" if tag == "s" else _ordinal_suffix(run.total + run.group)
                    break
                continue
            if run.empty:
                break
            nxt = _NUMBER_WORDS.get(words[i + 1]) if i + 1 < n else None
            if word == "and" and run.last in ("hundred", "scale") and nxt is not None \
                    and nxt[0] in ("ones", "teens", "tens"):
                i += 1  # "one hundred and five"
                continue
            if word == "point" and run.last not in (None, "zero") and nxt is not None \
                    and nxt[0] in ("ones", "zero") and not nxt[2]:
                i += 1  # "three point one four"
                while i < n and _NUMBER_WORDS.get(words[i], ("", 0, "x"))[0] in ("ones", "zero") \
                        and not _NUMBER_WORDS[words[i]][2]:
                    run.add_decimal_digit(_NUMBER_WORDS[words[i]][1])
                    i += 1
            break
        if run.empty:
            return None, i
        return run.text() + suffix, i


# --------------------------------------------------------------------------------------------------------------
# the whole normaliser
# --------------------------------------------------------------------------------------------------------------

FILLER_WORDS = ("uh", "uhm", "um", "umm", "hmm", "hm", "mm", "mmm", "mhm", "er", "erm")

# whole-word replacements, applied in order, after lower-casing and apostrophe standardisation
_WORD_REPLACEMENTS: list[tuple[str, str]] = [
    # irregular contractions first
    (r"\bwon't\b", "will not"),
    (r"\bcan't\b", "can not"),
    (r"\bcannot\b", "can not"),
    (r"\bshan't\b", "shall not"),
    (r"\bain't\b", "aint"),
    (r"\blet's\b", "let us"),
    (r"\by'all\b", "you all"),
    (r"\bma'am\b", "madam"),
    (r"\bo'clock\b", "oclock"),
    (r"(?<!\w)'cause\b", "because"),
    (r"\bi'ma\b", "i am going to"),
    # informal
    (r"\bwanna\b", "want to"),
    (r"\bgonna\b", "going to"),
    (r"\bgotta\b", "got to"),
    (r"\bgimme\b", "give me"),
    (r"\blemme\b", "let me"),
    (r"\bkinda\b", "kind of"),
    (r"\bsorta\b", "sort of"),
    (r"\boutta\b", "out of"),
    (r"\bwoulda\b", "would have"),
    (r"\bcoulda\b", "could have"),
    (r"\bshoulda\b", "should have"),
    # titles
    (r"\bmr\b\.?", "mister "),
    (r"\bmrs\b\.?", "missus "),
    (r"\bms\b\.?", "miss "),
    (r"\bdr\b\.?", "doctor "),
    (r"\bprof\b\.?", "professor "),
    (r"\bst\b\.?", "saint "),
    (r"\bjr\b\.?", "junior "),
    (r"\bsr\b\.?", "senior "),
    (r"\bcapt\b\.?", "captain "),
    (r"\bgov\b\.?", "governor "),
    (r"\blt\b\.?", "lieutenant "),
    (r"\bsgt\b\.?", "sergeant "),
    (r"\brev\b\.?", "reverend "),
    # perfect tenses: "'d been" is "had been", "he's been" is "he has been"
    (r"'d (been|gone|got|had|done|better)\b", r" had \1"),
    (r"\b(it|he|she|that|there|here|what|where|who|how|when|why|this|everyone|everybody|nobody|someone|somebody)"
     r"'s (been|got|gone|had|done)\b", r"\1 has \2"),
    (r"\b(it|he|she|that|there|here|what|where|who|how|when|why|this|everyone|everybody|nobody|someone|somebody)"
     r"'s\b", r"\1 is"),
    # regular contractions
    (r"n't\b", " not"),
    (r"'re\b", " are"),
    (r"'ve\b", " have"),
    (r"'ll\b", " will"),
    (r"'m\b", " am"),
    (r"'d\b", " would"),
]
_WORD_REPLACEMENTS_RE = [(re.compile(pattern), repl) for pattern, repl in _WORD_REPLACEMENTS]

_LETTER_MAP = {"œ": "oe", "æ": "ae", "ø": "o", "ß": "ss", "đ": "d", "ð": "d", "þ": "th", "ł": "l", "ı": "i"}
_KEEP_SYMBOLS = set("$£€¢%'.")

_BRACKETS_RE = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|\{[^}]*\}")
_FILLERS_RE = re.compile(r"\b(?:" + "|".join(FILLER_WORDS) + r")\b")
_APOSTROPHES_RE = re.compile(r"[’‘`´′ʼ]")
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_LETTER_DIGIT_RE = re.compile(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])")
_ORDINAL_OR_DECADE_RE = re.compile(r"^\d+(st|nd|rd|th|s)$")


def _strip_symbols(text: str) -> str:
    """Removes diacritics; every punctuation or symbol character outside `_KEEP_SYMBOLS` becomes a space."""
    out = []
    for char in unicodedata.normalize("NFKD", text):
        if char in _KEEP_SYMBOLS:
            out.append(char)
        elif char in _LETTER_MAP:
            out.append(_LETTER_MAP[char])
        else:
            category = unicodedata.category(char)
            if category == "Mn":
                continue
            out.append(" " if category[0] in "MSPCZ" else char)
    return "".join(out)


def _split_letters_digits(word: str) -> str:
    if _ORDINAL_OR_DECADE_RE.match(word):
        return word
    return _LETTER_DIGIT_RE.sub(" ", word)


class EnglishTextNormalizer:
    """Normalises English text for WER and CER (see the module docstring for what it does, step by step).

    >>> EnglishTextNormalizer()("Mr. Smith didn't pay twenty-five dollars for the colour TV, um, OK?")
    'mister smith did not pay $25 for the color tv ok'
    """

    def __init__(self, spelling: dict[str, str] | None = None, remove_fillers: bool = True):
        self.numbers = EnglishNumberNormalizer()
        self.spelling = EnglishSpellingNormalizer(spelling)
        self.remove_fillers = remove_fillers

    def __call__(self, text: str) -> str:
        s = text.lower()
        s = _APOSTROPHES_RE.sub("'", s)
        s = _BRACKETS_RE.sub(" ", s)
        if self.remove_fillers:
            s = _FILLERS_RE.sub(" ", s)
        for pattern, repl in _WORD_REPLACEMENTS_RE:
            s = pattern.sub(repl, s)
        s = _DIGIT_COMMA_RE.sub("", s)
        s = _strip_symbols(s)
        # a period stays only as a decimal point; an apostrophe left over (possessive, o'brien) joins its word
        s = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", s)
        s = s.replace("'", "")
        # currency signs go right before their number, percent and cent signs right after it; alone, they go
        s = re.sub(r"([$£€])\s*(?=\d)", r" \1", s)
        s = re.sub(r"(?<=\d)\s*([%¢])", r"\1 ", s)
        s = re.sub(r"[$£€](?!\d)|(?<![\d])[%¢]", " ", s)
        s = " ".join(_split_letters_digits(w) for w in s.split())
        s = self.numbers(s)
        s = self.spelling(s)
        return " ".join(s.split())
