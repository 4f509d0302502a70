"""Fold a LoRA adapter into its base model and save a standalone model folder.

The merged folder loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` (after `import thuglm`), needs
neither peft nor the base folder, and runs as fast as the base model (no adapter matmuls).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .loading import ModelLoadError, check_adapter_folder, load_for_inference


def check_out_dir(out_dir: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse to replace a folder with content unless asked to, and never replace the model being merged."""
    resolved = out_dir.resolve()
    for source in sources:
        source = source.resolve()
        if resolved == source or resolved in source.parents:
            raise ModelLoadError(f"--out {out_dir} would replace {source}, which the merge reads: pick another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelLoadError(f"--out {out_dir} is a file: pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelLoadError(f"{out_dir} is not empty: pass another folder, or overwrite=True (CLI: --overwrite)")


def merge_adapter(
    base: str | Path | None,
    adapter: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Merge `adapter` into `base` and save model (safetensors) and tokenizer to `out_dir`; returns `out_dir`.

    `base` None takes the base folder recorded in the adapter's adapter_config.json. The model is written to a
    temporary sibling of `out_dir` and renamed at the end, so a failure (disk full, interrupt) never leaves a
    half-written model where a complete one is expected.
    """
    adapter, out_dir = Path(adapter), Path(out_dir)
    sources = [adapter] if base is None else [Path(base), adapter]
    check_adapter_folder(adapter)
    check_out_dir(out_dir, sources, overwrite)
    if base is None:
        tokenizer, model = load_for_inference(adapter, dtype=dtype, device="cpu")
    else:
        tokenizer, model = load_for_inference(base, adapter=adapter, dtype=dtype, device="cpu")
    if not hasattr(model, "merge_and_unload"):
        raise ModelLoadError(f"the adapter in {adapter} ({model.peft_config['default'].peft_type}) cannot be merged")
    merged = model.merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
