"""`batch_size: auto`: the largest batch that fits, gradient accumulation keeping the global batch."""

from __future__ import annotations

import json

import torch
import yaml

from thuglm.cli import main
from thuglm.training import recipe
from thuglm.training.batch_size import batch_size_candidates, choose_batch_size, find_batch_size, longest_row

from .test_train_e2e import base_settings, write_config


def test_candidates_split_the_rows_of_a_step_into_whole_micro_batches_largest_first():
    assert batch_size_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert batch_size_candidates(7) == [7, 1]


def test_the_largest_candidate_that_runs_and_leaves_room_for_the_optimizer_state_is_chosen():
    tried = []

    def peak_of(batch_size):
        tried.append(batch_size)
        if batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return 10 * batch_size

    # 4 runs, but 40 + 5 bytes of optimizer state exceed 40; 3 fits with them.
    assert choose_batch_size([12, 6, 4, 3, 2, 1], peak_of, extra_bytes=5, budget_bytes=40) == 3
    assert tried == [12, 6, 4, 3]
    assert choose_batch_size([2, 1], peak_of, extra_bytes=50, budget_bytes=40) is None


def test_the_longest_row_is_probed():
    rows = [{"input_ids": [1] * n} for n in (5, 9, 3)]
    assert len(longest_row(rows)["input_ids"]) == 9


def test_on_a_cpu_the_whole_per_process_batch_is_taken_without_probing():
    model = torch.nn.Linear(2, 2)

    def collator(rows):
        raise AssertionError("nothing is run on a CPU")

    assert find_batch_size(model, collator, {"input_ids": [1, 2]}, 16, device=torch.device("cpu"),
                           optimizer="adamw", precision="fp32", gradient_checkpointing=False) == 16


# ---- through `thuglm train` ---------------------------------------------------------------------------------------
def auto_run_config(tmp_path, **overrides):
    values = base_settings(tmp_path, method="lora", batch_size="auto", global_batch_size=4, max_steps=2,
                           save_steps=1, report_to=[], **overrides)
    values.pop("eval_steps")
    values["data"]["validation_split"] = 0.0
    return write_config(tmp_path, **values)


def test_train_finds_the_batch_size_keeps_the_global_batch_and_a_resume_keeps_the_checkpoints(tmp_path, monkeypatch):
    config = auto_run_config(tmp_path)
    probed = []

    def fits_two(model, collator, row, rows_per_process, **settings):  # a GPU on which 2 rows of 4 fit
        probed.append(rows_per_process)
        # the probe's passes build no KV cache, as training's do (a compiled layer would recompile for each layer's)
        assert model.config.use_cache is False
        assert collator([row] * 2)["input_ids"].shape[0] == 2  # the task's collator makes the probe's batches
        return 2

    monkeypatch.setattr(recipe, "find_batch_size", fits_two)
    assert main(["train", str(config)]) == 0
    out = tmp_path / "out"
    assert probed == [4]
    assert yaml.safe_load((out / "thuglm_train.yaml").read_text())["batch_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_batch_size"] == 4 and metrics["steps"] == 2  # 2 rows x 2 accumulated

    def must_not_probe(*args, **kwargs):
        raise AssertionError("a resumed run keeps its checkpoint's batch size")

    monkeypatch.setattr(recipe, "find_batch_size", must_not_probe)
    assert main(["train", str(config), "max_steps=3", "resume_from_checkpoint=true"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["global_step"] == 3


def test_on_a_cpu_auto_takes_the_whole_per_process_batch(tmp_path):
    assert main(["train", str(auto_run_config(tmp_path)), "max_steps=1", "save_steps=0"]) == 0
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["train_batch_size"] == 4


def test_auto_without_a_global_batch_is_refused_before_anything_is_written(tmp_path, capsys):
    config = auto_run_config(tmp_path)
    assert main(["train", str(config), "global_batch_size=null"]) == 2
    assert "`batch_size: auto` keeps the rows of an optimizer step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
