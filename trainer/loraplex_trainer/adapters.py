"""Many LoRA adapters on one frozen model: injection, the adapter registry and PEFT-format files.

Like PEFT's ``tuners/lora/model.py``: this module decides where MultiLoRALinear layers go and keeps
track of adapters by name; the arithmetic is in ``multilora.py``. Files written here are PEFT's own
format (adapter_config.json + adapter_model.safetensors), so ``peft.PeftModel.from_pretrained`` and
vLLM load them unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from loraplex_trainer.model_host import lora_target_linears
from loraplex_trainer.multilora import ALL_LINEAR, AdapterConfig, AdapterRouting, LoRAPath, MultiLoRALinear

logger = logging.getLogger(__name__)

# PEFT's prefix for a causal LM: PeftModelForCausalLM.base_model (LoraModel).model (the HF model).
PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str]) -> None:
    """safetensors' save_file, raising OSError (with its errno, e.g. ENOSPC) when the write fails.

    safetensors reports I/O errors as its own exception type; callers that handle a full or
    read-only disk look for OSError.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"(?:os error|code:) (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None


class MultiLoRAModel(nn.Module):
    """A frozen Hugging Face model whose linear layers serve many named LoRA adapters at once."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if any(isinstance(module, MultiLoRALinear) for module in model.modules()):
            raise ValueError("model already holds MultiLoRALinear layers; wrap a model only once")
        model.requires_grad_(False)
        self.model = model
        # module path (e.g. "model.layers.0.self_attn.q_proj") -> its layer; the layers themselves
        # are registered under self.model, this is only an index.
        self.layers: dict[str, MultiLoRALinear] = {}
        for path, linear in lora_target_linears(model).items():
            parent_path, _, attribute = path.rpartition(".")
            layer = MultiLoRALinear(linear)
            setattr(model.get_submodule(parent_path), attribute, layer)
            self.layers[path] = layer
        self.configs: dict[str, AdapterConfig] = {}
        self.routing: AdapterRouting | None = None
        self.lora_path: LoRAPath = "auto"
        """How the layers apply a batch's adapters (multilora.LoRAPath): batched on CUDA by default."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model; which adapter each row uses is set by use_adapters."""
        return self.model(*args, **kwargs)

    # --- the registry ---

    def add_adapter(
        self, name: str, config: AdapterConfig, *, seed: int | None = None, zero: bool = False
    ) -> None:
        """Add a new adapter with PEFT's initialisation; ``zero`` makes it a no-op (A and B zero)."""
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists; remove it first")
        paths = self.target_paths(config.target_modules)
        # One generator walked through the layers in model order: the same seed gives the same A.
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for path in paths:
            self.layers[path].add_adapter(name, config, generator=generator, zero=zero)
        self.configs[name] = config
        logger.info(
            "adapter added name=%s rank=%d alpha=%g dropout=%g layers=%d parameters=%d",
            name,
            config.rank,
            config.alpha,
            config.dropout,
            len(paths),
            sum(p.numel() for p in self.adapter_parameters(name)),
        )

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter and every reference to its parameters, so their memory can be freed."""
        self.adapter_config(name)  # a clear KeyError for an unknown name
        for layer in self.layers.values():
            if name in layer.lora_A:
                layer.remove_adapter(name)
        del self.configs[name]
        logger.info("adapter removed name=%s", name)

    def adapter_names(self) -> list[str]:
        """Return the adapters' names in the order they were added."""
        return list(self.configs)

    def adapter_config(self, name: str) -> AdapterConfig:
        """Return the configuration an adapter was added with."""
        if name not in self.configs:
            raise KeyError(f"no adapter named {name!r}; adapters: {self.adapter_names()}")
        return self.configs[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Return an adapter's parameters (A then B of each layer, in model order), e.g. for its optimizer."""
        return list(self.adapter_named_parameters(name).values())

    def adapter_named_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Return an adapter's parameters keyed by PEFT's names, in the order of adapter_parameters."""
        self.adapter_config(name)
        named: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            if name in layer.lora_A:
                named[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].get_parameter("weight")
                named[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].get_parameter("weight")
        return named

    def target_paths(self, target_modules: tuple[str, ...] | str) -> list[str]:
        """Return the paths of the layers an adapter targets, matching suffixes as PEFT does."""
        if target_modules == ALL_LINEAR:
            return list(self.layers)
        paths: list[str] = []
        for target in target_modules:
            matched = [path for path in self.layers if path == target or path.endswith(f".{target}")]
            if not matched:
                suffixes = sorted({path.rsplit(".", 1)[-1] for path in self.layers})
                raise ValueError(
                    f"lora target module {target!r} matches no linear layer of this model; "
                    f"available: {suffixes} or {ALL_LINEAR!r}"
                )
            paths += [path for path in matched if path not in paths]
        # Model order, whatever order the targets were listed in, so the seeded init is stable.
        return [path for path in self.layers if path in paths]

    # --- routing rows to adapters ---

    @contextmanager
    def use_adapters(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Within the block, row i of every forward uses adapter ``rows[i]`` (None: the base only).

        backward() may run after the block: the autograd graph keeps the routing it was built
        with. Only recomputing forwards (gradient checkpointing) need backward inside the block.
        """
        unknown = sorted({name for name in rows if name is not None and name not in self.configs})
        if unknown:
            raise KeyError(f"use_adapters: no adapters named {unknown}; adapters: {self.adapter_names()}")
        device = next(self.model.parameters()).device
        previous = self.routing
        batched = self.lora_path == "batched" or (self.lora_path == "auto" and device.type == "cuda")
        self.set_routing(AdapterRouting.from_rows(rows, device, batched=batched))
        try:
            yield
        finally:
            self.set_routing(previous)

    def set_routing(self, routing: AdapterRouting | None) -> None:
        """Hand one routing to every layer, so rows are grouped once per batch, not once per layer."""
        self.routing = routing
        for layer in self.layers.values():
            layer.routing = routing

    # --- PEFT-format state and files ---

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Return a copy of an adapter's weights under PEFT's key names."""
        return {
            key: parameter.detach().clone() for key, parameter in self.adapter_named_parameters(name).items()
        }

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named weights into an existing adapter; keys and shapes must match exactly."""
        parameters = self.adapter_named_parameters(name)
        missing = sorted(set(parameters) - set(state))
        unexpected = sorted(set(state) - set(parameters))
        if missing or unexpected:
            raise ValueError(
                f"adapter {name!r}: state dict does not match its layers; "
                f"missing {missing[:3]} ({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all)"
            )
        for key, parameter in parameters.items():
            if state[key].shape != parameter.shape:
                raise ValueError(
                    f"adapter {name!r}: {key} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(parameter.shape)}"
                )
        # Copied only once every key and shape is known good, so a bad state never half-loads.
        with torch.no_grad():
            for key, parameter in parameters.items():
                parameter.copy_(state[key])

    def save_adapter(self, name: str, directory: str | Path, *, base_model_name_or_path: str) -> None:
        """Write an adapter as a PEFT folder: adapter_config.json and adapter_model.safetensors."""
        config = self.adapter_config(name)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        suffixes = sorted(
            {path.rsplit(".", 1)[-1] for path in self.layers if name in self.layers[path].lora_A}
        )
        # Explicit suffixes rather than "all-linear", so readers without PEFT's expansion (vLLM) agree.
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT annotates int but takes any number
            lora_dropout=config.dropout,
            target_modules=suffixes,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
        ).save_pretrained(str(directory))
        state = {key: tensor.cpu().contiguous() for key, tensor in self.adapter_state_dict(name).items()}
        save_tensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        logger.info("adapter saved name=%s directory=%s tensors=%d", name, directory, len(state))

    def load_adapter(self, name: str, directory: str | Path) -> AdapterConfig:
        """Add an adapter from a PEFT folder (as written by save_adapter or by PEFT itself)."""
        directory = Path(directory)
        config = adapter_config_from_peft(LoraConfig.from_pretrained(str(directory)), directory)
        state = load_file(str(directory / WEIGHTS_NAME))
        self.add_adapter(name, config, zero=True)
        try:
            self.load_adapter_state_dict(name, state)
        except ValueError:
            self.remove_adapter(name)
            raise
        logger.info("adapter loaded name=%s directory=%s", name, directory)
        return config


def adapter_config_from_peft(peft_config: LoraConfig, directory: Path) -> AdapterConfig:
    """Translate a PEFT LoraConfig, refusing the variants MultiLoRALinear does not compute."""
    unsupported = {
        "use_dora": peft_config.use_dora,
        "use_rslora": peft_config.use_rslora,
        "rank_pattern": bool(peft_config.rank_pattern),
        "alpha_pattern": bool(peft_config.alpha_pattern),
        "modules_to_save": bool(peft_config.modules_to_save),
        "fan_in_fan_out": peft_config.fan_in_fan_out,
        "layers_to_transform": peft_config.layers_to_transform is not None,
        "bias": peft_config.bias != "none",
    }
    used = [option for option, is_set in unsupported.items() if is_set]
    if used:
        raise ValueError(
            f"{directory}/adapter_config.json: LoRA options {used} are not supported by loraplex"
        )
    targets = peft_config.target_modules
    if targets is None:
        raise ValueError(
            f"{directory}/adapter_config.json: target_modules is missing; loraplex does not guess "
            "PEFT's per-architecture defaults"
        )
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise ValueError(
            f"{directory}/adapter_config.json: target_modules {targets!r} is a regular expression; "
            f"loraplex accepts a list of module suffixes or {ALL_LINEAR!r}"
        )
    return AdapterConfig(
        rank=peft_config.r,
        alpha=float(peft_config.lora_alpha),
        dropout=float(peft_config.lora_dropout),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
    )
