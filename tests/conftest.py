"""Shared fixtures: a tiny BERT checkpoint built in the test, small data files, a config
pointing at temp dirs. Nothing here touches the network or ../shared."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import kdpipe  # noqa: E402,F401  (switches telemetry off before anything else imports)
from kdpipe.config import Config, validate  # noqa: E402

POSITIVE = ["good", "great", "lovely", "excellent", "fine", "happy", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "broken", "sad", "dull", "nasty"]
FILLER = ["the", "a", "movie", "film", "food", "it", "was", "very", "really", "quite",
          "service", "phone", "and", "but", "so", "this", "that", "is"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def separable_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs whose label is given by which sentiment word they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, rng.randint(2, 7))
        words.insert(rng.randrange(len(words) + 1),
                     rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words) + f" {i}", label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


def build_tiny_bert(folder: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer over a small vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER)) + [str(d) for d in range(10)]
    vocab += [f"##{d}" for d in range(10)]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)},
                                  do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=num_labels)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _dvc_site_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep DVC's machine-wide site cache (default /var/tmp/dvc) inside the test's temp dir."""
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site"))
    yield
    os.environ.pop("DVC_SITE_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI for subprocesses; without this a
    store one test used would leak into the next test's subprocesses as if a user chose it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A library that logs through the root logger's functions (logging.info) installs a
    handler on the stream of that moment, CliRunner's captured one included; kept, it
    writes to a closed stream in a later test ("--- Logging error ---" and a traceback in
    that test's output). Each test gets the root logger back as it found it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny BERT checkpoint folder (do not modify; copy it first)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def prepared_config(root: Path, teacher: Path, **sections: object) -> Config:
    """A tracking-off config (tiny teacher, max_length 32, ``sections`` merged in) whose
    work_dir holds the ingested 200-row separable CSV."""
    from kdpipe.steps import ingest

    raw = {"work_dir": str(root / "work"), "tracking": {"enabled": False},
           "data": {"source": str(write_csv(root / "d.csv", separable_rows(200)))},
           "teacher": {"checkpoint": str(teacher)}, "ingest": {"max_length": 32}, **sections}
    cfg = validate(raw, "test")
    ingest.run(cfg, cfg.paths.prepared)
    return cfg


def save_fresh_student(folder: Path, student_cfg, teacher: Path, tokenizer, seed: int = 0) -> Path:
    """An untrained student built from ``teacher`` (seeded), saved with the tokenizer."""
    import torch

    from kdpipe.models.students import build_student, save_student

    torch.manual_seed(seed)
    model = build_student(student_cfg, 2, teacher, tokenizer.pad_token_id, len(tokenizer))
    save_student(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bert: Path):
    from kdpipe.models.teacher import load_tokenizer

    return load_tokenizer(str(tiny_bert))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: much faster for models this small (no thread
    hand-offs per LSTM step), and the previous count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config(tmp_path: Path, tiny_bert: Path):
    """Build a Config with work_dir/cache in tmp_path, the tiny teacher, tracking off;
    keyword overrides use dotted keys: make_config(**{"data.source": "x.csv"})."""

    def build(**overrides: object) -> Config:
        raw: dict = {
            "work_dir": str(tmp_path / "work"),
            "tracking": {"enabled": False},
            "teacher": {"checkpoint": str(tiny_bert)},
            "soft_labels": {"cache_dir": str(tmp_path / "cache")},
        }
        for key, value in overrides.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return validate(raw, "test")

    return build


@pytest.fixture
def separable_csv(tmp_path: Path) -> Path:
    """A 200-row CSV whose label is decided by one sentiment word."""
    return write_csv(tmp_path / "data" / "reviews.csv", separable_rows(200))
