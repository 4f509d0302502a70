"""Every YAML in `configs/` trains through `thuglm train` as shipped, and LoRA in every recommended combination.

The shipped configs are what a new user runs first: LoRA in bf16 with gradient checkpointing, which crashed on a
CPU (peft's casting of adapter inputs was off in the forward and on again in the recomputation inside the backward).
Only what a user must change is overridden: `model=tiny`, the data, a few steps, `output_dir`. A config added to
`configs/` is covered the day it is added: the data comes from what the config asks for (its task and format).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from thuglm.cli import main
from thuglm.training import methods
from thuglm.training.demo import resource_path

from .test_classification_e2e import name_rows, topic_rows, write_jsonl
from .test_resume import loss_history
from .test_train_e2e import ALPACA, CORPUS, base_settings, write_config

RANKING = resource_path("ranking", "pairs.json")  # alpaca ranking rows (instruction, input, chosen, rejected)
CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(train, dev) files for each task, and for each data format of causal_lm, in the columns the configs name."""
    folder = tmp_path_factory.mktemp("shipped-config-data")
    rng = random.Random(0)
    topics = [write_jsonl(topic_rows(count, rng), folder / f"topics-{name}.jsonl")
              for name, count in (("train", 48), ("dev", 16))]
    names = [write_jsonl(name_rows(count, rng), folder / f"names-{name}.jsonl")
             for name, count in (("train", 48), ("dev", 16))]
    instructions = json.loads(ALPACA.read_text(encoding="utf-8"))
    dialogues = write_jsonl([{"conversations": [{"from": "human", "value": row["instruction"]},
                                                {"from": "gpt", "value": row["output"]}] * 2}
                             for row in instructions[:64]], folder / "dialogues.jsonl")
    return {"seq_cls": tuple(topics), "token_cls": tuple(names), "text": (CORPUS, CORPUS),
            "alpaca": (ALPACA, ALPACA), "sharegpt": (dialogues, dialogues), "dpo": (RANKING, RANKING)}


def data_overrides(config: dict, sample_data, cache_dir: Path) -> list[str]:
    """`data.*` overrides pointing the config at bundled or generated data of the kind it asks for: by its task,
    else by its data format (each source's, for a config that mixes sources)."""
    data = config.get("data", {})
    task = config.get("task", "causal_lm")
    if "sources" in data:
        sources = [{**source, "files": [str(sample_data[source.get("format", "text")][0])]}
                   for source in data["sources"]]
        overrides = [f"data.sources={json.dumps(sources, ensure_ascii=False)}"]
        dev = sample_data["text"][1]
    else:
        train, dev = sample_data[task if task != "causal_lm" else data.get("format", "text")]
        overrides = [f"data.files={train}"]
    if "eval_files" in data:
        overrides.append(f"data.eval_files={dev}")
    return overrides + [f"data.cache_dir={cache_dir}"]


def test_every_config_is_covered():
    """The configs a user is pointed to: the README names lora_text.yaml; seq_cls and token_cls have their section."""
    names = {path.name for path in CONFIGS}
    assert {"lora_text.yaml", "lora_alpaca.yaml", "full_alpaca.yaml", "seq_cls.yaml", "token_cls.yaml"} <= names


@pytest.mark.parametrize("config_path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_config_trains_as_shipped(config_path, tmp_path, sample_data, monkeypatch):
    monkeypatch.setenv("THUGLM_CACHE", str(tmp_path.parent / "thuglm-cache"))  # the tiny model, built once
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    out = tmp_path / "out"
    overrides = ["model=tiny", "max_steps=2", f"output_dir={out}",
                 *data_overrides(config, sample_data, tmp_path / "hf-cache")]
    assert main(["train", str(config_path), *overrides]) == 0
    losses = loss_history(out)
    assert losses and all(math.isfinite(loss) for loss in losses.values())
    ran = yaml.safe_load((out / "thuglm_train.yaml").read_text(encoding="utf-8"))
    # As shipped: the precision and checkpointing the file asks for are the ones that ran.
    assert ran["precision"] == config.get("precision", "fp32")
    assert ran["gradient_checkpointing"] == config.get("gradient_checkpointing", False)
    weights = {"lora": "adapter_model.safetensors", "ptuning": "pytorch_model.bin"}.get(config.get("method", "lora"),
                                                                                      "model.safetensors")
    assert (out / weights).is_file()


# ---- LoRA x precision x gradient checkpointing x compile -------------------------------------------------------
# fp16 on a CPU trains without autocast (accelerate has none there): the adapter keeps peft's casting of its inputs.
PRECISIONS = ["bf16", "fp16"]


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory) -> dict:
    return {"root": tmp_path_factory.mktemp("lora-matrix"), "losses": {}}


def lora_losses(matrix_runs, monkeypatch, precision: str, checkpointing: bool, compiled: bool) -> dict[int, float]:
    key = (precision, checkpointing, compiled)
    if key not in matrix_runs["losses"]:
        monkeypatch.setattr(methods, "COMPILE_BACKEND", "eager")  # dynamo's tracing without an inductor build
        folder = matrix_runs["root"] / "-".join(map(str, key))
        folder.mkdir()
        values = base_settings(folder, method="lora", precision=precision, gradient_checkpointing=checkpointing,
                               compile=compiled, max_steps=4, save_steps=0, report_to=[])
        values.pop("eval_steps")
        values["data"]["validation_split"] = 0.0
        assert main(["train", str(write_config(folder, **values))]) == 0
        matrix_runs["losses"][key] = loss_history(Path(values["output_dir"]))
    return matrix_runs["losses"][key]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_lora_trains_in_every_recommended_combination(matrix_runs, monkeypatch, precision, checkpointing, compiled):
    """Each combination trains, and to the losses of plain eager LoRA without checkpointing in the same precision:
    checkpointing and compiling change how the step is computed, not what (LoRA dropout included)."""
    losses = lora_losses(matrix_runs, monkeypatch, precision, checkpointing, compiled)
    reference = lora_losses(matrix_runs, monkeypatch, precision, False, False)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses.values())
    assert losses.keys() == reference.keys()
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=2e-2)
    assert losses[max(losses)] < losses[min(losses)]  # it learns
