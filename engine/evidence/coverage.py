"""Evidence coverage: how much of what the vision experts found reached the caption.

Perceptual fusion works when the caption engine uses its evidence. Per caption:

- ``cov_ocr_lines``: share of OCR lines the caption reproduces verbatim (case, punctuation and
  spacing ignored).
- ``cov_ocr_tokens``: share of the distinct OCR words (letters/digits) found among the
  caption's words; partial credit for a line the caption quotes in part.
- ``cov_box_labels``: share of the distinct detection labels on the record (the fused boxes)
  that the caption names.
- ``cov_tags``: share of the distinct tags that the caption names.
- ``unseen_nouns``: how many distinct nouns the caption uses for things no expert reported,
  and ``unseen_noun_share``: those over all distinct nouns of the caption that name things.
  A noun counts as *seen* when it matches a word of any tag or box label (or a synonym of
  one), or a word the OCR read; nouns that describe the picture rather than name an object
  ("image", "background", "left", "color", …) are not counted at all.

A name matches when the caption contains the label's words in order, each word in the same
form or the same noun in singular/plural ("dog" ~ "dogs", "bus" ~ "buses"), or one of the
label's synonyms from a small hand-kept table. A score whose denominator is zero (no OCR, no
boxes, no tags, no object nouns) is left out rather than set to 0 or 1.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from engine.evidence.language import NOUN, PosTagger, noun_forms, tagged_words, words

# Deliberately small: common names of the same thing in detector/tagger vocabularies
# (COCO, LVIS, RAM++) and in captions. Each group is one meaning.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children",
     "kid", "lady", "gentleman", "guy", "human", "individual", "figure"),
    ("car", "automobile", "sedan"),
    ("bicycle", "bike"),
    ("motorcycle", "motorbike"),
    ("airplane", "aeroplane", "plane", "aircraft", "jet"),
    ("television", "tv"),
    ("cell phone", "phone", "smartphone", "mobile phone", "cellphone"),
    ("couch", "sofa"),
    ("laptop", "notebook computer"),
    ("cup", "mug"),
    ("hat", "cap"),
    ("rock", "stone"),
    ("sea", "ocean"),
    ("road", "street"),
    ("dog", "puppy"),
    ("cat", "kitten"),
    ("shirt", "t-shirt", "tee"),
    ("pants", "trousers", "jeans"),
    ("handbag", "bag", "purse"),
    ("sign", "signboard", "signage"),
    ("text", "writing", "lettering", "words"),
    ("picture", "photo", "photograph"),
    ("flower", "blossom", "bloom"),
    ("table", "desk"),
    ("hill", "mountain"),
)

# Nouns that describe the picture or a place in it rather than name an object.
DESCRIPTIVE_NOUNS = frozenset(
    """image picture photo photograph scene view shot frame composition background foreground
    left right top bottom center centre middle side corner edge front back part area section
    portion half color colour shade tone hue shape size style design pattern texture detail
    details atmosphere mood setting overall appearance lighting light shadow focus depth
    perspective angle element elements feature features object objects item items thing things
    variety number lot kind type sense space surface line lines arrangement contrast palette
    theme aspect way one""".split()
)

_NON_ALNUM = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower case, punctuation and runs of spaces collapsed to one space."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


_SYNONYMS = {normalise(name): tuple(normalise(g) for g in group)
             for group in SYNONYM_GROUPS for name in group}


def _synonyms(label: str) -> tuple[str, ...]:
    label = normalise(label)
    return _SYNONYMS.get(label, (label,))


class CaptionWords:
    """A caption's words as noun forms, indexed by form, so naming a label costs a few lookups
    rather than a scan of the caption per label and synonym."""

    def __init__(self, caption: str):
        self.forms = [noun_forms(w) for w in normalise(caption).split()]
        self.positions: dict[str, set[int]] = defaultdict(set)
        for i, forms in enumerate(self.forms):
            for form in forms:
                self.positions[form].add(i)

    def contains(self, phrase: str) -> bool:
        """Whether the words of ``phrase`` (normalised) occur in order, each in one of its forms."""
        words = phrase.split()
        if not words:
            return False
        starts = set().union(*(self.positions.get(f, ()) for f in noun_forms(words[0])))
        for offset, word in enumerate(words[1:], 1):
            forms = noun_forms(word)
            starts = {i for i in starts if i + offset < len(self.forms) and self.forms[i + offset] & forms}
        return bool(starts)

    def names(self, label: str) -> bool:
        """Whether the caption names ``label`` or one of its synonyms."""
        return any(self.contains(alt) for alt in _synonyms(label))


@dataclass(frozen=True)
class Evidence:
    """What the experts reported for one image (only the parts the scores read)."""

    tags: tuple[str, ...] = ()
    box_labels: tuple[str, ...] = ()
    ocr_lines: tuple[str, ...] = ()


def ocr_line_coverage(caption: str, ocr_lines: Iterable[str]) -> float | None:
    lines = {normalise(line) for line in ocr_lines} - {""}
    if not lines:
        return None
    padded = f" {normalise(caption)} "  # whole words only: "CAT" is not found in "concatenate"
    return sum(f" {line} " in padded for line in lines) / len(lines)


def ocr_token_coverage(caption: str, ocr_lines: Iterable[str]) -> float | None:
    ocr_words = {w for line in ocr_lines for w in normalise(line).split()}
    if not ocr_words:
        return None
    return len(ocr_words & set(normalise(caption).split())) / len(ocr_words)


def label_coverage(caption: str | CaptionWords, labels: Iterable[str]) -> float | None:
    distinct = {normalise(label) for label in labels} - {""}
    if not distinct:
        return None
    caption_words = caption if isinstance(caption, CaptionWords) else CaptionWords(caption)
    return sum(caption_words.names(label) for label in distinct) / len(distinct)


def unseen_nouns(caption: str, evidence: Evidence, tagger: PosTagger) -> tuple[set[str], int]:
    """(distinct nouns naming things no expert reported, distinct object nouns in the caption).

    Nouns that share a form ("dog", "dogs") count once; a noun is named by its shortest form."""
    seen: set[str] = set()
    for label in evidence.tags + evidence.box_labels:
        for alt in _synonyms(label):
            for word in alt.split():
                seen |= noun_forms(word)
    for line in evidence.ocr_lines:
        for word in normalise(line).split():
            seen |= noun_forms(word)
    objects: list[frozenset[str]] = []
    for word, pos in tagged_words(caption, tagger):
        word = normalise(word)
        if pos != NOUN or " " in word or not word:  # "e.g." → "e g" is no object
            continue
        forms = noun_forms(word)
        if not forms & DESCRIPTIVE_NOUNS and not any(forms & known for known in objects):
            objects.append(forms)
    unseen = {min(forms, key=lambda f: (len(f), f)) for forms in objects if not forms & seen}
    return unseen, len(objects)


def coverage_scores(caption: str, evidence: Evidence, tagger: PosTagger) -> dict[str, float]:
    """The scores above for one caption; undefined ones are left out."""
    caption_words = CaptionWords(caption)
    scores = {
        "cov_ocr_lines": ocr_line_coverage(caption, evidence.ocr_lines),
        "cov_ocr_tokens": ocr_token_coverage(caption, evidence.ocr_lines),
        "cov_box_labels": label_coverage(caption_words, evidence.box_labels),
        "cov_tags": label_coverage(caption_words, evidence.tags),
    }
    if words(caption):
        unseen, objects = unseen_nouns(caption, evidence, tagger)
        scores["unseen_nouns"] = float(len(unseen))
        scores["unseen_noun_share"] = len(unseen) / objects if objects else None
    return {name: round(value, 4) for name, value in scores.items() if value is not None}


COVERAGE_SCORES = ("cov_ocr_lines", "cov_ocr_tokens", "cov_box_labels", "cov_tags",
                   "unseen_nouns", "unseen_noun_share")
