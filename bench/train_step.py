"""Where a training step's time goes: forward, backward, clipping and the optimizer, for the
distill step's student and the teacher's optimizer, with torch's per-tensor AdamW against the
fused one that kdpipe.training.optim uses, the whole embedding table trained against only the rows
the transfer set reaches (kdpipe.training.trained_rows, what distill does), and for a BiLSTM student
its LSTM over a PackedSequence against the padded batch (``bilstm.final_states``, what
distill does).

    python bench/train_step.py --work /tmp/kdpipe-bench/sst2/full

``--work``: a bench project (``bench/run.py``) whose teacher, soft labels and fractions
exist. Prints a table, writes ``bench/results/train_step_<data folder name>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
PARTS = ("forward", "backward", "clip", "optimizer")


def distill_step_ms(cfg, data, teacher_dir, tokenizer, fused: bool, steps: int,
                    warmup: int, reachable: bool = True,
                    packed: bool = False) -> dict[str, float]:
    """Mean milliseconds per part of the distill step on the first epoch's batches;
    ``reachable`` False trains the whole embedding table (kdpipe.training.trained_rows undone);
    ``packed`` runs a BiLSTM's LSTM over a PackedSequence."""
    if packed:
        from kdpipe.models import bilstm

        with mock.patch.object(bilstm, "final_states", bilstm.packed_final_states):
            return distill_step_ms(cfg, data, teacher_dir, tokenizer, fused, steps, warmup,
                                   reachable)
    from kdpipe.steps import distill, fractionate
    from kdpipe.training import trained_rows
    from kdpipe.training.loss_terms import LossTerms

    torch.manual_seed(cfg.seed)
    t = distill.make_trainer(cfg, data, teacher_dir, tokenizer, steps)
    if not reachable:
        t.student = trained_rows.merge(t.student)
    params = list(t.student.parameters())
    t.optimizer = torch.optim.AdamW(params, lr=cfg.distill.lr, fused=fused or None)
    indices, weights = fractionate.load(cfg.paths.fractions, 0)
    batches = distill.epoch_batches(t, indices, weights, 0)[: warmup + steps]
    terms = LossTerms.for_epoch(cfg.distill, 0)
    spent = dict.fromkeys(PARTS, 0.0)
    for i, batch in enumerate(batches):
        marks = [time.perf_counter()]
        out = t.student(batch.input_ids, batch.attention_mask)
        values = {name: t.terms[name](batch, out, terms) for name in terms.weights}
        total, _ = terms.combine(values)
        t.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        total.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, cfg.distill.max_grad_norm)
        marks.append(time.perf_counter())
        t.optimizer.step()
        marks.append(time.perf_counter())
        if i >= warmup:
            for part, start, end in zip(PARTS, marks, marks[1:], strict=False):
                spent[part] += end - start
    ms = {part: round(1000 * s / steps, 2) for part, s in spent.items()}
    ms["step"] = round(sum(ms.values()), 2)
    return ms


def teacher_optimizer_ms(teacher_dir: Path, fused: bool, steps: int) -> float:
    """Milliseconds of one AdamW step over the fine-tuned teacher's parameters."""
    from kdpipe.evaluation.models import load_hf_classifier
    from kdpipe.models.teacher import no_decay_param_groups

    model = load_hf_classifier(teacher_dir)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(no_decay_param_groups(model, 0.01), lr=1e-4, fused=fused or None)
    for _ in range(3):
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return round(1000 * (time.perf_counter() - start) / steps, 2)


def main() -> None:
    from kdpipe.config import load_config
    from kdpipe.models.teacher import load_tokenizer
    from kdpipe.steps import distill

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a bench/run.py project folder")
    parser.add_argument("--steps", type=int, default=120, help="timed distill steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    project = Path(args.work)
    cfg = load_config(project / "params.yaml", [f"work_dir={project / 'work'}",
                                                "tracking.enabled=false"])
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(cfg.paths.teacher)
    data = distill.load_transfer(cfg, cfg.paths.prepared, cfg.paths.soft_labels, tokenizer)
    rows = {}
    for fused in (False, True):
        name = ("fused" if fused else "per-tensor") + ", all rows"
        rows[name] = distill_step_ms(cfg, data, cfg.paths.teacher, tokenizer, fused,
                                     args.steps, warmup=20, reachable=False)
        rows[name]["teacher_optimizer"] = teacher_optimizer_ms(cfg.paths.teacher, fused, 20)
    if cfg.student.arch == "bilstm":
        rows["fused, reachable rows, packed LSTM"] = distill_step_ms(
            cfg, data, cfg.paths.teacher, tokenizer, True, args.steps, warmup=20, packed=True)
    rows["fused, reachable rows"] = distill_step_ms(cfg, data, cfg.paths.teacher, tokenizer,
                                                    True, args.steps, warmup=20)
    doc = {"project": str(project), "threads": args.threads, "steps": args.steps,
           "student": cfg.student.arch, "batch_size": cfg.distill.batch_size,
           "batches_per_epoch": int(np.ceil(len(data.ids) / cfg.distill.batch_size)),
           "ms": rows}
    columns = [*PARTS, "step", "teacher_optimizer"]
    print("| AdamW | " + " | ".join(f"{c} ms" for c in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, ms in rows.items():
        print(f"| {name} | " + " | ".join(f"{ms[c]:.2f}" if c in ms else "" for c in columns)
              + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"train_step_{Path(cfg.data.source).name}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
