"""BiLSTM student (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into
Simple Neural Networks"): word embeddings, a bidirectional LSTM, a linear classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from kdpipe.models.students import StudentOutput


class BiLSTM(nn.Module):
    """Embed → BiLSTM over the packed text → [last forward state; last backward state] →
    dropout → Linear.

    ``forward(input_ids, attention_mask)``: both (B, L), right-padded, mask 1 for real tokens.
    Returns ``StudentOutput(logits (B, num_labels), features (B, 2 * hidden_size), None)``.

    Features are the final states of both directions, as in Tang et al. (so results compare
    with the paper), rather than max pooling: with packed sequences the forward state is
    taken at the text's last real token and the backward one at its first, so padding never
    reaches them and no mask is needed after the LSTM.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, pad_id: int, hidden_size: int,
                 layers: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        # torch applies LSTM dropout between stacked layers only; it warns when there is one.
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=layers, batch_first=True,
                            bidirectional=True, dropout=dropout if layers > 1 else 0.0)
        self.feature_dim = 2 * hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        # At least one step, so an all-padding row still packs (it reads the pad embedding).
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, (last, _) = self.lstm(packed)  # (layers * 2, B, hidden), back in batch order
        features = torch.cat([last[-2], last[-1]], dim=1)  # top layer: forward, backward
        return StudentOutput(self.classifier(self.dropout(features)), features, None)
