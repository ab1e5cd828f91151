"""kdpipe.serving.word_cache: ids per memoised word equal the tokenizer's own, or it stands
aside."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdpipe.serving.predictor import fast_backend, load_tokenizer
from kdpipe.serving.word_cache import WordCache

# Words in and out of the tiny vocabulary, digits (split into ##pieces), punctuation glued
# to words, literal special tokens, mixed case.
PIECES = ["good", "Great", "AWFUL", "film", "x", "zq", "123", "9a", "don't", "end.", "?!",
          "[CLS]", "[SEP]", "[PAD]", "[cls]", "(a)", "-", "ok,fine", "#", "~~"]
PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
WORDY = st.lists(st.sampled_from(PIECES), max_size=40).map(" ".join)
OTHER = st.text(st.sampled_from(["a", " ", "\t", "\n", "é", "東", "\x00", "\x1f", "🙂", "Ü"]),
                max_size=30)


def backend(tiny_bert, max_length=16, side="right"):
    tokenizer = load_tokenizer(tiny_bert)
    tokenizer.truncation_side = side
    return fast_backend(tokenizer, max_length)


@pytest.mark.parametrize(("max_length", "side"), [(16, "right"), (6, "left"), (512, "right")])
def test_ids_equal_the_tokenizers_for_any_text(tiny_bert, max_length, side):
    rust = backend(tiny_bert, max_length, side)
    cache = WordCache.wrap(rust)
    assert cache is not None

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(PRINTABLE, WORDY, OTHER, st.just(""), st.just("   ")))
    def check(text):
        assert cache.ids(text) == rust.encode(text).ids
        assert cache.ids(text) == rust.encode(text).ids  # again, from the memo

    check()
    assert "good" in cache.words  # the memo was used, not only the fall-back


def test_words_with_non_ascii_or_control_characters_go_to_the_tokenizer(tiny_bert):
    cache = WordCache.wrap(backend(tiny_bert))
    cache.ids("Üxx good\tfilm")
    assert cache.words == {}


def test_the_memo_starts_again_past_its_bound(tiny_bert, monkeypatch):
    from kdpipe.serving import word_cache

    monkeypatch.setattr(word_cache, "MAX_WORDS", 3)
    rust = backend(tiny_bert)
    cache = WordCache.wrap(rust)
    text = "good great awful film bad"
    assert cache.ids(text) == rust.encode(text).ids
    assert len(cache.words) <= 3


def test_tokenizers_split_other_than_bert_get_no_cache(tiny_bert):
    from tokenizers import pre_tokenizers

    rust = backend(tiny_bert)
    rust.pre_tokenizer = pre_tokenizers.Metaspace()  # spaces become part of the tokens
    assert WordCache.wrap(rust) is None
    rust = backend(tiny_bert)
    rust.no_truncation()
    assert WordCache.wrap(rust) is None
