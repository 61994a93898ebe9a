"""``load``: the right served model class for an exported folder, read from its metadata."""

from __future__ import annotations

from pathlib import Path

from .. import layout as L
from ..providers import CPU
from .causal_lm import ORTModelForCausalLM
from .encoders import (
    ORTModelForFeatureExtraction,
    ORTModelForQuestionAnswering,
    ORTModelForSequenceClassification,
    ORTModelForTokenClassification,
)
from .seq2seq import ORTModelForSeq2SeqLM
from .session import ORTModel, read_metadata

TASK_TO_CLASS = {
    "SEQ_CLS": ORTModelForSequenceClassification,
    "TOKEN_CLS": ORTModelForTokenClassification,
    "QUESTION_ANS": ORTModelForQuestionAnswering,
    "FEATURE_EXTRACTION": ORTModelForFeatureExtraction,
    "CAUSAL_LM": ORTModelForCausalLM,
    "SEQ_2_SEQ_LM": ORTModelForSeq2SeqLM,
}


def load(model_dir: str | Path, provider: str = CPU, *, metadata: dict | None = None,
         **kwargs) -> ORTModel | ORTModelForSeq2SeqLM:
    """The right ``ORTModelFor*`` for an exported folder, read from its metadata (or from ``metadata``, the same
    content as a dict, which the exporter passes while it validates a folder it has not finished writing)."""
    if metadata is None:
        if not (Path(model_dir) / L.METADATA_FILE_NAME).is_file():
            raise FileNotFoundError(f"{model_dir} has no {L.METADATA_FILE_NAME}; pick the ORTModelFor* class "
                                    "yourself.")
        metadata = read_metadata(model_dir)
    return TASK_TO_CLASS[metadata["task"]].from_pretrained(model_dir, provider, metadata=metadata, **kwargs)
