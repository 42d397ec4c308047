"""SharedBasePool: a pool of identical trainer replicas, each hosting one frozen base model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .common import (
    CONDITIONS_FIELD,
    NAME_MAX,
    PRESERVE_OBJECT,
    SHORT_STRING_MAX,
    URI_MAX,
    CamelModel,
    Condition,
    LabelValue,
    ObjectMeta,
    Quantity,
    SecretKeyRef,
    StatusModel,
    Timestamp,
    camel_config,
    fixed,
    parse_quantity,
)
from .wire import API_VERSION, POOL_KIND

MODEL_URI_PATTERN = r"^(hf://[^/\s]+/[^\s]+|file:///[^\s]*|pvc://[^/\s]+/[^\s]*|builtin://[a-z0-9.-]+)$"
BUILTIN_MODELS = ("smollm2-135m-instruct",)
DEFAULT_TRAINER_IMAGE = "ghcr.io/loraplex/trainer:0.1.0"

_OBJECT = PRESERVE_OBJECT


class ModelSpec(CamelModel):
    """The frozen base model every replica of the pool hosts."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._/:-]*[A-Za-z0-9])?$",
        description="Display and serving name of the base model; Hugging Face names such as "
        "Qwen/Qwen2.5-7B-Instruct are fine. Not a Kubernetes name: where one is needed, a safe form is derived.",
    )
    uri: str = Field(
        max_length=URI_MAX,
        pattern=MODEL_URI_PATTERN,
        description="hf://org/name, file:///path, pvc://claim/path or builtin://smollm2-135m-instruct.",
    )
    revision: str | None = Field(default=None, max_length=SHORT_STRING_MAX)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto = bfloat16 on GPUs that support it, float32 on CPU."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding a Hugging Face token (gated or private hf:// models); "
        "the trainer gets it as HF_TOKEN.",
    )

    @model_validator(mode="after")
    def _known_builtin(self) -> ModelSpec:
        if self.uri.startswith("builtin://") and self.uri.removeprefix("builtin://") not in BUILTIN_MODELS:
            raise ValueError(f"uri: unknown builtin model {self.uri!r}; known: {', '.join(BUILTIN_MODELS)}")
        return self


class AutoscalingSpec(CamelModel):
    """Bounds within which the operator may change spec.replicas."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must be <= maxReplicas",
                }
            ]
        }
    }

    enabled: bool = False
    min_replicas: int = Field(default=0, ge=0, le=256)
    max_replicas: int = Field(default=4, ge=1, le=256)
    scale_down_delay_seconds: int = Field(default=300, ge=0, le=86400)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas {self.min_replicas} must be <= maxReplicas {self.max_replicas}")
        return self


class CapacitySpec(CamelModel):
    """What one replica may host."""

    max_adapters_per_replica: int = Field(default=8, ge=1, le=256)
    max_lora_rank: int = Field(default=64, ge=1, le=1024, alias="maxLoRARank")
    adapter_memory_budget: Quantity | None = Field(
        default=None,
        description="Per replica: bytes for adapters, their gradients and optimizer state, and rollout buffers.",
    )

    @property
    def adapter_memory_budget_bytes(self) -> int | None:
        """The budget in bytes, or None when unlimited."""
        return None if self.adapter_memory_budget is None else parse_quantity(self.adapter_memory_budget)


class VLLMSpec(CamelModel):
    """Settings of the vLLM rollout engine."""

    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=0.95)
    max_model_len: int | None = Field(default=None, ge=64, le=1_048_576)
    enforce_eager: bool = False


class EnvVar(CamelModel):
    """A container environment variable (value or valueFrom, as in a Pod)."""

    model_config = camel_config(extra="allow")

    name: str = Field(min_length=1, max_length=SHORT_STRING_MAX)
    value: str | None = Field(default=None, max_length=32768)
    value_from: dict[str, Any] | None = Field(default=None, json_schema_extra=_OBJECT)


class ResourceRequirements(CamelModel):
    """Container resources, as in a Pod (nvidia.com/gpu goes in limits)."""

    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)


class RewardLimitsSpec(CamelModel):
    """What each experiment's Python reward worker may use on this pool's replicas."""

    memory: Quantity = Field(
        default="2Gi", description="Address space per worker unless an experiment asks for other."
    )
    max_memory: Quantity = Field(
        default="8Gi", description="The most an experiment's reward.python.memory may ask for."
    )
    processes: int = Field(
        default=32, ge=1, le=4096, description="Processes per worker (its own and its children)."
    )

    @model_validator(mode="after")
    def _within_max(self) -> RewardLimitsSpec:
        if parse_quantity(self.memory) > parse_quantity(self.max_memory):
            raise ValueError(f"memory: {self.memory} exceeds maxMemory {self.max_memory}")
        return self


class TrainerSpec(CamelModel):
    """The trainer pod template."""

    image: str = Field(default=DEFAULT_TRAINER_IMAGE, max_length=URI_MAX)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, max_length=32, json_schema_extra={"items": _OBJECT}
    )
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra=_OBJECT)
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    service_account_name: str | None = Field(default=None, max_length=253)
    priority_class_name: str | None = Field(default=None, max_length=253)
    rollout_engine: Literal["auto", "vllm", "torch"] = Field(
        default="auto", description="auto = vllm when a GPU and vLLM are present, else torch."
    )
    vllm: VLLMSpec = Field(default_factory=VLLMSpec)
    reward_limits: RewardLimitsSpec = Field(default_factory=RewardLimitsSpec)
    report_to: list[Literal["tensorboard", "mlflow", "none"]] = Field(
        default_factory=list,
        max_length=3,
        description="Per-experiment scalars to TensorBoard (event files under the pool's storage, "
        "tracking/<namespace>/tensorboard) and/or MLflow ($MLFLOW_TRACKING_URI from trainer.env, "
        "else a file store under tracking/<namespace>/mlruns).",
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="A Kueue LocalQueue: the StatefulSet and its pods are labelled kueue.x-k8s.io/queue-name.",
    )


class StorageSpec(CamelModel):
    """Where adapters, optimizer state and checkpoints go; shared by all replicas of the pool."""

    claim_name: str | None = Field(
        default=None,
        max_length=253,
        description="A ReadWriteMany PVC. Without one, checkpoints live in an emptyDir and die with the pod.",
    )
    sub_path: str = Field(default="", max_length=URI_MAX, pattern=r"^[^.][^\s]*$|^$")


SERVING_RESERVED_ARGS = (
    "--host", "--port", "--served-model-name", "--enable-lora", "--max-loras", "--max-lora-rank",
    "--max-cpu-loras", "--api-server-count", "--model", "--tokenizer", "--lora-modules", "--dtype",
)  # fmt: skip
"""What loraplex sets for `vllm serve` itself: vLLM must listen on localhost only (its LoRA
endpoints have no authentication), and the proxy must know the names it serves."""


class ServingSpec(CamelModel):
    """An OpenAI-compatible vLLM server answering with each experiment's promoted adapter."""

    enabled: bool = False
    replicas: int = Field(default=1, ge=0, le=64)
    image: str | None = Field(
        default=None, max_length=URI_MAX, description="Default: the trainer image, which has vLLM."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, max_length=32, json_schema_extra={"items": _OBJECT}
    )
    max_loras: int = Field(
        default=8, ge=1, le=256, description="Adapters vLLM batches at once (--max-loras)."
    )
    max_lora_rank: int | None = Field(
        default=None, ge=1, le=1024, alias="maxLoRARank", description="Default: capacity.maxLoRARank."
    )
    port: int = Field(default=8000, ge=1024, le=65535)
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding an API key: /v1 requests must then send it as a bearer token "
        "(the OpenAI clients' api_key). Health and /loraplex/served stay open to probes and the operator.",
    )
    args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list,
        max_length=64,
        description="More `vllm serve` arguments (not the ones loraplex sets: "
        + ", ".join(SERVING_RESERVED_ARGS)
        + ").",
    )

    @model_validator(mode="after")
    def _own_args(self) -> ServingSpec:
        for index, arg in enumerate(self.args):
            if arg.split("=", 1)[0] in SERVING_RESERVED_ARGS:
                raise ValueError(
                    f"args[{index}]: {arg.split('=', 1)[0]} is set by loraplex and cannot be overridden"
                )
        return self


class SharedBasePoolSpec(CamelModel):
    """Desired state of a pool."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.serving) || !has(self.serving.enabled) || !self.serving.enabled "
                    "|| (has(self.storage) && has(self.storage.claimName))",
                    "message": "serving.enabled needs storage.claimName: serving pods read the checkpoints there",
                }
            ]
        }
    }

    model: ModelSpec
    replicas: int = Field(default=1, ge=0, le=256)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    capacity: CapacitySpec = Field(default_factory=CapacitySpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    suspend: bool = False

    @model_validator(mode="after")
    def _serving_storage(self) -> SharedBasePoolSpec:
        if self.serving.enabled and not self.storage.claim_name:
            raise ValueError(
                "serving.enabled needs storage.claimName: serving pods read the checkpoints there"
            )
        return self


class PoolCapacityStatus(StatusModel):
    """Slot and memory accounting over all replicas."""

    adapter_slots: int = 0
    used_slots: int = 0
    pending_experiments: int = 0
    memory_bytes: int | None = None
    used_memory_bytes: int | None = None


class LinearModuleFacts(StatusModel):
    """Shape of one kind of linear module (e.g. q_proj) and how many layers have it."""

    in_features: int = Field(alias="in")
    out_features: int = Field(alias="out")
    count: int


class ModelProblem(StatusModel):
    """Why a trainer could not get its base model; it tries again without restarting."""

    reason: str = Field(max_length=64)
    """ModelNotFound, ModelAccessDenied, ModelNotCached or ModelDownloadFailed."""
    message: str = Field(max_length=1024)
    uri: str = Field(max_length=URI_MAX)
    since: Timestamp | None = None


class ModelFactsStatus(StatusModel):
    """Facts the trainer measured when it loaded the base model (for memory estimates)."""

    parameter_count: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    linear_modules: dict[str, LinearModuleFacts] = Field(default_factory=dict, max_length=64)
    lora_bytes_per_rank: dict[str, int] = Field(default_factory=dict, max_length=64)
    problem: ModelProblem | None = None
    """Set while the model cannot be had (the facts above are then absent or from an earlier load)."""
    rollout_engine: Literal["torch", "vllm"] | None = None
    """The engine the trainer runs (spec.trainer.rolloutEngine resolved on its device)."""


class ReplicaStatus(StatusModel):
    """One StatefulSet replica as the operator sees it."""

    name: str = Field(max_length=NAME_MAX + 8)
    ready: bool = False
    adapters: int = 0


class ServedAdapter(StatusModel):
    """One experiment's adapter as a serving replica answers with it."""

    experiment: str = Field(max_length=NAME_MAX)
    revision: str = Field(max_length=SHORT_STRING_MAX)
    since: Timestamp | None = None


class ServingStatus(StatusModel):
    """The pool's serving Deployment as the operator sees it."""

    replicas: int = 0
    ready_replicas: int = 0
    endpoint: str | None = Field(default=None, max_length=URI_MAX)
    """The OpenAI base URL inside the cluster."""
    adapters: list[ServedAdapter] = Field(default_factory=list, max_length=256)
    """What a ready serving replica answers with, read from its /loraplex/served."""


class SharedBasePoolStatus(StatusModel):
    """Observed state of a pool (the operator writes all but ``model``)."""

    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_FIELD
    )
    replicas: int = 0
    ready_replicas: int = 0
    selector: str = Field(default="", max_length=1024)
    capacity: PoolCapacityStatus = Field(default_factory=PoolCapacityStatus)
    model: ModelFactsStatus | None = None
    replica_status: list[ReplicaStatus] = Field(default_factory=list, max_length=256)
    serving: ServingStatus | None = None


class SharedBasePool(CamelModel):
    """A pool of trainer replicas sharing one base model."""

    model_config = camel_config(extra="ignore")

    api_version: str = fixed(API_VERSION)
    kind: str = fixed(POOL_KIND)
    metadata: ObjectMeta
    spec: SharedBasePoolSpec
    status: SharedBasePoolStatus = Field(default_factory=SharedBasePoolStatus)
