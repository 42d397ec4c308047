"""LoRAExperiment: one RL experiment, trained as one LoRA adapter on a pool's base model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from .common import (
    CONDITIONS_FIELD,
    MESSAGE_MAX,
    NAME_MAX,
    PRESERVE_OBJECT,
    SHORT_STRING_MAX,
    URI_MAX,
    CamelModel,
    Condition,
    ConfigMapKeyRef,
    Name,
    ObjectMeta,
    Quantity,
    StatusModel,
    Timestamp,
    camel_config,
    cel_rules,
    exactly_one,
    fixed,
    one_of_rule,
)
from .patterns import PatternError, compile_pattern
from .wire import API_VERSION, EXPERIMENT_KIND

BUILTIN_DATASETS = ("arithmetic", "sort_numbers", "count_letters")
BUILTIN_REWARDS = ("exact_match", "numeric_match", "regex_match", "format", "length", "contains_answer")
ALL_LINEAR = "all-linear"

_OBJECT = PRESERVE_OBJECT
_SCALAR_ARGS = dict[str, str | int | float | bool]
_ARGS_SCHEMA: JsonDict = {**PRESERVE_OBJECT, "maxProperties": 32}


def _one_of(*fields: str, where: str) -> ConfigDict:
    return camel_config(json_schema_extra=cel_rules(one_of_rule(fields, where)))


class PoolRef(CamelModel):
    """The SharedBasePool whose base model this experiment fine-tunes."""

    name: Name


class LoRASpec(CamelModel):
    """Shape of the adapter."""

    model_config = camel_config(
        json_schema_extra=cel_rules(
            {
                # Guarded with has(): the field is optional, and the API server evaluates the rule
                # before any default, so an unguarded read fails every lora block without it.
                "rule": f"!has(self.targetModules) || !('{ALL_LINEAR}' in self.targetModules) "
                "|| size(self.targetModules) == 1",
                "message": f"targetModules: '{ALL_LINEAR}' cannot be combined with other modules",
            }
        )
    )

    rank: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32.0, gt=0, le=4096)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: [ALL_LINEAR],
        min_length=1,
        max_length=32,
        description=f"Module name suffixes (q_proj, v_proj, ...) or the single entry {ALL_LINEAR!r}.",
        json_schema_extra={"items": {"type": "string", "maxLength": 64, "minLength": 1}},
    )

    @model_validator(mode="after")
    def _all_linear_alone(self) -> LoRASpec:
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"targetModules: {ALL_LINEAR!r} cannot be combined with other modules")
        return self

    @property
    def targets(self) -> tuple[str, ...] | str:
        """Target modules as the trainer and scheduler take them: a tuple of suffixes or 'all-linear'."""
        return ALL_LINEAR if self.target_modules == [ALL_LINEAR] else tuple(self.target_modules)


class BuiltinDataset(CamelModel):
    """A synthetic verifiable task generated from a seed."""

    name: Literal[BUILTIN_DATASETS]  # type: ignore[valid-type]
    size: int = Field(default=1000, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    args: _SCALAR_ARGS = Field(default_factory=dict, max_length=32, json_schema_extra=_ARGS_SCHEMA)


class DataSource(CamelModel):
    """Exactly one place rows come from."""

    model_config = _one_of("builtin", "inline", "file", "configMap", where="dataset")

    builtin: BuiltinDataset | None = None
    inline: list[dict[str, Any]] | None = Field(
        default=None, min_length=1, max_length=1000, json_schema_extra={"items": _OBJECT}
    )
    file: str | None = Field(
        default=None,
        min_length=1,
        max_length=URI_MAX,
        description="A JSONL file: relative to the manifest's folder standalone, on the pool's storage in a cluster.",
    )
    config_map: ConfigMapKeyRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        exactly_one(self, ("builtin", "inline", "file", "config_map"))
        return self


class DatasetSpec(DataSource):
    """Training rows, how to read them, and where the eval rows come from."""

    model_config = camel_config(
        json_schema_extra=cel_rules(
            one_of_rule(("builtin", "inline", "file", "configMap"), "dataset"),
            {
                "rule": "!has(self.eval) || !has(self.evalFraction) || self.evalFraction == 0.0",
                "message": "dataset: set evalFraction or eval, not both",
            },
        )
    )

    prompt_field: str = Field(default="prompt", min_length=1, max_length=SHORT_STRING_MAX)
    answer_field: str = Field(default="answer", min_length=1, max_length=SHORT_STRING_MAX)
    chat_template: bool = Field(
        default=False, description="Wrap each prompt in the tokenizer's chat template."
    )
    system_prompt: str | None = Field(default=None, max_length=8192)
    eval_fraction: float = Field(default=0.0, ge=0.0, le=0.5)
    eval: DataSource | None = None

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("eval: set evalFraction or eval, not both")
        return self


class BuiltinReward(CamelModel):
    """A reward implemented inside the trainer."""

    name: Literal[BUILTIN_REWARDS]  # type: ignore[valid-type]
    args: _SCALAR_ARGS = Field(default_factory=dict, max_length=32, json_schema_extra=_ARGS_SCHEMA)

    @model_validator(mode="after")
    def _pattern_for_regex(self) -> BuiltinReward:
        if self.name not in ("regex_match", "format"):
            return self
        pattern = self.args.get("pattern")
        if pattern is None:
            raise ValueError(f"args.pattern: required by the {self.name} reward")
        if not isinstance(pattern, str):
            raise ValueError(f"args.pattern: {pattern!r} is not a string")
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            raise ValueError(f"args.pattern: {exc}") from None
        return self


class PythonReward(CamelModel):
    """The user's ``def f(prompt, completion, row) -> float``, run in a separate worker process."""

    model_config = _one_of("file", "configMap", where="reward.python")

    file: str | None = Field(default=None, min_length=1, max_length=URI_MAX)
    config_map: ConfigMapKeyRef | None = None
    function: str = Field(default="reward", max_length=SHORT_STRING_MAX, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    memory: Quantity | None = Field(
        default=None,
        description="The worker's address space; default the pool's trainer.rewardLimits.memory.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PythonReward:
        exactly_one(self, ("file", "config_map"))
        return self


class HTTPReward(CamelModel):
    """An external reward service: POST JSON in, JSON out."""

    url: str = Field(max_length=URI_MAX, pattern=r"^https?://[^\s]+$")
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)


class RewardSource(CamelModel):
    """Exactly one reward implementation."""

    model_config = _one_of("builtin", "python", "http", where="reward")

    builtin: BuiltinReward | None = None
    python: PythonReward | None = None
    http: HTTPReward | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSource:
        exactly_one(self, ("builtin", "python", "http"))
        return self


class RewardTerm(RewardSource):
    """One weighted term of a summed reward."""

    weight: float = Field(default=1.0, ge=-1000, le=1000)


class RewardSpec(CamelModel):
    """One reward source, or ``terms``: a weighted sum of several."""

    model_config = _one_of("builtin", "python", "http", "terms", where="reward")

    builtin: BuiltinReward | None = None
    python: PythonReward | None = None
    http: HTTPReward | None = None
    terms: list[RewardTerm] | None = Field(default=None, min_length=1, max_length=16)

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSpec:
        exactly_one(self, ("builtin", "python", "http", "terms"))
        return self


class AlgorithmSpec(CamelModel):
    """GRPO hyperparameters."""

    name: Literal["grpo"] = "grpo"
    group_size: int = Field(default=8, ge=2, le=256, description="Samples per prompt.")
    prompts_per_step: int = Field(default=4, ge=1, le=1024)
    max_steps: int = Field(default=100, ge=1, le=1_000_000)
    max_prompt_tokens: int = Field(default=256, ge=1, le=131072, description="Longer prompts are truncated.")
    max_new_tokens: int = Field(default=64, ge=1, le=131072)
    temperature: float = Field(default=1.0, ge=0.0, le=4.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    clip_low: float = Field(default=0.2, ge=0.0, le=1.0)
    clip_high: float = Field(default=0.28, ge=0.0, le=10.0)
    kl_coef: float = Field(default=0.0, ge=0.0, le=100.0)
    loss_aggregation: Literal["token-mean", "seq-mean", "seq-mean-token-sum"] = "token-mean"
    scale_rewards: bool = Field(default=True, description="Divide advantages by the group's reward std.")
    seed: int = Field(default=0, ge=0)


class OptimizerSpec(CamelModel):
    """AdamW settings, private to this experiment's adapter."""

    learning_rate: float = Field(default=5e-5, gt=0, le=1.0)
    betas: list[float] = Field(
        default_factory=lambda: [0.9, 0.999],
        min_length=2,
        max_length=2,
        json_schema_extra={"items": {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMaximum": True}},
    )
    eps: float = Field(default=1e-8, gt=0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6)

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerSpec:
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}]: {beta} must be in [0, 1)")
        return self


class EvaluationSpec(CamelModel):
    """Periodic evaluation on the eval split (greedy decoding)."""

    every_steps: int = Field(default=0, ge=0, le=1_000_000, description="0 = only at the end.")
    samples: int = Field(default=32, ge=1, le=100_000)


class CheckpointSpec(CamelModel):
    """Periodic checkpoints in PEFT format plus optimizer and RNG state."""

    every_steps: int = Field(default=10, ge=1, le=1_000_000)
    keep_last: int = Field(default=3, ge=1, le=100)


class PromotionSpec(CamelModel):
    """How a checkpoint becomes the promoted (served) adapter."""

    policy: Literal["Manual", "Auto"] = "Manual"
    metric: str = Field(default="eval_reward", max_length=SHORT_STRING_MAX)
    threshold: float | None = None
    promoted_revision: str | None = Field(
        default=None,
        max_length=NAME_MAX,
        description="Set by a person or by Git to promote this revision; the previous one rolls back.",
    )


class LoRAExperimentSpec(CamelModel):
    """Desired state of one experiment."""

    pool_ref: PoolRef
    lora: LoRASpec = Field(default_factory=LoRASpec)
    dataset: DatasetSpec
    reward: RewardSpec
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    priority: int = Field(default=0, ge=-1000, le=1000)
    suspend: bool = False
    backoff_limit: int = Field(default=3, ge=0, le=100)
    active_deadline_seconds: int | None = Field(default=None, ge=1)


Phase = Literal["Pending", "Placed", "Training", "Suspended", "Succeeded", "Failed"]
TrainingState = Literal["Loading", "Running", "Interrupted", "Completed", "Failed"]
"""Interrupted: the replica stopped on a signal after checkpointing; the experiment resumes elsewhere."""


class Placement(StatusModel):
    """Where the operator placed the experiment."""

    pool: str = Field(max_length=NAME_MAX)
    replica: str = Field(max_length=NAME_MAX + 8)
    placed_at: Timestamp | None = None
    replica_incarnation: str | None = Field(default=None, max_length=64)
    """The replica's pod as last seen: ``<pod uid>/<container restarts>``; a change is a restart."""


class MetricValue(StatusModel):
    """One reported metric; the value is a string so printer columns can show it as-is."""

    name: str = Field(max_length=64)
    value: str = Field(max_length=64)


class TrainingStatus(StatusModel):
    """Progress as the trainer replica reports it."""

    state: TrainingState
    step: int = 0
    total_steps: int = 0
    progress_percentage: int = 0
    estimated_remaining_seconds: int | None = None
    last_heartbeat_time: Timestamp | None = None
    metrics: list[MetricValue] = Field(default_factory=list, max_length=32)
    message: str = Field(default="", max_length=MESSAGE_MAX)

    def metric(self, name: str) -> float | None:
        """The named metric as a float, or None when absent or not a number."""
        for m in self.metrics:
            if m.name == name:
                try:
                    return float(m.value)
                except ValueError:
                    return None
        return None


class AdapterRevision(StatusModel):
    """A checkpoint that can be served."""

    revision: str = Field(max_length=NAME_MAX)
    uri: str = Field(max_length=URI_MAX)
    step: int = 0
    metric: float | None = None


class AdapterStatus(StatusModel):
    """Pointers: the newest candidate, the promoted revision and the one it replaced."""

    candidate: AdapterRevision | None = None
    promoted: AdapterRevision | None = None
    previous: AdapterRevision | None = None


class LoRAExperimentStatus(StatusModel):
    """Observed state of one experiment."""

    observed_generation: int | None = None
    phase: Phase | None = None
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_FIELD
    )
    placement: Placement | None = None
    training: TrainingStatus | None = None
    adapter: AdapterStatus | None = None
    restarts: int = 0
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None


class LoRAExperiment(CamelModel):
    """One RL experiment = one adapter."""

    model_config = camel_config(extra="ignore")

    api_version: str = fixed(API_VERSION)
    kind: str = fixed(EXPERIMENT_KIND)
    metadata: ObjectMeta
    spec: LoRAExperimentSpec
    status: LoRAExperimentStatus = Field(default_factory=LoRAExperimentStatus)
