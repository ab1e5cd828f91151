"""What training a model needs besides the model: losses, optimizer, batches, checkpoints.

- ``losses``: the distillation loss terms;
- ``optim``: the optimizer (fused AdamW where PyTorch has it);
- ``batching``: shuffled batches of similar-length texts;
- ``checkpoints`` and ``distill_checkpoint``: resumable training state (safetensors + JSON);
- ``trained_rows``: embedding rows the transfer set never reaches, kept out of training;
- ``augment``: the augmented transfer set (masking, POS-guided replacement, n-gram sampling);
- ``softcache``: the content-addressed cache of the teacher's soft labels.

Used by the steps (teacher, soft_labels, distill, prune); imports neither the steps nor
kfp, mlflow or dvc.
"""
