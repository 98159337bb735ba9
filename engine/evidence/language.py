"""Caption text as the statistics and coverage scores see it: sentences, tokens, parts of speech.

One tokenizer serves both, so "words" in Table 1 and the nouns the coverage scores look at
are the same units. Tokens follow the Penn Treebank habit of splitting clitics ("man's" →
"man", "'s"); a *word* is a token with a letter or digit in it, clitics excluded (they belong
to their host word), so "the man's hat." has three words.

Parts of speech come from a tagger that works offline: TextBlob's pattern tagger (its lexicon
ships in the wheel) by default, or a spaCy English pipeline when the user has one installed.
Both are mapped to a few coarse classes, following Universal Dependencies: nouns include proper
nouns; verbs exclude auxiliaries (UD's AUX: forms of "be", modals, "have"/"do" as helpers) and
"not" is no adverb (UD's PART); the Penn tags of the pattern tagger do not make these
distinctions, so a small rule does. On the seven example
captions in the paper's appendix this gives 30.3% nouns, 10.6% adjectives, 2.2% adverbs, 11.2%
verbs, 1.1% numerals (the paper's GPT-4V row: 27.9, 10.9, 1.8, 12.0, 0.83); counting
auxiliaries as verbs would give 16%.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from typing import Protocol

from models.errors import ConfigError

NOUN, ADJ, ADV, VERB, NUM, OTHER = "noun", "adjective", "adverb", "verb", "numeral", "other"
POS_CLASSES = (NOUN, ADJ, ADV, VERB, NUM)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})
_CLITIC = re.compile(r"(?i)(\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics, already split off their host
    r"|(?:[a-z]\.){2,}"  # dotted abbreviations: e.g., U.S.A.
    r"|\d+(?:[.,:/]\d+)*%?"  # numbers: 3.5, 1,000, 12:30, 50%
    r"|\w+(?:[-'&]\w+)*"  # words, hyphenated words
    r"|[^\w\s]",  # punctuation, one character each
    re.IGNORECASE,
)
_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})

# A full stop after these does not end a sentence ("e.g. a cat", "Dr. Smith").
_ABBREVIATIONS = frozenset(
    ["e.g", "i.e", "mr", "mrs", "ms", "dr", "st", "vs", "approx", "no", "fig", "ca", "jr", "sr", "prof", "inc", "ltd", "co", "mt"]
)
_DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")  # "p.m", "u.s" once the final dot is stripped
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"')\]]*(?=\s+|$)")


def tokens(text: str) -> list[str]:
    text = _CLITIC.sub(r"\1 \2", text.translate(_APOSTROPHES))
    return _TOKEN.findall(text)


_HAS_ALNUM = re.compile(r"[^\W_]")


def is_word(token: str) -> bool:
    return _HAS_ALNUM.search(token) is not None and token.lower() not in _CLITICS


def words(text: str) -> list[str]:
    return [t for t in tokens(text) if is_word(t)]


def sentences(text: str) -> list[str]:
    """Split at ., ! or ? followed by white space, except after a known abbreviation or an
    initial ("J. Smith") or a dotted abbreviation ("p.m.", "U.S."); a stretch with no letter or digit is not a sentence."""
    found, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        before = text[start : end.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if end.group().startswith(".") and _is_abbreviation(last):
            continue
        found.append(text[start : end.end()].strip())
        start = end.end()
    found.append(text[start:].strip())
    return [s for s in found if _HAS_ALNUM.search(s)]


def _is_abbreviation(word: str) -> bool:
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or bool(_DOTTED.fullmatch(word))


class PosTagger(Protocol):
    name: str

    def classes(self, tokens: list[str]) -> list[str]:
        """One coarse class (``NOUN`` … ``OTHER``) per token, tokens as :func:`tokens` splits them."""


_PENN = {"NN": NOUN, "NNS": NOUN, "NNP": NOUN, "NNPS": NOUN, "JJ": ADJ, "JJR": ADJ, "JJS": ADJ,
         "RB": ADV, "RBR": ADV, "RBS": ADV, "WRB": ADV, "CD": NUM}
_NEGATION = frozenset(("not", "n't"))
_BE = frozenset("be is are was were been being am 's 're 'm".split())
# "have"/"do" are auxiliaries when a verb form follows (adverbs and "not" may come between).
_HELPERS = {"have": ("VBN",), "has": ("VBN",), "had": ("VBN",), "'ve": ("VBN",), "'d": ("VBN",),
            "do": ("VB",), "does": ("VB",), "did": ("VB",)}


def penn_classes(tokens: list[str], tags: list[str]) -> list[str]:
    """Coarse classes from Penn tags, with auxiliaries (UD's AUX) taken out of the verbs."""
    classes = []
    for i, (token, tag) in enumerate(zip(tokens, tags)):
        word = token.lower()
        if tag.startswith("VB") and not (word in _BE or _helps(word, tags[i + 1 : i + 4])):
            classes.append(VERB)
        elif word in _NEGATION:
            classes.append(OTHER)  # UD tags "not" a particle; Penn calls it an adverb
        else:
            classes.append(OTHER if tag.startswith("VB") or tag == "MD" else _PENN.get(tag, OTHER))
    return classes


def _helps(word: str, following: list[str]) -> bool:
    wanted = _HELPERS.get(word)
    if not wanted:
        return False
    for tag in following:
        if tag in wanted:
            return True
        if not tag.startswith("RB"):  # "has not been", "did n't go"; anything else ends the search
            return False
    return False


class PatternPosTagger:
    """TextBlob's port of the pattern tagger: a Brill-style lexicon and rules, offline."""

    name = "pattern"

    def __init__(self):
        from textblob.en import tag

        self._tag = tag

    def penn(self, tokens: list[str]) -> list[str]:
        # Tokens go in already split (tokenize=False): pattern's own tokenizer mangles
        # apostrophes ("It's" → "It", "'", "s"). Spaces inside a token would split it again.
        if not tokens:
            return []
        tagged = self._tag(" ".join(t.replace(" ", "_") for t in tokens), tokenize=False)
        if len(tagged) != len(tokens):  # pattern drops nothing on pre-split input; guard anyway
            raise RuntimeError(f"pattern tagger returned {len(tagged)} tags for {len(tokens)} tokens")
        return [tag for _, tag in tagged]

    def classes(self, tokens: list[str]) -> list[str]:
        return penn_classes(tokens, self.penn(tokens))


_UNIVERSAL = {"NOUN": NOUN, "PROPN": NOUN, "ADJ": ADJ, "ADV": ADV, "VERB": VERB, "NUM": NUM}


class SpacyPosTagger:
    """A spaCy English pipeline the user installed (``spacy.load(model)``); never downloads."""

    def __init__(self, model: str = "en_core_web_sm"):
        import spacy

        self.name = f"spacy:{model}"
        self._nlp = spacy.load(model, exclude=["ner", "parser", "lemmatizer"])

    def classes(self, tokens: list[str]) -> list[str]:
        from spacy.tokens import Doc

        doc = Doc(self._nlp.vocab, words=tokens)
        for _, component in self._nlp.pipeline:
            doc = component(doc)
        return [_UNIVERSAL.get(token.pos_, OTHER) for token in doc]


def check_pos_tagger(name: str) -> None:
    """Fail on a tagger that cannot load, without loading it (config validation stays cheap:
    importing TextBlob alone takes seconds)."""
    if name == "pattern":
        return
    if name == "spacy" or name.startswith("spacy:"):
        model = _spacy_model(name)
        for package in ("spacy", model):
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"POS tagger {name!r} needs spaCy and its English pipeline {model!r} installed "
                    f"({package!r} is not); use 'pattern' for the built-in offline tagger"
                )
        return
    raise ConfigError(f"unknown POS tagger {name!r}: use 'pattern' or 'spacy[:model]'")


def _spacy_model(name: str) -> str:
    return name.partition(":")[2] or "en_core_web_sm"


def pos_tagger(name: str = "pattern") -> PosTagger:
    """``pattern`` or ``spacy[:model]`` (an installed pipeline package; nothing is downloaded)."""
    check_pos_tagger(name)
    return PatternPosTagger() if name == "pattern" else SpacyPosTagger(_spacy_model(name))


def tagged_words(text: str, tagger: PosTagger) -> list[tuple[str, str]]:
    """(word, coarse class) for every word of ``text``; clitics and punctuation are tagged (they
    give the tagger context) and then dropped."""
    toks = tokens(text)
    return [(t, c) for t, c in zip(toks, tagger.classes(toks)) if is_word(t)]


@lru_cache(maxsize=65536)
def noun_forms(word: str) -> frozenset[str]:
    """The forms under which two mentions of a noun count as the same: itself (lower case) and
    its singular. Both sides keep their own form because singularising is lossy ("bus" → "bu",
    "buses" → "bus"): "bus" and "buses" still share "bus"."""
    from textblob.en.inflect import singularize

    word = word.lower()
    return frozenset({word, singularize(word)})
