"""ChatGLM-6B model, tokenizer and configuration."""

from .configuration_chatglm import ChatGLMConfig
from .masking import MissingGlmTokensError, glm_attention_mask, glm_position_ids
from .modeling_chatglm import (
    ChatGLMForConditionalGeneration,
    ChatGLMForSequenceClassification,
    ChatGLMForTokenClassification,
    ChatGLMModel,
    ChatGLMPreTrainedModel,
)
from .tokenization_chatglm import ChatGLMTokenizer

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMForSequenceClassification",
    "ChatGLMForTokenClassification",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "ChatGLMTokenizer",
    "MissingGlmTokensError",
    "glm_attention_mask",
    "glm_position_ids",
]
