"""Training on several processes (GPUs, or CPU processes with gloo).

`thuglm train` runs unchanged under a launcher; the Trainer, through accelerate, wraps the model in DDP, FSDP or
DeepSpeed and hands every process its own share of each batch:

    torchrun --nproc-per-node 2 -m thuglm train CONFIG.yaml                        # DDP
    accelerate launch --config_file configs/accelerate/fsdp_full.yaml -m thuglm train CONFIG.yaml
    thuglm train --nproc 2 CONFIG.yaml                                             # torchrun, started for you

`batch_size` is per process, as in `TrainingArguments`: one optimizer step takes
batch_size x processes x gradient_accumulation_steps rows. `global_batch_size` fixes that product instead, so the
same config gives the same steps on any number of GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import INTERRUPTED_STATUS, ThuglmError
from .config import ConfigError, check_optimizer_placement, load_config

logger = logging.getLogger("thuglm.train")


def process_state():
    """accelerate's view of this process: rank, number of processes, device.

    Under torchrun or `accelerate launch` this joins the process group (gloo on a machine without CUDA, where the
    Trainer must be told `use_cpu`, else it would train each process alone).
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class ReplicaStoppedError(ThuglmError):
    """Another process failed first; this one stops too, pointing at that process's message."""


@contextmanager
def main_process_first(state) -> Iterator[None]:
    """accelerate's `main_process_first`, which also stops the others when the main process fails in it.

    The main process reads the model folder and builds the datasets cache while the others wait at a barrier. If it
    stops there (a bad data file, a missing model), accelerate's version leaves them waiting for a process that is
    gone, and each dies with a traceback from the communication backend. Here the main process tells them its
    outcome instead, and they stop with one line that points at its message.
    """
    if state.num_processes == 1:
        yield
        return
    if not state.is_main_process:
        if _main_process_outcome(state, failed=False):
            raise ReplicaStoppedError(f"process {state.process_index} stopped: process 0 failed (see its message)")
        yield
        return
    try:
        yield
    except BaseException:
        _main_process_outcome(state, failed=True)
        raise
    _main_process_outcome(state, failed=False)


def _main_process_outcome(state, failed: bool) -> bool:
    """Broadcast the main process's `failed` to every process (a collective: all of them call it)."""
    flag = torch.tensor([1 if failed else 0], device=state.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def data_parallel_size(state) -> int:
    """How many copies of the model share each micro-batch: the processes, or the GPUs one process sees.

    One process that sees several GPUs gets the Trainer's `torch.nn.DataParallel`, which also takes batch_size rows
    for each GPU; it is slower than DDP, hence the hint.
    """
    if state.num_processes > 1 or torch.cuda.device_count() <= 1:
        return state.num_processes
    logger.warning(
        "one process sees %d GPUs: the Trainer splits each batch over them with DataParallel; "
        "`thuglm train --nproc %d` (DDP) is faster", torch.cuda.device_count(), torch.cuda.device_count(),
    )
    return torch.cuda.device_count()


def quiet_replicas(state) -> None:
    """Only the main process logs and draws progress bars; the others would repeat every line."""
    if state.is_main_process:
        return
    import datasets
    import transformers

    logging.getLogger("thuglm").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights"; the Trainer's own bar is rank 0's already


def sharding_plugin() -> str | None:
    """The accelerate plugin that shards the model across processes, as `accelerate launch` passes it on."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    return None


def fsdp_checkpoints_layers() -> bool:
    """True under an accelerate FSDP config with `fsdp_activation_checkpointing: true`.

    FSDP then checkpoints every ChatGLMBlock inside its shard (no second all-gather in the backward pass), and the
    Trainer refuses its own gradient checkpointing on top of it; `accelerate launch` passes the setting to the
    processes in these variables.
    """
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP") and parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING")


def launch(nproc: int, config_path: str, overrides: list[str]) -> int:
    """`thuglm train --nproc N`: check the config here, then run `thuglm train` in N processes through torchrun.

    A config error (a batch the processes cannot share, an unknown key) stops here with one line, before any
    process starts; the exit status of a failed run is the first non-zero status of its processes.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if torch.distributed.is_torchelastic_launched():
        raise ConfigError("--nproc starts its own processes; under torchrun or `accelerate launch` leave it out")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc}: one process a GPU, and this machine shows {torch.cuda.device_count()} "
                          "(CUDA_VISIBLE_DEVICES chooses which)")
    config = load_config(config_path, overrides)
    config.gradient_accumulation_for(nproc)
    if config.optimizer_in_backward:  # each process would refuse it after starting; say it once, before
        check_optimizer_placement(config, nproc, precision="unknown", sharding=None)
    # --standalone: a rendezvous on localhost with a free port, so several runs can share a machine.
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "thuglm", "train", config_path, *overrides]
    )
    try:
        run(args)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code > 0), 1)
    except (SignalException, KeyboardInterrupt):
        # Ctrl-C (or SIGTERM) reached the launcher: torchrun has passed it to the processes and waited for them;
        # the first one has said where the run stopped (see interrupts.py).
        return INTERRUPTED_STATUS
    return 0
