"""Shared fixtures: one tiny ChatGLM (tokenizer trained on the bundled corpus) per test session."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (LoRA's fused dropout) run in Triton's CPU interpreter. Triton reads this when a kernel
# is defined, its own library's included, so it is set before anything imports triton (thuglm does, through
# transformers).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import thuglm  # noqa: F401  (registers the Auto classes)
from thuglm.models import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from thuglm.models.tiny import build_tiny_chatglm


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_chatglm(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(tiny_dir)


def random_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Weights with enough spread that outputs differ visibly between tokens (the default init is near-uniform)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "word_embeddings" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def model(tiny_dir) -> ChatGLMForConditionalGeneration:
    """A fresh fp32 tiny model (eager attention) with spread-out random weights."""
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")
    return random_weights(model).eval()
