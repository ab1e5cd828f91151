"""prune: make the distilled student smaller: vocabulary, then structure, then magnitude, then
(optionally) a short distillation fine-tune on the cached soft labels.

Reads ``student_dir`` (distill: the student and its tokenizer), ``prepared_dir`` (ingest: the
training texts whose tokens are kept; the validation split it is scored on) and
``soft_labels_dir`` (the teacher's logits, for the fine-tune). Writes ``out_dir`` atomically:
the pruned student (``student/``, ``vocab_remap.safetensors``, ``pruning.json``; load it with
``kdpipe.compression.pruning.load_pruned``: it reads the tokenizer's original ids), the
tokenizer, and ``prune.json`` (parameters, vocabulary, sizes, sparsity and validation
accuracy after each stage).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.compression import pruning
from kdpipe.config import Config
from kdpipe.data.prepare import UNLABELED
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.metrics import accuracy_and_f1
from kdpipe.models.students import load_student, load_student_tokenizer
from kdpipe.progress import progress_bar
from kdpipe.step_result import StepResult
from kdpipe.steps import distill
from kdpipe.threads import torch_threads
from kdpipe.training import losses
from kdpipe.training.loss_terms import LossTerms, build_terms
from kdpipe.training.optim import adamw

REPORT_FILE = "prune.json"


def run(cfg: Config, student_dir: Path, prepared_dir: Path, soft_labels_dir: Path,
        out_dir: Path) -> StepResult:
    """Prune the student in ``student_dir`` as ``cfg.prune`` says into ``out_dir``.

    Metrics: ``params_before``/``params_after`` (total parameters), ``nonzero_params_after``,
    ``vocab_kept`` (embedding rows kept; the whole vocabulary when not pruned), ``sparsity``
    (zeros among the Linear/Conv1d/LSTM weights), ``val_accuracy_before``,
    ``val_accuracy_pruned`` (after pruning, before any fine-tune) and ``val_accuracy_after``
    (the saved model).
    """
    start = time.perf_counter()
    p = cfg.prune
    tokenizer = load_student_tokenizer(Path(student_dir))
    # The augmented texts matter only to the fine-tune (the kept vocabulary is that of the
    # real texts: train and unlabeled); loading SST-2's transfer set took 16.7 s with its
    # 247,092 augmented texts, 4.2 s without
    # (docs/decisions.md#an-augmented-transfer-set-on-by-default).
    data = distill.load_transfer(cfg, Path(prepared_dir), Path(soft_labels_dir), tokenizer,
                                 only=None if p.finetune_epochs > 0 else [UNLABELED])
    model = pruning.PrunedStudent(load_student(Path(student_dir)))
    before = {"params": pruning.parameter_counts(model), "sizes": pruning.structured_sizes(model)}
    accuracy = {"before": val_accuracy(model, data)}
    report: dict[str, Any] = {"arch": model.arch, "settings": p.model_dump(mode="json")}
    with torch_threads(cfg.distill.num_threads):
        if p.vocabulary:
            report["vocabulary"] = prune_vocabulary(model, data, tokenizer, p.unseen_tokens,
                                                   p.unseen_rank, p.min_vocab_fraction)
            accuracy["after_vocabulary"] = val_accuracy(model, data)
        if p.structured_fraction > 0:
            pruning.prune_structure(model, p.structured_fraction)
            accuracy["after_structured"] = val_accuracy(model, data)
        if p.unstructured_sparsity > 0:
            pruning.prune_magnitude(model, p.unstructured_sparsity)
            accuracy["after_unstructured"] = val_accuracy(model, data)
        pruned_accuracy = accuracy[list(accuracy)[-1]]
        if p.finetune_epochs > 0:
            torch.manual_seed(cfg.seed)
            report["finetune"] = finetune(cfg, model, data)
            accuracy["after_finetune"] = val_accuracy(model, data)
    model.eval()
    after = {"params": pruning.parameter_counts(model), "sizes": pruning.structured_sizes(model)}
    sparsity = pruning.weight_sparsity(model)
    seconds = time.perf_counter() - start
    report.update({
        "params": {"before": before["params"], "after": after["params"]},
        "structured": {"fraction": p.structured_fraction, "before": before["sizes"],
                       "after": after["sizes"]},
        "sparsity": {"requested": p.unstructured_sparsity, "measured": sparsity},
        "val_accuracy": accuracy,
        "seconds": round(seconds, 1),
    })
    report.setdefault("vocabulary", None)
    with atomic_dir(Path(out_dir)) as tmp:
        pruning.write_pruned(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT_FILE, report)
    final = accuracy[list(accuracy)[-1]]
    metrics = {
        "params_before": float(before["params"]["total"]),
        "params_after": float(after["params"]["total"]),
        "nonzero_params_after": float(after["params"]["nonzero"]),
        "vocab_kept": float(model.student.get_input_embeddings().num_embeddings),
        "sparsity": sparsity,
        "val_accuracy_before": accuracy["before"],
        "val_accuracy_pruned": pruned_accuracy,
        "val_accuracy_after": final,
    }
    summary = (f"{model.arch}: {metrics['params_before']:,.0f} -> "
               f"{metrics['params_after']:,.0f} params ({sparsity:.0%} of weights zero), "
               f"val acc {accuracy['before']:.3f} -> {final:.3f}, {seconds:.0f} s")
    return StepResult("prune", Path(out_dir), metrics, [Path(out_dir) / REPORT_FILE], summary)


def prune_vocabulary(model: pruning.PrunedStudent, data: distill.TransferData,
                     tokenizer: Any, unseen: str = "own", rank: int = 32,
                     min_fraction: float = 0.0) -> dict[str, Any]:
    """Keep the ids of the tokenized training texts, labelled and unlabeled (truncated at
    max_length, as distill saw them) plus the special tokens, topped up to ``min_fraction``
    of the embedding's rows with ``commonest_missing``; a dropped id reads its own row at rank
    ``rank`` (``unseen="own"``), its nearest kept word (``"nearest"``) or [UNK] (``"unk"``).
    What was kept, for the report."""
    if tokenizer.unk_token_id is None:
        raise KdpipeError("prune.vocabulary needs a tokenizer with an unknown token to map "
                          "dropped ids to; set -S prune.vocabulary=false")
    # Real texts only: train and unlabeled, which follow any augmented rows (their variants
    # hold train's tokens, and [MASK]).
    unlabeled = data.parts.get(UNLABELED, 0)
    train_ids = data.ids[:data.parts["train"]] + (data.ids[-unlabeled:] if unlabeled else [])
    special = {*tokenizer.all_special_ids, tokenizer.unk_token_id}
    seen = pruning.kept_token_ids(train_ids, special)
    original = model.student.get_input_embeddings().num_embeddings
    added = commonest_missing(tokenizer, seen, round(min_fraction * original) - len(seen),
                              original)
    kept = sorted([*seen, *added])
    # A dropped word should read a kept word, not [CLS] or [SEP].
    nearest = [i for i in kept if i not in special] if unseen == "nearest" else None
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id, nearest,
                             rank if unseen == "own" else 0)
    return {"original": original, "kept": len(kept), "kept_fraction": len(kept) / original,
            "seen_in_train": len(seen), "added_common": len(added),
            "train_texts": data.parts["train"], "unlabeled_texts": unlabeled,
            "unseen_tokens": unseen,
            **({"unseen_rank": rank} if unseen == "own" else {})}


def commonest_missing(tokenizer: Any, kept: list[int], count: int, rows: int) -> list[int]:
    """The ``count`` lowest ids below ``rows`` that are not in ``kept``, passing over
    bracketed placeholders such as [unused1] (which no text tokenizes to).

    Why the lowest: WordPiece, BPE and SentencePiece vocabularies number their tokens roughly
    by frequency in the tokenizer's own corpus, so these are the commonest tokens the
    training texts lack and the likeliest to turn up in new text. Their exact rows still hold
    the teacher's projected embeddings; at rank 16 the augmented SST-2 BiLSTM lost 0.8
    points of validation accuracy to the dropped ones
    (docs/decisions.md#vocabulary-pruning-keeps-the-commonest-tokens)."""
    if count <= 0:
        return []
    have = set(kept)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(rows, len(tokenizer)))))
    missing = (i for i, token in enumerate(tokens) if i not in have
               and not (token.startswith("[") and token.endswith("]")))
    return list(itertools.islice(missing, count))


def val_accuracy(model: nn.Module, data: distill.TransferData) -> float:
    return accuracy_and_f1(data.val_labels, distill.predict(model, data))[0]


def finetune(cfg: Config, model: pruning.PrunedStudent,
             data: distill.TransferData) -> dict[str, Any]:
    """``prune.finetune_epochs`` passes of KD (distill's loss, alpha and final temperature,
    plus logit MSE when configured) over every transfer row at ``prune.finetune_lr``, with
    distill's batching and training step. Weights zeroed by magnitude pruning stay zero.
    Returns the mean loss per epoch."""
    from transformers import get_linear_schedule_with_warmup

    d = cfg.distill
    temperature = losses.temperature_at(d.epochs - 1, d.epochs, d.temperature,
                                        d.temperature_end)
    weights = {"kd": 1.0, **({"logit_mse": d.logit_mse} if d.logit_mse > 0 else {})}
    terms = LossTerms(weights, temperature, d.alpha)
    rows = np.arange(len(data.ids))
    ones = np.ones(len(rows), np.float32)
    # Magnitude pruning's zeros, held at zero after every step (else the fine-tune revives them).
    zeros = [] if cfg.prune.unstructured_sparsity == 0 else [
        (w, w == 0) for w in (getattr(m, n) for m, n in pruning.prunable_weights(model))]
    optimizer = adamw(model.parameters(), cfg.prune.finetune_lr, d.weight_decay)
    epochs = cfg.prune.finetune_epochs
    steps = epochs * -(-len(rows) // d.batch_size)
    t = distill.Trainer(cfg, data, model, build_terms(weights, d, model.student, 0, None),
                        optimizer, get_linear_schedule_with_warmup(optimizer, 0, steps))
    history = []
    with progress_bar() as bar:
        task = bar.add_task("prune fine-tune", total=steps)
        for epoch in range(epochs):
            logged = []
            for batch in distill.epoch_batches(t, rows, ones, epoch):
                logged.append(distill.train_step(t, terms, batch)["total"])
                with torch.no_grad():
                    for weight, zero in zeros:
                        weight.masked_fill_(zero, 0.0)
                bar.advance(task)
            history.append({"epoch": epoch, "loss": float(np.mean(logged))})
    model.eval()
    return {"epochs": epochs, "lr": cfg.prune.finetune_lr, "temperature": temperature,
            "loss": history}
