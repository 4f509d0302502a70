"""A tiny base model whose greedy answers vary, a LoRA adapter that changes them, and a LoRA run's output folder."""

from __future__ import annotations

import shutil

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ..conftest import random_weights

LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.fixture(scope="session")
def base_dir(tiny_dir, tokenizer, tmp_path_factory):
    """The tiny model with spread-out weights (std 0.3: smaller ones make every greedy answer one repeated token)."""
    path = tmp_path_factory.mktemp("base") / "model"
    model = random_weights(AutoModelForCausalLM.from_pretrained(tiny_dir), seed=1, std=0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter_dir(base_dir, tmp_path_factory):
    """A bare peft adapter folder (no tokenizer files); non-zero LoRA weights, so it changes the outputs."""
    path = tmp_path_factory.mktemp("adapter") / "lora"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def output_dir(adapter_dir, tokenizer, tmp_path_factory):
    """What a LoRA run of `thuglm train` leaves in output_dir: the adapter plus the tokenizer files."""
    path = tmp_path_factory.mktemp("run") / "output"
    shutil.copytree(adapter_dir, path)
    tokenizer.save_pretrained(path)
    return path
