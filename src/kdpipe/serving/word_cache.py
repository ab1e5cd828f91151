"""A memo of a BERT WordPiece tokenizer's ids per space-separated word, for serving.

Why: for a small student most of a served call is tokenization
(``docs/decisions.md#a-word-cache-in-the-predictor``), and the Rust tokenizer
redoes the same normalisation and WordPiece search for every common word on every call.
The ``tokenizers`` library has no cache across ``encode`` calls for the normaliser and
pre-tokenizer, so this keeps one: each distinct word is encoded once by the tokenizer
itself and its ids are reused.

It is exact only where a text's ids are the concatenation of its words' ids, so it
applies to a text only when both hold:

- the tokenizer is a BERT one: ``BertNormalizer`` (per character), ``BertPreTokenizer``
  (splits on whitespace and punctuation, never across a space), ``WordPiece`` (per
  pre-token), added tokens without spaces or stripping;
- the text is printable ASCII, where the only whitespace is the space and the normaliser
  only lower-cases (no control characters to drop, no accents, no CJK spacing).

Any other text goes to the tokenizer whole. Special tokens and truncation are applied as
the tokenizer's single-sentence template and truncation settings say (checked on build).
"""

from __future__ import annotations

from typing import Any

# Distinct words kept; past it the memo starts again (a bound on memory for open
# vocabularies: ~100 bytes a word).
MAX_WORDS = 200_000


class WordCache:
    """``ids(text)``: the ids ``backend.encode(text).ids`` gives, from memoised words."""

    def __init__(self, backend: Any, prefix: list[int], suffix: list[int], room: int,
                 left: bool) -> None:
        from tokenizers import Tokenizer

        self.backend = backend
        self.plain = Tokenizer.from_str(backend.to_str())  # no truncation: whole words
        self.plain.no_truncation()
        self.prefix, self.suffix, self.room, self.left = prefix, suffix, room, left
        self.words: dict[str, list[int]] = {}

    @classmethod
    def wrap(cls, backend: Any) -> WordCache | None:
        """A cache for ``backend`` (a truncating ``tokenizers.Tokenizer``), or None where
        the word-by-word form would not be exact."""
        from tokenizers import models, normalizers, pre_tokenizers

        if not (isinstance(backend.normalizer, normalizers.BertNormalizer)
                and isinstance(backend.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
                and isinstance(backend.model, models.WordPiece)
                and backend.truncation is not None):
            return None
        for token in backend.get_added_tokens_decoder().values():
            if any(c.isspace() for c in token.content) or token.lstrip or token.rstrip:
                return None
        one = backend.encode("a")
        plain = [i for i, special in enumerate(one.special_tokens_mask) if not special]
        if len(plain) != 1 or any(one.type_ids):
            return None
        at = plain[0]
        truncation = backend.truncation
        room = truncation["max_length"] - (len(one.ids) - 1)
        if room < 1 or truncation["stride"]:
            return None
        return cls(backend, one.ids[:at], one.ids[at + 1:], room,
                   truncation["direction"] == "left")

    def ids(self, text: str) -> list[int]:
        if not (text.isascii() and text.isprintable()):
            return self.backend.encode(text).ids
        ids: list[int] = []
        words = self.words
        for word in text.split():  # printable ASCII: the space is the only whitespace
            found = words.get(word)
            if found is None:
                if len(words) >= MAX_WORDS:
                    words.clear()
                found = words[word] = self.plain.encode(word, add_special_tokens=False).ids
            ids += found
        if len(ids) > self.room:
            ids = ids[-self.room:] if self.left else ids[:self.room]
        return self.prefix + ids + self.suffix
