"""What is alive at a run's peak of allocated GPU memory, from a CUDA memory snapshot.

    python benchmarks/memory_peak.py SNAPSHOT.pickle [--top 25]

The snapshot is what `torch.cuda.memory._snapshot()` returns after `torch.cuda.memory._record_memory_history()`
(https://pytorch.org/docs/stable/torch_cuda_memory.html), e.g. `benchmarks/profile_recipe.py --memory-snapshot FILE`,
which starts recording before the model is loaded. The trace of allocations and frees is replayed to find the moment
`torch.cuda.max_memory_allocated()` reports; the blocks alive then are grouped by the code that allocated them (the
innermost frames outside torch itself, so a LoRA adapter, the loss or the optimizer shows as such), largest first.
Only the allocations recorded are seen: start recording before anything is allocated.
"""

from __future__ import annotations

import argparse
import collections
import pickle
from pathlib import Path

MIB = 2**20


def origin(frames: list[dict], depth: int = 2) -> str:
    """The allocating code: the innermost `depth` frames outside torch's own Python files, after the innermost frame
    in torch's (e.g. torch/optim/adamw.py, torch/nn/functional.py)."""
    outside = [frame for frame in frames if "/torch/" not in frame["filename"]]
    names = [f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}" for frame in outside[:depth]]
    first_outside = frames.index(outside[0]) if outside else len(frames)
    inner_torch = [frame for frame in frames[:first_outside] if "/torch/" in frame["filename"]
                   and frame["filename"].endswith(".py")]
    if inner_torch:
        torch_frame = inner_torch[0]
        names.insert(0, f"torch/{torch_frame['filename'].split('/torch/')[-1]}:{torch_frame['line']} {torch_frame['name']}")
    return " <- ".join(names) or "(no Python frames)"


def replay(events: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """Walk the allocation events: (peak bytes, index of the event that reached it, the blocks alive then)."""
    alive: dict[int, dict] = {}
    allocated = peak = peak_index = 0
    peak_alive: dict[int, dict] = {}
    for index, event in enumerate(events):
        action = event["action"]
        if action == "alloc":
            alive[event["addr"]] = event
            allocated += event["size"]
            if allocated > peak:
                peak, peak_index = allocated, index
                peak_alive = dict(alive)
        elif action == "free_completed" and event["addr"] in alive:
            allocated -= alive.pop(event["addr"])["size"]
    return peak, peak_index, peak_alive


def summarise(snapshot: dict, top: int) -> str:
    traces = [trace for trace in snapshot["device_traces"] if trace]
    if not traces:
        return "the snapshot holds no allocation trace: was _record_memory_history() on?"
    events = traces[0]
    peak, peak_index, alive = replay(events)
    groups: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for block in alive.values():
        key = origin(block.get("frames", []))
        groups[key] += block["size"]
        counts[key] += 1
    lines = [f"peak {peak / 2**30:.3f} GiB at event {peak_index} of {len(events)}, {len(alive)} blocks alive",
             f"reached by: {origin(events[peak_index].get('frames', []), depth=4)}",
             f"{'MiB':>9s} {'blocks':>7s}  allocated by"]
    for key, size in groups.most_common(top):
        lines.append(f"{size / MIB:9.1f} {counts[key]:7d}  {key}")
    rest = sum(groups.values()) - sum(size for _, size in groups.most_common(top))
    lines.append(f"{rest / MIB:9.1f} {'':7s}  (the other {max(0, len(groups) - top)} origins)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.snapshot, "rb") as handle:
        print(summarise(pickle.load(handle), args.top))


if __name__ == "__main__":
    main()
