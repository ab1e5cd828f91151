"""The same params and seed twice on a CPU: identical metrics (timings aside), identical
prepared data, identical weights and ONNX files."""

import hashlib
import json
import re

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app

# Wall-clock measurements differ between any two runs; everything else must not.
TIMED = re.compile(r"second|latency|throughput|tokenize|speedup|texts_per")
# Files whose bytes must match: data, weights, the exported and quantized models.
SAME_BYTES = ["prepared/train.parquet", "prepared/validation.parquet", "prepared/test.parquet",
              "teacher/model.safetensors", "soft_labels/train_logits.npy",
              "student/model.safetensors", "pruned/student/model.safetensors",
              "export/model.onnx", "quantized/model.onnx"]


def run_once(root, tiny_bert, separable_csv):
    result = CliRunner().invoke(app, [
        "run", "-S", f"teacher.checkpoint={tiny_bert}", "-S", f"work_dir={root}",
        "-S", f"data.source={separable_csv}", "-S", "tracking.enabled=false",
        "-S", f"soft_labels.cache_dir={root / 'cache'}", "-S", "registry.auto_promote=false",
        "-S", "evaluate.latency_repeats=2", "-S", "evaluate.latency_warmup=0"])
    assert result.exit_code == 0, result.output
    metrics = {}
    for path in sorted((root / "metrics").glob("*.json")):
        values = json.loads(path.read_text())
        metrics[path.stem] = {k: v for k, v in values.items() if not TIMED.search(k)}
    return metrics


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_identical(tmp_path, monkeypatch, tiny_bert,
                                                    separable_csv):
    monkeypatch.chdir(tmp_path)
    first = run_once(tmp_path / "a", tiny_bert, separable_csv)
    second = run_once(tmp_path / "b", tiny_bert, separable_csv)
    assert "evaluate" in first and first["distill"]["val_accuracy"] > 0
    assert first == second
    for name in SAME_BYTES:
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name), name
    cards = [json.loads((tmp_path / r / "prepared/data_card.json").read_text()) for r in "ab"]
    assert cards[0]["content_hash"] == cards[1]["content_hash"]
