"""Configuration of a P-Tuning v2 adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from . import config_checks as checks
from .config_checks import MAX_ENCODER_HIDDEN_SIZE, MAX_VIRTUAL_TOKENS, PREFIX_INITS
from .peft_type import PEFT_TYPE_NAME, add_peft_type_member

# AdamW learning rate for the default adapter (projection on) and the task head, one rate for both (HF Trainer's
# `learning_rate`). The MLP's output layer turns one AdamW step of size lr on each weight into a change of up to
# lr * sum|hidden| (~150 lr) per prefix coordinate, so PEFT prefix tuning's usual 1e-2 blows the prefix keys up
# within tens of steps (norm ~40 vs real keys ~6): attention goes to the prefix and the model predicts one class.
# At 1e-3 the prefix keys settle at the real keys' scale. Without projection (prefix_projection=False) nothing
# amplifies the step and a higher rate trains better. Evidence: benchmarks/results/defaults_study/report.md.
RECOMMENDED_LEARNING_RATE = 1e-3
RECOMMENDED_LEARNING_RATE_NO_PROJECTION = 3e-2


@dataclass
class PTuningV2Config(PeftConfig):
    """Deep prompt tuning: ``num_virtual_tokens`` trainable keys and values in front of every self-attention layer.

    Field names follow PEFT's ``PrefixTuningConfig`` where the concept is the same, so configs read alike.

    ``prefix_init`` defaults to "random" for every task type: on a tuning split held out from SST-2 train (frozen
    all-MiniLM-L6-v2, 3 seeds) random init reached 84.20 % against 83.47 % for "zeros" and 81.13 % for
    "real_tokens" at the reduced budget (benchmarks/results/quality/report.md), and 86.51 % against 86.85 % and
    77.10 % at the full one (benchmarks/results/quality_full/report.md): "zeros" is not ahead by more than the seed
    spread, "real_tokens" collapsed at one seed. "real_tokens" is there for models and tasks where a real-text start
    helps (PEFT's study: decoders); see ptv2_plugin.initialization.
    """

    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of prefix keys/values per layer (n)."})
    prefix_projection: bool = field(
        default=True,
        metadata={
            "help": "Reparameterize the prefix through Embedding -> Linear -> Tanh -> Linear (the paper's MLP). "
            "False trains free per-layer key/value tensors instead."
        },
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the reparameterization MLP; default: the model's hidden size."}
    )
    prefix_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prefix keys/values in training."})
    prefix_init_std: float = field(
        default=0.02,
        metadata={
            "help": "Std of the MLP's output layer (or of the free prefix without projection). Small values start "
            "the prefix near zero so attention is not captured by it before it has learned anything."
        },
    )
    prefix_init: str = field(
        default="random",
        metadata={
            "help": "How a new prefix starts. 'random': the MLP's output layer (or the free prefix) is drawn with "
            "std prefix_init_std. 'real_tokens': every layer's prefix is the frozen model's own keys and values of "
            "n real tokens (prefix_init_text, else tokens drawn from the vocabulary with prefix_init_seed); with "
            "the MLP its output bias is their mean and its output weight the least-squares fit of the rest (exact "
            "for n <= MLP width). 'zeros': all-zero keys and values. Applied once when the adapter is created, "
            "never when one is loaded. See ptv2_plugin.initialization."
        },
    )
    prefix_init_text: str | None = field(
        default=None,
        metadata={"help": "prefix_init='real_tokens': text whose tokens (repeated or cut to n) give the keys/values."},
    )
    prefix_init_seed: int = field(
        default=0, metadata={"help": "prefix_init='real_tokens' without text: seed of the vocabulary sample."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer for prefix_init_text (default: base_model_name_or_path), as in PEFT's prompt "
                  "tuning."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Self-attention modules that receive a prefix (names or a regex). Default: the per-architecture "
            "table in ptv2_plugin.architectures."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules (names or a regex) never to prefix."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only prefix these layer indices (as in PEFT's LoRA)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules to train and save; the task head is added per task type by PEFT."},
    )
    prefix_encoder_self_attention: bool = field(
        default=True, metadata={"help": "Encoder-decoder models: prefix the encoder's self-attention."}
    )
    prefix_decoder_self_attention: bool = field(
        default=True, metadata={"help": "Encoder-decoder models: prefix the decoder's self-attention."}
    )
    prefix_cross_attention: bool = field(
        default=True, metadata={"help": "Encoder-decoder models: prefix the decoder's cross-attention keys/values."}
    )
    shift_position_ids: bool = field(
        default=False,
        metadata={
            "help": "Number real tokens from n instead of 0, as PEFT's prefix tuning and the original code do. "
            "Off by default: the model keeps its whole context and its pretrained position numbering."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type_member(PEFT_TYPE_NAME)
        self._validate()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def _validate(self) -> None:
        """Every field, before use: a config may come from a file someone else wrote (see config_checks)."""
        checks.check_int("num_virtual_tokens", self.num_virtual_tokens, 1, MAX_VIRTUAL_TOKENS)
        if self.encoder_hidden_size is not None:
            checks.check_int("encoder_hidden_size", self.encoder_hidden_size, 1, MAX_ENCODER_HIDDEN_SIZE)
        if not 0.0 <= checks.check_number("prefix_dropout", self.prefix_dropout) < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout!r}.")
        checks.check_choice("prefix_init", self.prefix_init, PREFIX_INITS)
        checks.check_optional_str("prefix_init_text", self.prefix_init_text)
        text = self.prefix_init_text
        if text is not None and (not text.strip() or self.prefix_init != "real_tokens"):
            raise ValueError("prefix_init_text must be a non-empty text and is only used with "
                             f"prefix_init='real_tokens' (prefix_init={self.prefix_init!r}, text={text!r}).")
        checks.check_int("prefix_init_seed", self.prefix_init_seed, 0, 2**63 - 1)
        checks.check_optional_str("tokenizer_name_or_path", self.tokenizer_name_or_path)
        if not checks.check_number("prefix_init_std", self.prefix_init_std) > 0:
            raise ValueError(f"prefix_init_std must be a positive number, got {self.prefix_init_std!r}.")
        for name in ("prefix_projection", "prefix_encoder_self_attention", "prefix_decoder_self_attention",
                     "prefix_cross_attention", "shift_position_ids", "inference_mode"):
            checks.check_bool(name, getattr(self, name))
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            checks.check_optional_str(name, getattr(self, name))
        checks.check_module_selector("target_modules", self.target_modules)
        checks.check_module_selector("exclude_modules", self.exclude_modules)
        checks.check_layers_to_transform(self.layers_to_transform)
        checks.check_layers_pattern(self.layers_pattern)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform.")
        if self.modules_to_save is not None:
            checks.check_names("modules_to_save", self.modules_to_save)
        checks.check_auto_mapping(self.auto_mapping)
        if not (self.prefix_encoder_self_attention or self.prefix_decoder_self_attention
                or self.prefix_cross_attention):
            raise ValueError("All three prefix locations are switched off: the adapter would do nothing.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """A config read from a saved adapter: its adapter is loaded, not created, so ``prefix_init`` is not applied
        (PEFT's from_pretrained / load_adapter read the config this way, then load the saved weights)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.__dict__["_ptv2_loaded"] = True  # not a dataclass field: never written to adapter_config.json
        return config

    def prefixes_location(self, location: str) -> bool:
        """Whether a prefix goes into attention modules at ``location`` (see ptv2_plugin.architectures)."""
        return bool(getattr(self, f"prefix_{location}"))
