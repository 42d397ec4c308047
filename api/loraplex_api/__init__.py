"""The loraplex custom resources as pydantic models: the one definition of spec and status."""

from . import wire
from .common import API_VERSION, GROUP, VERSION, Condition, ObjectMeta, now_rfc3339, parse_quantity
from .experiment import (
    AdapterRevision,
    AlgorithmSpec,
    DatasetSpec,
    DataSource,
    LoRAExperiment,
    LoRAExperimentSpec,
    LoRAExperimentStatus,
    LoRASpec,
    OptimizerSpec,
    RewardSource,
    RewardSpec,
    TrainingStatus,
)
from .manifests import (
    Manifest,
    ManifestError,
    Problem,
    load_manifests,
    parse_document,
    rank_problem,
    reward_memory_problems,
)
from .pool import SharedBasePool, SharedBasePoolSpec, SharedBasePoolStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AdapterRevision",
    "AlgorithmSpec",
    "Condition",
    "DataSource",
    "DatasetSpec",
    "LoRAExperiment",
    "LoRAExperimentSpec",
    "LoRAExperimentStatus",
    "LoRASpec",
    "Manifest",
    "ManifestError",
    "ObjectMeta",
    "OptimizerSpec",
    "Problem",
    "RewardSource",
    "RewardSpec",
    "SharedBasePool",
    "SharedBasePoolSpec",
    "SharedBasePoolStatus",
    "TrainingStatus",
    "load_manifests",
    "now_rfc3339",
    "parse_document",
    "parse_quantity",
    "rank_problem",
    "reward_memory_problems",
    "wire",
]
