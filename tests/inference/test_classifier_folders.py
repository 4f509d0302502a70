"""chat, generate and merge refuse a classifier's folder with what to use instead (`thuglm predict`)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoTokenizer

from thuglm.cli import main
from thuglm.inference.loading import ModelLoadError, load_for_inference
from thuglm.models import ChatGLMForSequenceClassification, ChatGLMForTokenClassification
from thuglm.training.tasks.classification import save_classifier_config


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tiny_dir):
    """A full sequence classifier and a LoRA token classifier, saved as `thuglm train` saves them."""
    root = tmp_path_factory.mktemp("classifiers")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    full = ChatGLMForSequenceClassification.from_pretrained(tiny_dir, num_labels=3, dtype=torch.float32)
    full.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    tagger = ChatGLMForTokenClassification.from_pretrained(tiny_dir, num_labels=5, dtype=torch.float32)
    lora = get_peft_model(tagger, LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, target_modules=["dense"],
                                             modules_to_save=["score"]))
    lora.save_pretrained(root / "lora")
    save_classifier_config(lora, root / "lora")
    return root


def test_load_for_inference_names_the_classifier_and_predict(classifiers):
    with pytest.raises(ModelLoadError, match=r"sequence classifier .*task: seq_cls.*thuglm predict"):
        load_for_inference(classifiers / "full")
    with pytest.raises(ModelLoadError, match=r"token classifier .*task: token_cls.*thuglm predict"):
        load_for_inference(classifiers / "lora")


def test_the_commands_exit_2_with_one_line(classifiers, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(classifiers / "full"), "--input", str(prompts), "--output", str(out)]) == 2
    assert "thuglm predict" in capsys.readouterr().err
    assert not out.exists()
    assert main(["merge", "--adapter", str(classifiers / "lora"), "--out", str(tmp_path / "merged")]) == 2
    assert "token classifier" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_a_language_model_still_loads(tiny_dir):
    _, model = load_for_inference(tiny_dir, device="cpu")
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
