"""thuglm: fine-tune and use ChatGLM-6B with today's transformers, peft and datasets.

Importing thuglm registers ChatGLM with the Auto classes, so official checkpoint folders load without
`trust_remote_code`:

    import thuglm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("path/to/chatglm-6b")
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .models import (
    ChatGLMConfig,
    ChatGLMForConditionalGeneration,
    ChatGLMForSequenceClassification,
    ChatGLMForTokenClassification,
    ChatGLMModel,
    ChatGLMTokenizer,
)

__version__ = "0.1.0"

AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
# The official config maps AutoModel to the generation class; keep that, so old scripts get what they expect.
AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForSequenceClassification.register(ChatGLMConfig, ChatGLMForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(ChatGLMConfig, ChatGLMForTokenClassification, exist_ok=True)

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMForSequenceClassification",
    "ChatGLMForTokenClassification",
    "ChatGLMModel",
    "ChatGLMTokenizer",
    "__version__",
]
