"""Predictor: raw text in, labels and probabilities out, over an exported folder.

An exported folder (written by ``kdpipe.steps.export``) holds ``model.onnx``, the tokenizer
files, ``labels.json`` (``{"names": [...]}`` in label-id order) and ``export.json`` (which
records, among other things, the ``max_length`` texts are cut to). It needs neither PyTorch
nor the training folders: copy it anywhere and point a Predictor at it::

    predictor = Predictor(Path("work/export"), threads=1)
    predictor.predict("a lovely film")[0].label           # 'positive'
    predictor.predict_proba(["bad", "good"])              # array (2, C), rows sum to 1
    [p.to_dict() for p in predictor.predict(texts)]       # JSON-ready

A quantize output made with ``quantize.method=torch_dynamic`` holds a ``torch`` folder (an
int8 PyTorch student, ``kdpipe.compression.torch_int8``) instead of ``model.onnx``; the
Predictor runs it with PyTorch, the rest is the same. The fast student's export folder also
holds ``bag.safetensors``, its tables, which the Predictor serves with numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError
from kdpipe.serving.bag_numpy import BAG_FILE, BagSession
from kdpipe.serving.ort import ort_session
from kdpipe.serving.padding import pad_ids
from kdpipe.serving.word_cache import WordCache

MODEL_FILE = "model.onnx"
# In place of model.onnx: a student int8-quantized by PyTorch (quantize.method torch_dynamic,
# kdpipe.compression.torch_int8), served by PyTorch.
TORCH_DIR = "torch"
LABELS_FILE = "labels.json"
RECORD_FILE = "export.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # every saved tokenizer has it, fast or slow
TOKENIZER_FILE = "tokenizer.json"  # a fast tokenizer's whole definition
# Without tokenizer.json, a slow tokenizer needs one of these; without any of them
# transformers builds an empty-vocabulary tokenizer that maps every word to [UNK].
VOCABULARY_FILES = ("vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")
BATCH_SIZE = 64  # texts per ONNX Runtime call; each batch is padded to its longest text

_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
# Session input name -> attribute of a `tokenizers.Encoding`.
_ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask",
                    "token_type_ids": "type_ids"}


@dataclass(frozen=True)
class Prediction:
    """One text's result: the most probable label and every label's probability (label-id
    order, summing to 1)."""

    label: str
    probabilities: dict[str, float]

    @property
    def score(self) -> float:
        """Probability of ``label``."""
        return self.probabilities[self.label]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": dict(self.probabilities)}


class Predictor:
    """Classifies texts with an exported model on the CPU (ONNX Runtime; PyTorch for a
    folder whose model is a ``torch`` folder, as quantize.method torch_dynamic writes).

    ``folder``: an exported folder (see the module docstring); a missing or unreadable file
    is a ``KdpipeError`` naming it. ``threads``: ONNX Runtime intra-op threads (None: one
    per core). The session is fed only the inputs the graph declares (students take
    ``input_ids`` and ``attention_mask``; a BERT export may also take ``token_type_ids``).

    ``numpy_bag``: serve a fast student's folder (one with ``bag.safetensors``) with numpy
    (``kdpipe.serving.bag_numpy``) rather than its ONNX graph.

    Texts are tokenized as in training: special tokens added, cut to ``max_length`` tokens,
    padded on the right within each batch. ``logits`` (and so ``predict``) runs texts of
    similar token length together (``length_groups``), so a call of many texts computes
    little padding; rows come back in input order.
    """

    def __init__(self, folder: Path, threads: int | None = None,
                 batch_size: int = BATCH_SIZE, numpy_bag: bool = True) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise KdpipeError(f"{folder}: no such folder; expected an exported model "
                              "(make one with `kdpipe export`)")
        for name in (LABELS_FILE, RECORD_FILE):
            if not (folder / name).is_file():
                raise KdpipeError(f"{folder / name}: not found; {folder} is not a complete "
                                  "exported model (make one with `kdpipe export`)")
        if threads is not None and threads < 1:
            raise KdpipeError(f"Predictor threads must be >= 1 or None (got {threads})")
        self.folder = folder
        self.batch_size = batch_size
        self.threads = threads
        self.labels: list[str] = _read_labels(folder / LABELS_FILE)
        self.max_length: int = _read_max_length(folder / RECORD_FILE)
        self.tokenizer = load_tokenizer(folder)
        self.model_path = model_path(folder)
        # A torch_dynamic int8 student: served by PyTorch, not ONNX Runtime.
        self.on_torch = self.model_path.name == TORCH_DIR
        if self.on_torch:
            from kdpipe.compression.torch_int8 import (
                TorchSession,  # the one backend that needs PyTorch
            )

            self.session: Any = TorchSession(self.model_path, threads)
        else:
            self.session = ort_session(self.model_path, threads)
        self.inputs = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}
        self._check_graph()
        self.backend = (fast_backend(self.tokenizer, self.max_length)
                        if set(self.inputs) <= set(_ENCODING_FIELDS) else None)
        # Ids per memoised word (exact, for BERT tokenizers; kdpipe.serving.word_cache) where the
        # model needs nothing but ids and the mask (the students, a teacher exported without
        # token_type_ids).
        self.words = (WordCache.wrap(self.backend) if self.backend is not None
                      and set(self.inputs) <= {"input_ids", "attention_mask"} else None)
        self.bag: BagSession | None = None
        if numpy_bag:
            self.load_bag()
        self._padding = {"direction": "right", "pad_id": self.tokenizer.pad_token_id,
                         "pad_type_id": self.tokenizer.pad_token_type_id,
                         "pad_token": self.tokenizer.pad_token}

    def load_bag(self) -> BagSession | None:
        """Serve the fast student's tables (export writes them beside its graph) with numpy,
        where the folder has them and the tokenizer has a fast backend; else the graph.
        Export calls it again once it has written the tables."""
        bag = self.folder / BAG_FILE
        self.bag = BagSession(bag) if self.backend is not None and bag.is_file() else None
        if self.bag is not None and self.bag.num_labels != len(self.labels):
            raise KdpipeError(f"{bag}: gives {self.bag.num_labels} logits per text but "
                              f"{self.folder / LABELS_FILE} names {len(self.labels)} labels")
        return self.bag

    def predict(self, texts: str | Iterable[str]) -> list[Prediction]:
        """A ``Prediction`` per text, in input order (a single string gives a list of one)."""
        probabilities = self.predict_proba(texts)
        return [Prediction(self.labels[int(row.argmax())],
                           {name: float(p) for name, p in zip(self.labels, row, strict=True)})
                for row in probabilities]

    def predict_proba(self, texts: str | Iterable[str]) -> np.ndarray:
        """Class probabilities (n, C) float32, rows in input order, columns in ``labels``
        order."""
        logits = self.logits(texts)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def logits(self, texts: str | Iterable[str]) -> np.ndarray:
        """Raw model outputs (n, C) float32, rows in input order."""
        items = as_texts(texts)
        if self.bag is not None:
            # In input order, batch_size texts a call: padding costs the numpy path only a
            # masked sum, so texts are not regrouped by length as for a graph.
            ids = [e if isinstance(e, list) else e.ids for e in self._encodings(items)]
            if len(ids) <= self.batch_size:
                return self.bag.logits(ids)
            return np.concatenate([self.bag.logits(ids[i: i + self.batch_size])
                                   for i in range(0, len(ids), self.batch_size)])
        if self.backend is None or len(items) == 1:
            outputs = [self.run(feed) for feed in self.encode(items)]
            if not outputs:
                return np.zeros((0, len(self.labels)), np.float32)
            return np.concatenate(outputs)
        encodings = self._encodings(items)
        out = np.empty((len(items), len(self.labels)), np.float32)
        for rows in length_groups([len(e) for e in encodings], self.batch_size):
            out[rows] = self.run(self._feed([encodings[i] for i in rows]))
        return out

    def encode(self, texts: str | Iterable[str],
               same_width: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Session feeds (input name -> (B, L) array), ``batch_size`` texts at a time in
        input order, each padded to its longest text; with ``same_width``, every batch to
        the longest of all ``texts`` (static calibration stacks batches into one array)."""
        items = as_texts(texts)
        if self.backend is not None:
            # Encoded once: same_width needs every text's length before the first batch.
            encodings = self._encodings(items)
            width = max(map(len, encodings)) if same_width and items else None
            for start in range(0, len(items), self.batch_size):
                yield self._feed(encodings[start: start + self.batch_size], width)
            return
        width = None
        if same_width and items:
            width = max(len(ids) for ids in self.tokenizer(
                items, truncation=True, max_length=self.max_length)["input_ids"])
        for start in range(0, len(items), self.batch_size):
            batch = items[start: start + self.batch_size]
            padding = {"padding": "max_length", "max_length": width} if width else {
                "padding": True, "max_length": self.max_length}
            encoded = self.tokenizer(batch, truncation=True, return_tensors="np", **padding)
            yield {name: np.ascontiguousarray(encoded[name], dtype=dtype or np.int64)
                   for name, dtype in self.inputs.items()}

    def _encodings(self, texts: list[str]) -> list[Any]:
        """Unpadded ``tokenizers.Encoding`` per text, or its ids alone (a list) from the
        word cache. ``encode_batch`` runs on every core (rayon); with one thread asked for,
        texts are encoded one after another, so a call uses the threads it says it does."""
        if self.words is not None:
            return [self.words.ids(text) for text in texts]
        if self.threads != 1:
            return self.backend.encode_batch(texts)
        return [self.backend.encode(text) for text in texts]

    def _feed(self, encodings: list[Any], width: int | None = None) -> dict[str, np.ndarray]:
        """Encodings padded on the right to the longest (or to ``width``), as session
        inputs."""
        longest = width or max(len(e) for e in encodings)
        if self.words is not None:
            return self._feed_ids(encodings, longest)
        for encoding in encodings:
            if len(encoding) < longest:
                encoding.pad(longest, **self._padding)
        return {name: np.array([getattr(e, _ENCODING_FIELDS[name]) for e in encodings],
                               dtype=dtype or np.int64)
                for name, dtype in self.inputs.items()}

    def _feed_ids(self, rows: list[list[int]], longest: int) -> dict[str, np.ndarray]:
        """Id lists padded on the right to ``longest``, as session inputs."""
        ids, mask = pad_ids(rows, self._padding["pad_id"], longest)
        feed = {"input_ids": ids, "attention_mask": mask.astype(np.int64)}
        return {name: feed[name].astype(dtype or np.int64, copy=False)
                for name, dtype in self.inputs.items()}

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One feed (from ``encode``) through the model: logits (B, C) float32."""
        return self.session.run(["logits"], feed)[0]

    def _check_graph(self) -> None:
        path = self.model_path
        produced = set(self.tokenizer.model_input_names)
        unknown = [name for name in self.inputs if name not in produced]
        if unknown:
            raise KdpipeError(f"{path}: takes inputs {unknown} that the tokenizer in "
                              f"{self.folder} does not produce ({sorted(produced)})")
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if "logits" not in outputs:
            raise KdpipeError(f"{path}: has no output named 'logits' (has {list(outputs)})")
        width = outputs["logits"][-1]
        if isinstance(width, int) and width != len(self.labels):
            raise KdpipeError(f"{path}: gives {width} logits per text but "
                              f"{self.folder / LABELS_FILE} names {len(self.labels)} labels")


def model_path(folder: Path) -> Path:
    """The model of an exported folder: ``model.onnx``, else the ``torch`` folder of a
    torch_dynamic int8 student; a ``KdpipeError`` when neither is there."""
    if (folder / MODEL_FILE).is_file():
        return folder / MODEL_FILE
    if (folder / TORCH_DIR).is_dir():
        return folder / TORCH_DIR
    raise KdpipeError(f"{folder / MODEL_FILE}: not found; {folder} is not a complete "
                      "exported model (make one with `kdpipe export`)")


def as_texts(texts: object) -> list[str]:
    """``texts`` as a list of strings: one string, or an iterable (list, tuple, array, ...)
    of strings. Anything else is a ``KdpipeError`` saying what was given and where."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray, Mapping)) or not isinstance(texts, Iterable):
        raise KdpipeError(f"expected a string or a list of strings, got "
                          f"{type(texts).__name__}")
    items = list(texts)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise KdpipeError(f"text {i} is {type(item).__name__}, not a string: "
                              f"{_short(item)}")
    return items


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdpipeError(f"{path}: not readable JSON ({type(exc).__name__})") from None


def _read_labels(path: Path) -> list[str]:
    doc = _read_json(path)
    names = doc.get("names") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise KdpipeError(f'{path}: expected {{"names": [label, ...]}}')
    return names


def _read_max_length(path: Path) -> int:
    doc = _read_json(path)
    value = doc.get("max_length") if isinstance(doc, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KdpipeError(f"{path}: no valid max_length (got {value!r})")
    return value


def fast_backend(tokenizer: Any, max_length: int) -> Any | None:
    """A copy of a fast tokenizer's Rust backend (``tokenizers.Tokenizer``) that truncates
    as ``tokenizer(texts, truncation=True, max_length=max_length)`` does and does not pad
    (``Predictor._feed`` pads); None for a slow tokenizer or one without a padding token.

    Why: for a small student, tokenization is a large share of a call, and transformers'
    per-call Python work (argument checks, BatchEncoding, conversions) costs more than the
    encoding itself
    (``docs/decisions.md#a-word-cache-in-the-predictor``). The backend gives the same ids (tested).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.enable_truncation(max_length=max_length, direction=tokenizer.truncation_side)
    fast.no_padding()
    return fast


def length_groups(lengths: list[int], batch_size: int, min_group: int = 8,
                  slack: float = 1.25) -> list[np.ndarray]:
    """Indices into ``lengths`` in groups of similar length, shortest first: a group closes
    at ``batch_size`` texts, or, once it holds ``min_group``, when padding to the next text
    would make it compute more than ``slack`` times its real tokens.

    Why: a batch is padded to its longest text, and sentence lengths vary ~10x (SST-2
    validation in its own order pads 32-text batches to 1.8x their tokens;
    ``docs/decisions.md#the-predictor-groups-texts-by-length``); the model's
    cost grows with the padded length. ``min_group`` bounds the number of runs a call makes.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups, start, real = [], 0, 0
    for end, i in enumerate(order):
        n, size = lengths[i], end - start
        if size and (size == batch_size or
                     (size >= min_group and n * (size + 1) > slack * (real + n))):
            groups.append(order[start:end])
            start, real = end, 0
        real += n
    if len(order):
        groups.append(order[start:])
    return groups


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``, padding on the right; a ``KdpipeError`` naming the
    missing file when its config or its vocabulary (tokenizer.json or a vocabulary file) is
    not there."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / TOKENIZER_CONFIG).is_file():
        raise KdpipeError(f"{folder / TOKENIZER_CONFIG}: not found; {folder} holds no "
                          "saved tokenizer")
    if not any((folder / name).is_file() for name in (TOKENIZER_FILE, *VOCABULARY_FILES)):
        raise KdpipeError(f"{folder / TOKENIZER_FILE}: not found, nor a vocabulary file "
                          f"({', '.join(VOCABULARY_FILES)}); the tokenizer in {folder} is "
                          "incomplete")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdpipeError(f"{folder}: cannot load the tokenizer: {first}") from None
    # Students read right-padded rows (the BiLSTM takes each row's last real token at
    # length - 1), whatever side the tokenizer was saved with.
    tokenizer.padding_side = "right"
    return tokenizer
