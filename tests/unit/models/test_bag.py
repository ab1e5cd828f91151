"""The fast student (kdpipe.models.bag): hashed bigrams and the mean, checked by hand on
tiny tables; a pruned vocabulary renumbers the words but not the bigrams."""

from __future__ import annotations

import pytest
import torch

from kdpipe.compression import pruning
from kdpipe.errors import KdpipeError
from kdpipe.models.bag import BIGRAM_PRIME, BagOfNgrams, bigram_buckets
from kdpipe.training import trained_rows


def tiny(hidden_size: int = 0) -> BagOfNgrams:
    """Vocabulary 5 (pad 0), width 2, 3 bigram buckets, 2 labels; hand-set weights."""
    model = BagOfNgrams(5, 2, 0, 3, hidden_size, 2, dropout=0.0).eval()
    with torch.no_grad():
        model.embedding.weight.copy_(torch.tensor(
            [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 1.0]]))
        model.bigrams.weight.copy_(torch.tensor([[6.0, 0.0], [0.0, 6.0], [-3.0, -3.0]]))
        model.classifier.weight.copy_(torch.eye(2))
        model.classifier.bias.zero_()
    model.student_record = {"arch": "fast", "student": {"fast": {"hidden_size": hidden_size}}}
    return model


def test_bigram_hash_by_hand():
    assert BIGRAM_PRIME == 1_000_003
    # (1, 2): 1,000,005 mod 10 = 5; (2, 3): 2,000,009 mod 10 = 9
    assert bigram_buckets([1, 2, 3], 10) == [5, 9]
    assert bigram_buckets([4], 10) == []


def test_the_mean_of_word_and_bigram_rows_by_hand():
    model = tiny()
    # Text [1, 2, 3] then padding. Bigrams: (1, 2) -> 1,000,005 mod 3 = 0;
    # (2, 3) -> 2,000,009 mod 3 = 2. Rows: words (1,0) (0,2) (3,3), bigrams (6,0) (-3,-3):
    # sum (7, 2) over 5 rows = (1.4, 0.4).
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    out = model(ids, mask)
    torch.testing.assert_close(out.features, torch.tensor([[1.4, 0.4]]))
    torch.testing.assert_close(out.logits, torch.tensor([[1.4, 0.4]]))
    # Padding adds nothing: the same text without it, and next to a longer text.
    torch.testing.assert_close(model(ids[:, :3], mask[:, :3]).logits, out.logits)
    batch = model(torch.tensor([[1, 2, 3, 0], [4, 4, 4, 4]]),
                  torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    torch.testing.assert_close(batch.logits[:1], out.logits)
    # A one-token text has no bigram: its word row alone.
    torch.testing.assert_close(model(torch.tensor([[4]]), torch.tensor([[1]])).logits,
                               torch.tensor([[-1.0, 1.0]]))


def test_the_hidden_layer_reads_the_mean():
    model = tiny(hidden_size=2)
    with torch.no_grad():
        model.hidden.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        model.hidden.bias.copy_(torch.tensor([0.0, 0.1]))
    out = model(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]]))
    # mean (1.4, 0.4) -> (1.4, -0.3) -> ReLU (1.4, 0)
    torch.testing.assert_close(out.features, torch.tensor([[1.4, 0.0]]))


def test_a_pruned_vocabulary_renumbers_the_words_not_the_bigrams():
    model = pruning.PrunedStudent(tiny()).eval()
    original = tiny()
    pruning.prune_vocabulary(model, [0, 1, 2, 3], unk_id=1)  # token 4 cut: reads [UNK]=1
    ids = torch.tensor([[2, 4, 3]])
    mask = torch.ones_like(ids)
    # Words: 2, [UNK] in place of 4, 3. Bigrams hashed from the tokenizer's ids (2, 4), (4, 3).
    words = original.embedding.weight[[2, 1, 3]].sum(0)
    rows = [(2 * BIGRAM_PRIME + 4) % 3, (4 * BIGRAM_PRIME + 3) % 3]
    expected = (words + original.bigrams.weight[rows].sum(0)) / 5
    torch.testing.assert_close(model(ids, mask).features[0], expected)


def test_only_the_rows_the_texts_read_are_trained():
    model = tiny()
    texts = [[1, 2, 3]]  # bigram rows 0 and 2
    assert model.row_tables(texts) == {"embedding": texts, "bigrams": [[0, 2]]}
    trained_rows.restrict(model, texts)
    assert isinstance(model.bigrams, trained_rows.RowSubsetEmbedding)
    assert model.bigrams.weight.shape == (2, 2)  # rows 0 and 2
    before = model(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]])).logits
    trained_rows.merge(model)
    assert type(model.bigrams) is torch.nn.Embedding and type(model.embedding) is torch.nn.Embedding
    torch.testing.assert_close(model(torch.tensor([[1, 2, 3]]),
                                     torch.tensor([[1, 1, 1]])).logits, before)


def test_structured_pruning_needs_a_hidden_layer():
    with pytest.raises(KdpipeError, match="student.fast.hidden_size > 0"):
        tiny().shrink(0.5)
