"""Word vectors taken from the teacher, to start a student's word embedding from
(``student.init_from_teacher``, ``student.init_layer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import quiet_transformers


def copy_word_embeddings(embedding: nn.Embedding, record: dict[str, Any],
                         teacher_dir: Path) -> None:
    """Fill ``embedding`` with ``teacher_word_embeddings`` at the record's
    ``student.init_layer``; the pad row stays zero."""
    weight = embedding.weight
    rows = teacher_word_embeddings(teacher_dir, weight.shape[1], record["student"]["init_layer"])
    if rows.shape[0] < weight.shape[0]:
        raise KdpipeError(f"vocabulary of {weight.shape[0]} tokens does not fit the teacher's "
                          f"embeddings ({rows.shape[0]} rows) in {teacher_dir}")
    with torch.no_grad():
        weight.copy_(rows[: weight.shape[0]])
        weight[record["pad_id"]] = 0  # padding_idx: the pad row stays zero (and gets no grad)


def teacher_word_embeddings(teacher_dir: Path, dim: int, layer: int = 0) -> Tensor:
    """One vector per teacher vocabulary token (``teacher_token_vectors`` at ``layer``),
    brought to (vocab, ``dim``).

    Narrower: PCA onto the top ``dim`` components. Same width: as is. Wider: as is, with zero
    columns after (learned in training). Then one scale for the whole matrix sets the std
    of the teacher's part to 1: BERT's raw embeddings (std ~0.05) are rescaled by a LayerNorm
    inside BERT, which these students lack. Std 1 is what ``nn.Embedding`` draws without the
    teacher, so both starts feed the same scale to layers whose default init assumes it,
    and one learning rate fits both. A single scale keeps the geometry (every dot-product
    ratio); per-dimension whitening would blow weak noise directions up to full size.
    """
    matrix = teacher_token_vectors(teacher_dir, layer)
    if dim < matrix.shape[1]:
        matrix = pca_project(matrix, dim)
    matrix = matrix / matrix.std()
    if dim > matrix.shape[1]:
        matrix = torch.nn.functional.pad(matrix, (0, dim - matrix.shape[1]))
    return matrix


# Tokens per forward pass of teacher_token_vectors: ~10 s for MiniLM's 30,522 to layer 3.
TOKEN_BATCH = 1024


def teacher_token_vectors(teacher_dir: Path, layer: int) -> Tensor:
    """(vocab, hidden) float32: a vector for every row of the teacher's input embeddings.

    ``layer`` 0: the word-embedding matrix itself. ``layer`` k >= 1: the hidden state after
    teacher layer k at the token's position when the token is run alone between the
    tokenizer's special tokens (``[CLS] token [SEP]`` for BERT). Those states already went
    through k layers of the fine-tuned teacher, so they carry what the task made of each
    word; a word-embedding layer can hold only one vector per token, so the context-free
    state is the one it can take. On SST-2 a middle layer helped on validation but not on
    test, so 0 stays the default
    (``docs/decisions.md#word-embeddings-from-the-teachers-embedding-matrix``).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from kdpipe.progress import progress_bar  # training only: served models lack rich

    depth = AutoConfig.from_pretrained(teacher_dir).num_hidden_layers
    if not 0 <= layer <= depth:
        raise KdpipeError(f"student.init_layer {layer}: the teacher in {teacher_dir} has "
                          f"{depth} layers (0 is its word embeddings)")
    # Only the first ``layer`` layers are loaded: the ones after it would run for nothing.
    with quiet_transformers():
        teacher = AutoModel.from_pretrained(teacher_dir,
                                            num_hidden_layers=max(layer, 1)).eval()
    embeddings = teacher.get_input_embeddings().weight.detach().float()
    if layer == 0:
        return embeddings
    template, position = _one_token_template(AutoTokenizer.from_pretrained(teacher_dir))
    vocab = embeddings.shape[0]
    ids = torch.tensor(template).repeat(vocab, 1)
    ids[:, position] = torch.arange(vocab)
    rows = []
    with torch.inference_mode(), progress_bar() as progress:
        task = progress.add_task(f"teacher layer {layer} per token", total=vocab)
        for chunk in ids.split(TOKEN_BATCH):
            states = teacher(input_ids=chunk, attention_mask=torch.ones_like(chunk),
                             output_hidden_states=True).hidden_states
            rows.append(states[layer][:, position].float())
            progress.advance(task, len(chunk))
    return torch.cat(rows)


def _one_token_template(tokenizer: Any) -> tuple[list[int], int]:
    """The ids the tokenizer gives a one-token text, special tokens included, and where the
    token sits. Read from an encoding: transformers 5 tokenizers no longer have
    ``build_inputs_with_special_tokens``."""
    ids = tokenizer("a")["input_ids"]
    special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
    plain = [i for i, flag in enumerate(special) if not flag]
    if len(plain) != 1:
        raise KdpipeError(f"student.init_layer: the teacher's tokenizer splits 'a' into "
                          f"{len(plain)} tokens; use student.init_layer=0")
    return ids, plain[0]


def pca_project(matrix: Tensor, dim: int) -> Tensor:
    """Rows of ``matrix`` (N, H), centred, on its top ``dim`` <= H principal components:
    (N, dim), deterministic (``principal_components``)."""
    center, components = principal_components(matrix, dim)
    return ((matrix.double() - center) @ components.T).to(matrix.dtype)


def principal_components(matrix: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The mean (H,) of the rows of ``matrix`` (N, H) and its top ``dim`` principal components
    (dim, H), float64. Each component's sign is fixed (its largest-magnitude coordinate
    positive), as an SVD may return either sign."""
    center = matrix.double().mean(0)
    _, _, vh = torch.linalg.svd(matrix.double() - center, full_matrices=False)
    components = vh[:dim]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    return center, components * signs
