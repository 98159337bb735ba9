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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.language import NOUN, PosTagger, noun_forms, tagged_words, words

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
    ["image", "picture", "photo", "photograph", "scene", "view", "shot", "frame", "composition", "background", "foreground", "left", "right", "top", "bottom", "center", "centre", "middle", "side", "corner", "edge", "front", "back", "part", "area", "section", "portion", "half", "color", "colour", "shade", "tone", "hue", "shape", "size", "style", "design", "pattern", "texture", "detail", "details", "atmosphere", "mood", "setting", "overall", "appearance", "lighting", "light", "shadow", "focus", "depth", "perspective", "angle", "element", "elements", "feature", "features", "object", "objects", "item", "items", "thing", "things", "variety", "number", "lot", "kind", "type", "sense", "space", "surface", "line", "lines", "arrangement", "contrast", "palette", "theme", "aspect", "way", "one"]
)

_NON_ALNUM = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower case, punctuation and runs of spaces collapsed to one space."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def _synonyms(label: str) -> tuple[str, ...]:
    label = normalise(label)
    for group in SYNONYM_GROUPS:
        if label in (normalise(g) for g in group):
            return tuple(normalise(g) for g in group)
    return (label,)


def _phrase_forms(phrase: str) -> list[frozenset[str]]:
    return [noun_forms(w) for w in normalise(phrase).split()]


def _contains(caption_forms: Sequence[frozenset[str]], phrase: list[frozenset[str]]) -> bool:
    n = len(phrase)
    return n > 0 and any(
        all(caption_forms[i + j] & phrase[j] for j in range(n))
        for i in range(len(caption_forms) - n + 1)
    )


def names(caption_forms: Sequence[frozenset[str]], label: str) -> bool:
    """Whether the caption (as the noun forms of its words) names ``label`` or a synonym."""
    return any(_contains(caption_forms, _phrase_forms(alt)) for alt in _synonyms(label))


def caption_forms(caption: str) -> list[frozenset[str]]:
    return [noun_forms(w) for w in normalise(caption).split()]


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


def label_coverage(caption: str, labels: Iterable[str]) -> float | None:
    distinct = {normalise(label) for label in labels} - {""}
    if not distinct:
        return None
    forms = caption_forms(caption)
    return sum(names(forms, label) for label in distinct) / len(distinct)


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
    scores = {
        "cov_ocr_lines": ocr_line_coverage(caption, evidence.ocr_lines),
        "cov_ocr_tokens": ocr_token_coverage(caption, evidence.ocr_lines),
        "cov_box_labels": label_coverage(caption, evidence.box_labels),
        "cov_tags": label_coverage(caption, evidence.tags),
    }
    if words(caption):
        unseen, objects = unseen_nouns(caption, evidence, tagger)
        scores["unseen_nouns"] = float(len(unseen))
        scores["unseen_noun_share"] = len(unseen) / objects if objects else None
    return {name: round(value, 4) for name, value in scores.items() if value is not None}


COVERAGE_SCORES = ("cov_ocr_lines", "cov_ocr_tokens", "cov_box_labels", "cov_tags",
                   "unseen_nouns", "unseen_noun_share")
