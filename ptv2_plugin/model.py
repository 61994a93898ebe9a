"""The tuner: finds self-attention modules, wraps them, and owns one prefix encoder per adapter."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .architectures import KVGeometry, attention_location, default_target_modules, kv_geometry
from .attention import ROW_ADAPTERS, RowBatches, register_attention_function
from .config import PTuningV2Config
from .config_checks import check_against_model
from .initialization import initialize_prefix
from .input_checks import check_forward_inputs, tracing
from .layer import BASE_ROW, PTuningV2Layer
from .persistence import check_adapter_shapes
from .positions import install_position_shift
from .prefix_encoder import PrefixEncoder, refresh_serving_caches
from .serving_plan import ServingPlanner
from .transformers_compat import checkpointing_enabled

logger = logging.getLogger(__name__)


class PTuningV2Model(BaseTuner):
    """P-Tuning v2 (deep prompt tuning) as a PEFT tuner.

    ``ptv2_prefix_encoder[adapter]`` holds each adapter's prompt embedding and MLP; PEFT saves and loads it like any
    tuner-level container. Each wrapped attention module asks its encoder for its own slot of keys and values.
    """

    prefix: str = "ptv2_"
    tuner_layer_cls = PTuningV2Layer
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: PTuningV2Config, adapter_name: str) -> None:
        register_attention_function()
        if "ptv2_prefix_encoder" not in self._modules:
            self.ptv2_prefix_encoder = nn.ModuleDict()
            self._serving_planner = ServingPlanner(self)
            # Bound methods, so a deep copy of the model checks and plans with its own tuner.
            self._ptv2_hooks: list = [
                _install_checkpointing_input_grads(model),
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._serving_planner.withdraw, always_call=True),
            ]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """One pre-hook for every forward of the base model: check the inputs, then publish the serving table.

        Under torch.compile (dynamo) there is no table (a ContextVar); the encoders' serving caches are brought up
        to date here instead, outside the graph, so that compiled layers can read them without a check of their own.
        """
        if torch.compiler.is_dynamo_compiling():
            refresh_serving_caches(self.ptv2_prefix_encoder, self.active_adapters)
            return
        traced = tracing()
        active = self.active_adapters
        if not traced and active:
            configs = self.peft_config
            shift = sum(configs[name].num_virtual_tokens for name in active
                        if name in configs and configs[name].shift_position_ids)
            check_forward_inputs(module, kwargs, shift)
        self._serving_planner.publish(traced)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_shapes(model.state_dict(), remapped)
        return remapped

    def _prepare_adapter_config(self, peft_config: PTuningV2Config, model_config: dict) -> PTuningV2Config:
        if peft_config.target_modules is None:
            peft_config.target_modules = set(default_target_modules(model_config.get("model_type")))
        return peft_config

    def _check_target_module_exists(self, peft_config: PTuningV2Config, key: str):
        matched = check_target_module_exists(peft_config, key)
        if matched and getattr(self.model.config, "is_encoder_decoder", False):
            return matched if peft_config.prefixes_location(attention_location(key)) else False
        return matched

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``model(**batch, adapter_names=[...])``: one adapter name per row ("__base__" for none)."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError("adapter_names must be a list with one adapter name (a string) per row.")
        unknown = sorted({name for name in adapter_names if name != BASE_ROW and name not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapters {unknown}; available: {sorted(self.peft_config)} and "
                f"{BASE_ROW!r} for rows without an adapter."
            )
        # Task heads (modules_to_save) run per row too: each row through its adapter's copy of the head.
        heads = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        for head in heads:
            head.forward = _row_wise_head(head, list(adapter_names))
        token = ROW_ADAPTERS.set(list(adapter_names))
        try:
            with RowBatches.open():
                yield
        finally:
            ROW_ADAPTERS.reset(token)
            for head in heads:
                head.__dict__.pop("forward", None)

    def _check_new_adapter_config(self, config: PTuningV2Config) -> None:
        super()._check_new_adapter_config(config)
        if config.shift_position_ids and any(
            c.shift_position_ids for name, c in self.peft_config.items() if c is not config
        ):
            raise ValueError("Only one adapter on a model may use shift_position_ids=True.")

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        check_against_model(self.peft_config[adapter_name], model.config)  # before anything is allocated
        self._pending_slots: list[KVGeometry] = []
        self._pending_targets: list[tuple[str, nn.Module]] = []
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config: PTuningV2Config = self.peft_config[adapter_name]
        model_config = getattr(model, "config", None)
        encoder = PrefixEncoder(
            config.num_virtual_tokens,
            model_config.hidden_size,
            self._pending_slots,
            prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size,
            prefix_dropout=config.prefix_dropout,
            init_std=config.prefix_init_std,
        )
        reference = next((p for p in model.parameters()), None)
        if reference is not None:
            encoder.to(reference.device)
        if not config.__dict__.pop("_ptv2_loaded", False):  # created, not loaded: its weights start as configured
            initialize_prefix(encoder, config, model, self._pending_targets)
        self.ptv2_prefix_encoder[adapter_name] = encoder
        self._pending_slots, self._pending_targets = [], []
        self._sync_encoder_requires_grad()
        if config.shift_position_ids:
            self._ptv2_hooks.append(install_position_shift(model, self, adapter_name))

    def _create_and_replace(
        self,
        peft_config: PTuningV2Config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        slot = len(self._pending_slots)
        base_module = getattr(target, "base_layer", target)
        self._pending_slots.append(kv_geometry(base_module, self.model.config))
        self._pending_targets.append((current_key, base_module))
        if isinstance(target, PTuningV2Layer):
            target.update_layer(adapter_name, slot)
            return
        new_module = PTuningV2Layer(target, self.ptv2_prefix_encoder)
        new_module.update_layer(adapter_name, slot)
        new_module._active_adapter = self.active_adapter
        setattr(parent, target_name, new_module)

    # ------------------------------------------------------------------------------- adapters and trainability
    def _sync_encoder_requires_grad(self, inference_mode: bool | None = None) -> None:
        """Active adapters train, others are frozen; ``None`` defers to each adapter's own ``inference_mode``."""
        for name, encoder in self.ptv2_prefix_encoder.items():
            frozen = self.peft_config[name].inference_mode if inference_mode is None else inference_mode
            encoder.requires_grad_(name in self.active_adapters and not frozen)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if "ptv2_prefix_encoder" in self._modules:
            self._sync_encoder_requires_grad()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found; available: {sorted(self.peft_config)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_encoder_requires_grad(inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.ptv2_prefix_encoder:
            del self.ptv2_prefix_encoder[adapter_name]

    def prefix_encoder(self, adapter_name: str | None = None) -> PrefixEncoder:
        """The encoder of ``adapter_name`` (default: the active adapter)."""
        name = adapter_name or self.active_adapters[0]
        if name not in self.ptv2_prefix_encoder:
            raise KeyError(f"No P-Tuning v2 adapter named {name!r}; available: {sorted(self.ptv2_prefix_encoder)}.")
        return self.ptv2_prefix_encoder[name]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Checkpoint keys carry no adapter name, so an adapter saved as "default" loads under any name.
        # The encoder's parameters sit deeper than PEFT's default rule expects (name is not second to last).
        marker = f"ptv2_prefix_encoder.{adapter_name}."
        if marker in key:
            return key.replace(marker, "ptv2_prefix_encoder.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # ------------------------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any):
        """The transformers entry point (Trainer on 4.57), with reentrant checkpointing made safe under DDP."""
        reentrant_default = not hasattr(type(self.model), "activation_checkpointing_enable")  # 4.57: reentrant
        safe = _ddp_safe_checkpointing_kwargs(gradient_checkpointing_kwargs, reentrant_default)
        return self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=safe, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any):
        """transformers 5's entry point (non-reentrant unless asked), made safe under DDP the same way."""
        safe = _ddp_safe_checkpointing_kwargs(activation_checkpointing_kwargs, reentrant_default=False)
        return self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=safe, **kwargs)

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "P-Tuning v2 adds keys and values, not a weight delta, so it cannot be merged into the base model. "
            "Use unload() to get the base model back, or exporters.onnx.export(...) to serve the adapter."
        )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies .weight/.bias between Linear-like layers; attention modules have neither.
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        for hook in getattr(self, "_ptv2_hooks", []):
            hook.remove()
        self._ptv2_hooks = []
        return model


def _row_wise_head(wrapper: ModulesToSaveWrapper, adapter_names: list[str]):
    """Forward of a task head for a mixed batch. PEFT's own mixed-batch head only takes single layers; this one
    takes any head (e.g. RoBERTa's two-layer classifier) by running each adapter's copy on its rows."""

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(hidden) != len(adapter_names):
            raise ValueError(
                f"adapter_names names {len(adapter_names)} rows but the batch has {len(hidden)}; pass one adapter "
                "name per row."
            )
        order, outputs = [], []
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, row_name in enumerate(adapter_names) if row_name == name]
            head = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
            outputs.append(head(hidden[rows], *args, **kwargs))
            order.extend(rows)
        inverse = torch.argsort(torch.tensor(order, device=hidden.device))
        return torch.cat(outputs)[inverse]

    return forward


def _install_checkpointing_input_grads(model: nn.Module):
    """Make reentrant gradient checkpointing train the prefix on a frozen model.

    Reentrant checkpointing only back-propagates into a checkpointed layer when one of its inputs requires grad;
    with frozen embeddings none does and the prefix would silently stop learning. The hook marks the embedding
    output as requiring grad only while training with checkpointing on.
    """

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if (
            torch.is_grad_enabled()
            and model.training
            and checkpointing_enabled(model)
            and isinstance(output, torch.Tensor)
            and not output.requires_grad
        ):
            return output.requires_grad_(True)
        return output

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return _HookGroup([])
    # Encoder-decoder models may look tokens up through per-stack copies that share the weight (BART on 4.57).
    weight = getattr(embeddings, "weight", None)
    shared = [m for m in model.modules() if weight is not None and getattr(m, "weight", None) is weight]
    shared = [m for m in shared if m is not embeddings]
    return _HookGroup([module.register_forward_hook(hook) for module in [embeddings, *shared]])


def _ddp_safe_checkpointing_kwargs(kwargs: dict | None, reentrant_default: bool) -> dict | None:
    """Switch reentrant checkpointing to non-reentrant when several processes train together.

    Every layer computes its slot from the same encoder parameters, so reentrant checkpointing fires their gradient
    hooks once per layer; DDP (without static_graph) all-reduces after the first and the replicas silently drift
    apart. Non-reentrant checkpointing computes the same gradients and fires each hook once.
    """
    reentrant = (kwargs or {}).get("use_reentrant", reentrant_default)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not reentrant or not distributed or torch.distributed.get_world_size() < 2:
        return kwargs
    logger.warning(
        "P-Tuning v2 under distributed training: using non-reentrant gradient checkpointing (use_reentrant=False); "
        "reentrant checkpointing would desynchronise the replicas' shared prefix encoder."
    )
    return {**(kwargs or {}), "use_reentrant": False}


class _HookGroup:
    """Several hook handles removed together."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

