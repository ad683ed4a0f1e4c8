"""Training configuration: validated once on the driver, then passed to workers as plain values.

Defaults suit a 2-core laptop (two CPU workers, small model, a few epochs). Unknown keys are
refused, so a typo in a YAML file is an error that names the key instead of a silent default.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from aiplatform.core.errors import ConfigError
from aiplatform.core.schemas import EVENT_TYPES


def _known_event_type(v: str) -> str:
    if v not in EVENT_TYPES:
        raise ValueError(f"must be one of {', '.join(EVENT_TYPES)}")
    return v


EventTypeName = Annotated[str, AfterValidator(_known_event_type)]
"""An event type of docs/architecture.md's schema (view, click, add_to_cart, purchase)."""


class QualityGates(BaseModel):
    """What a new model must reach on the held-out days to become ``challenger``.

    Lifts are ratios of recall@eval_k (model / baseline): 1.0 means "at least as good as the
    baseline", 0 turns a gate off. A model that fails a gate is still registered (its metrics
    are worth keeping) but gets no alias.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_recall_lift_over_popularity: float = Field(
        1.0, ge=0, description="recall@k of the model / recall@k of the popularity ranking, at least")
    min_recall_lift_over_cooccurrence: float = Field(
        0.95, ge=0, description="recall@k of the model / recall@k of item-to-item co-occurrence, at least")
    min_coverage: float = Field(
        0.0, ge=0, le=1.0, description="share of the catalogue in at least one validation user's top k, at least")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel replicas)")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: PACK fills a node first; STRICT_SPREAD puts each "
                            "worker on its own node (fails when there are fewer nodes than workers)")
    batch_size: int = Field(512, ge=2, description="Examples per step per worker (in-batch negatives)")
    epochs: int = Field(3, ge=1)
    lr: float = Field(3e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    dim: int = Field(64, ge=4, le=1024, description="Embedding size of both towers")
    temperature: float = Field(0.1, gt=0, le=10.0, description="Softmax temperature on cosine logits "
                               "(0.1: recall@10 0.298/0.299 on two seeds vs 0.295 at 0.05, shop scale 1)")
    logq_correction: bool = Field(True, description="Subtract log item frequency from in-batch logits (Yi et al., 2019)")
    price_buckets: int = Field(10, ge=1, le=1000, description="Quantile buckets of item price")
    seed: int = Field(0, ge=0)
    holdout_days: int = Field(7, ge=1, description="Days at the end of the event log held out for evaluation "
                                                   "(the global time split)")
    min_validation_users: int = Field(
        500, ge=1, description="The time split is used when it leaves at least min(this, all users) validation "
                               "users, else each user's last holdout_fraction of events is held out; gates never "
                               "decide on fewer (the model is then not promoted unless --promote)")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each user's events held out by the "
                                                                 "per-user split")
    min_event_type: EventTypeName = Field("view", description="Weakest event type that becomes a training target")
    global_shuffle: bool = Field(
        False, description="Re-shuffle all examples every epoch (slow on small clusters); "
                           "False: shuffle once, then a local buffer per worker each epoch"
    )
    shuffle_buffer: int = Field(0, ge=0, description="Per-worker local shuffle buffer (rows); 0 = off. The examples "
                                                     "are shuffled once globally; a buffer re-mixes every epoch but cost "
                                                     "15% of samples/s with 1 worker for no recall gain on the shop data")
    max_failures: int = Field(0, ge=-1, description="Worker-failure restarts from the last checkpoint")
    eval_k: int = Field(10, ge=1, description="k of recall@k / ndcg@k")
    # ---- quality (model inputs, evaluation depth, promotion gates) ----
    history_feature: str = Field(
        "last_items", min_length=1, description="List feature of the served feature service that holds the user's "
                                                "recent items (a last_n aggregation; its n is the history length)")
    exclude_feature: str | None = Field(
        "purchased_items", description="List feature of the served feature service whose items are never "
                                       "recommended to that user; null: exclude nothing")
    title_buckets: int = Field(512, ge=0, le=1 << 20, description="Hash buckets of item-title words; 0 = no titles")
    eval_k_large: int = Field(50, ge=1, description="the larger k of recall@k (candidate-generation depth)")
    gates: QualityGates = Field(default_factory=QualityGates, description="What a model needs to become challenger")
    ranker: bool = Field(True, description="Also fit the candidate ranker: candidates from the two-tower, "
                                           "co-occurrence, EASE, popularity and category sources, merged and ordered "
                                           "by LightGBM LambdaRank (served with the model)")
    ranker_min_ndcg_gain: float = Field(
        0.0, ge=-1.0, le=10.0, description="The candidate ranker travels with the model only when the merged and "
                                           "ranked pipeline beats the two-tower alone on NDCG@eval_k of the validation "
                                           "users by more than this share: 0 = any gain, -1 = always")
    # ---- reliability (checkpoints, validation, precision) ----
    checkpoints_to_keep: int = Field(
        2, ge=1, description="Checkpoints kept per run: the best by checkpoint_metric (the latest is always kept too)"
    )
    validation_fraction: float = Field(
        0.05, ge=0.0, le=0.5, description="Share of the encoded examples held out for the per-epoch "
                                          "validation metric; 0 = none (keep and return the latest checkpoints)"
    )
    checkpoint_metric: Literal["val_loss", "val_recall"] = Field(
        "val_loss", description="Validation metric that ranks checkpoints: val_loss (full-catalogue softmax "
                                "cross-entropy, lower is better) or val_recall (recall@eval_k, higher is better)"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU; bf16/fp32 force one"
    )

    def __init__(self, **values: Any) -> None:
        # Construction from code, YAML or a dict all fail the same way: a ConfigError naming the field.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, TrainConfig, "training config")) from exc

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "TrainConfig":
        """Validate a mapping; a ``ConfigError`` names every bad field and what it expects."""
        return cls(**(values or {}))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a YAML mapping (either the fields themselves or under a ``train:`` key)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of training settings, got {type(data).__name__}")
        if isinstance(data.get("train"), dict):
            data = data["train"]
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _describe(exc: ValidationError, model: type[BaseModel], what: str) -> str:
    """One sentence per bad field: which one, what is wrong, what was given; for an unknown
    key, the valid ones (a typo in YAML is the usual cause)."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(x) for x in err.get("loc", ())) or "(config)"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            nested = err.get("loc", ())[:1] == ("gates",) and model is TrainConfig
            msg = "unknown setting; valid ones are " + ", ".join((QualityGates if nested else model).model_fields)
        parts.append(f"{what} field '{field}': {msg} (got {err.get('input')!r})")
    return "; ".join(parts)
