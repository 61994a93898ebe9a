"""Served encoder tasks: classification, token classification, question answering, feature extraction.

Each returns transformers' own output class, so code written against the PyTorch model reads the same fields.
"""

from __future__ import annotations

from transformers.modeling_outputs import (
    BaseModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .session import ORTModel


class ORTModelForSequenceClassification(ORTModel):
    task = "SEQ_CLS"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return SequenceClassifierOutput(logits=out["logits"])


class ORTModelForTokenClassification(ORTModel):
    task = "TOKEN_CLS"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return TokenClassifierOutput(logits=out["logits"])


class ORTModelForQuestionAnswering(ORTModel):
    task = "QUESTION_ANS"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return QuestionAnsweringModelOutput(start_logits=out["start_logits"], end_logits=out["end_logits"])


class ORTModelForFeatureExtraction(ORTModel):
    task = "FEATURE_EXTRACTION"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        out = self._forward_outputs(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, **kwargs)
        return BaseModelOutput(last_hidden_state=out["last_hidden_state"])
