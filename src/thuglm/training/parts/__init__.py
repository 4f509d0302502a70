"""Parts of thuglm's Trainer, each a mixin that any `transformers.Trainer` subclass can take (TRL's trainers too):
list the parts before the Trainer class, `class MyTrainer(NonFiniteGuard, AtomicCheckpoints, Trainer)`.

Each part overrides only what its job needs and calls `super()`, so parts compose in any order; each takes its own
keyword arguments (if any) and passes the rest on. `training/trainer.py`'s `GlmTrainer` is all of them together.

| part | what it does |
|---|---|
| `TokenCounting` | real tokens (packed rows number their samples in `attention_mask`), tokens/s in every log, the run's mean loss kept across resumes (`RunLoss`) |
| `NonFiniteGuard` | a NaN / inf loss or gradient norm stops the run before the optimizer applies it, or that step is skipped (`on_nan`) |
| `AtomicCheckpoints` | checkpoints and the final model written to a staging folder and renamed into place when complete |
| `FaithfulSaving` | saves weights in the dtypes they were loaded in, without tied copies or checkpoint wrappers (FSDP) |
| `AdapterCastingOff` | peft's casting of LoRA inputs to fp32 off under autocast, over the forward and the backward |
| `ModuleWalksOnce` | the training loop's walks over the module tree over lists taken once |
| `OptimizerInBackward` | thuglm's Adafactor stepping each weight inside the backward pass |
"""

from .adapter_casting import AdapterCastingOff
from .atomic_checkpoints import AtomicCheckpoints
from .module_walks import ModuleWalksOnce
from .nonfinite_guard import NonFiniteGuard, NonFiniteLossError
from .optimizer_in_backward import OptimizerInBackward
from .progress import close_progress_bar
from .saving import FaithfulSaving
from .token_counting import RunLoss, TokenCounting

__all__ = [
    "AdapterCastingOff",
    "AtomicCheckpoints",
    "FaithfulSaving",
    "ModuleWalksOnce",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "OptimizerInBackward",
    "RunLoss",
    "TokenCounting",
    "close_progress_bar",
]
