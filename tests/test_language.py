import pytest

from engine.evidence.language import (
    ADJ,
    ADV,
    NOUN,
    NUM,
    OTHER,
    VERB,
    noun_forms,
    pos_tagger,
    sentences,
    tagged_words,
    tokens,
    words,
)
from models.errors import ConfigError


def test_tokens_split_clitics_and_keep_numbers_and_abbreviations_whole():
    assert tokens("The man’s hat isn't 3.5 m tall, e.g. 1,000 cm.") == [
        "The", "man", "'s", "hat", "is", "n't", "3.5", "m", "tall", ",", "e.g.", "1,000", "cm", "."]


def test_words_leave_out_punctuation_and_clitics():
    # hand count: the / man's / hat / is(n't) / well-lit / 50% -> 6 words
    assert words("The man's hat isn't well-lit (50%)!") == ["The", "man", "hat", "is", "well-lit", "50%"]


def test_sentences_end_at_terminal_punctuation_but_not_after_abbreviations():
    text = 'Dr. Smith waits, e.g. at 3.5 p.m. by the U.S. sign. "Stop!" he says? Yes   '
    assert sentences(text) == ["Dr. Smith waits, e.g. at 3.5 p.m. by the U.S. sign.", '"Stop!"',
                               "he says?", "Yes"]
    assert sentences("") == [] and sentences(" ... ") == []
    assert sentences("no full stop at the end") == ["no full stop at the end"]


def test_pattern_tagger_classes_on_a_plain_sentence():
    tagger = pos_tagger("pattern")
    assert tagged_words("Three small boats float slowly on the lake.", tagger) == [
        ("Three", NUM), ("small", ADJ), ("boats", NOUN), ("float", VERB), ("slowly", ADV),
        ("on", OTHER), ("the", OTHER), ("lake", NOUN)]


def test_auxiliaries_and_negation_are_not_verbs_or_adverbs():
    tagged = tagged_words("It has been designed well and has two wheels. He did not go; he can run.", pos_tagger())
    verbs = [w for w, c in tagged if c == VERB]
    assert verbs == ["designed", "has", "go", "run"]  # "has two wheels": a main verb
    assert [w for w, c in tagged if c == ADV] == ["well"]


def test_noun_forms_match_singular_and_plural_both_ways():
    assert noun_forms("Buses") & noun_forms("bus")
    assert noun_forms("children") & noun_forms("child")
    assert not noun_forms("cat") & noun_forms("car")


def test_unknown_or_missing_taggers_are_config_errors():
    with pytest.raises(ConfigError, match="unknown POS tagger"):
        pos_tagger("nltk")
    with pytest.raises(ConfigError, match="pattern"):
        pos_tagger("spacy:no_such_pipeline_xyz")


def test_run_config_rejects_a_tagger_that_cannot_load(tmp_path):
    from engine.core import config

    with pytest.raises(ConfigError, match="spaCy"):
        config.build(runtime={"out": str(tmp_path)}, score={"pos_tagger": "spacy:no_such_pipeline_xyz"})
    assert config.build(runtime={"out": str(tmp_path)}).score.pos_tagger == "pattern"
