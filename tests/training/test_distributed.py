"""`thuglm train` in several processes (torchrun, gloo on CPU) gives the run of one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thuglm.cli import main

from .test_resume import loss_history
from .test_train_e2e import OFFICIAL_TINY, base_settings, write_config

CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"
STEPS = 4
SAVED = 2  # the checkpoint the 1-process run resumes from


def settings(tmp_path: Path, **overrides) -> dict:
    # global_batch_size fixes the rows of a step: 2 processes x 2 rows, or 1 process x 2 rows x 2 accumulations.
    values = base_settings(tmp_path, **{
        "max_steps": STEPS, "batch_size": 2, "global_batch_size": 4, "save_steps": SAVED, "report_to": [],
        "lora": {"dropout": 0.0}, **overrides,
    })
    values["data"]["validation_split"] = 0.0
    return values


def run_two_processes(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "thuglm", "train", "--nproc", "2", str(config)],
        check=False, capture_output=True, text=True, timeout=300, env=env,
    )


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=2e-2), (step, got, expected)


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
    two = tmp_path / "two"
    config = write_config(tmp_path, **settings(tmp_path, output_dir=str(two)))
    launched = run_two_processes(config)
    assert launched.returncode == 0, launched.stderr[-3000:]

    one = tmp_path / "one"
    assert main(["train", str(config), f"output_dir={one}"]) == 0

    expected, got = loss_history(one), loss_history(two)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert_same_losses(got, expected, range(1, STEPS + 1))

    # Only the main process writes and logs; tokens are counted over both processes.
    metrics_two, metrics_one = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    assert metrics_two["processes"] == 2 and metrics_one["processes"] == 1
    assert metrics_two["global_batch_size"] == metrics_one["global_batch_size"] == 4
    assert metrics_two["train_tokens"] == metrics_one["train_tokens"]
    log = launched.stdout + launched.stderr
    assert log.count("training 16,384 of") == 1 and log.count("done: final_train_loss") == 1, log[-3000:]
    assert sorted(path.name for path in (two / f"checkpoint-{SAVED}").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                     "rng_state_1.pth"]

    # The 2-process checkpoint at step SAVED resumes in one process and finishes like the 2-process run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / f"checkpoint-{SAVED}", resumed / f"checkpoint-{SAVED}")
    assert main(["train", str(config), f"output_dir={resumed}", "resume_from_checkpoint=true"]) == 0
    after = loss_history(resumed)
    assert sorted(after) == list(range(1, STEPS + 1))
    assert_same_losses(after, got, range(SAVED + 1, STEPS + 1))
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == STEPS


def test_fsdp2_full_shard_of_chatglm_blocks_trains_like_one_unsharded_process(tmp_path):
    """The model under the FSDP configs' layout (torch's fully_shard on CPU; accelerate shards only on GPUs)."""
    from .fsdp_worker import train_alone

    out = tmp_path / "losses.json"
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(Path(__file__).with_name("fsdp_worker.py")), str(OFFICIAL_TINY), str(out)],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    expected = train_alone(str(OFFICIAL_TINY))
    got = json.loads(out.read_text())
    assert got == pytest.approx(expected, rel=1e-4), (got, expected)
    assert expected[-1] < expected[0] - 1.0  # it trains


def test_a_data_error_in_the_main_process_stops_the_others_with_one_line_each(tmp_path):
    """Process 0 reads the data first; its error must not leave process 1 to die in the backend with a traceback."""
    values = settings(tmp_path)
    values["data"]["text_column"] = "no_such_column"
    result = run_two_processes(write_config(tmp_path, **values))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("no_such_column") == 1 and "thuglm: " in result.stderr
    assert "process 1 stopped: process 0 failed" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_global_batch_the_processes_cannot_share_exits_2_before_starting_them(tmp_path, capsys):
    config = write_config(tmp_path, **settings(tmp_path, global_batch_size=6))
    assert main(["train", "--nproc", "2", str(config)]) == 2
    err = capsys.readouterr().err
    assert "`global_batch_size`: 6 rows a step do not split over 2 process(es) x batch_size 2" in err
    assert "multiple of 4" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_global_batch_size_derives_the_accumulation(tmp_path, capsys):
    from thuglm.training.config import load_config

    config = load_config(write_config(tmp_path, **settings(tmp_path, global_batch_size=16)))
    assert [config.gradient_accumulation_for(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert load_config(None, ["model=tiny", "data.files=x"]).gradient_accumulation_for(4) == 1

    both = write_config(tmp_path, **settings(tmp_path, gradient_accumulation_steps=2))
    assert main(["train", str(both)]) == 2
    assert "set `global_batch_size` or `gradient_accumulation_steps`, not both" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ddp", "fsdp_lora", "fsdp_full", "deepspeed_zero2", "deepspeed_zero3_offload"])
def test_accelerate_configs_parse_and_name_chatglm_blocks(name):
    """`accelerate launch --config_file` reads them (DeepSpeed itself is not needed to parse its configs)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.num_processes == 2 and config.mixed_precision in ("no", None)
    if name == "ddp":
        assert config.distributed_type == DistributedType.MULTI_GPU
    elif name.startswith("fsdp"):
        from thuglm.models.modeling_chatglm import ChatGLMBlock

        fsdp = config.fsdp_config
        assert config.distributed_type == DistributedType.FSDP and fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == ChatGLMBlock.__name__
        assert fsdp["fsdp_activation_checkpointing"] is True
    else:
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        assert config.distributed_type == DistributedType.DEEPSPEED
        json_file = Path(__file__).parents[2] / config.deepspeed_config["deepspeed_config_file"]
        deepspeed = HfDeepSpeedConfig(str(json_file))
        zero3 = name == "deepspeed_zero3_offload"
        assert deepspeed.is_zero3() == zero3 and deepspeed.is_offload() == zero3
        assert config.deepspeed_config["zero3_init_flag"] == zero3
        # Batch sizes, accumulation, clipping and precision come from the thuglm config through the Trainer.
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert deepspeed.get_value(key) == "auto", key
