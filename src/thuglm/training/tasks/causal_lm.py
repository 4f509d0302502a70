"""`task: causal_lm`: a language model trained on the answers (or the whole text) of its samples."""

from __future__ import annotations

from datasets import concatenate_datasets
from peft import TaskType

from ...data import DataError
from ...data.collator import GlmCollator
from ...data.formats import get_format
from ...data.processing import encode_rows, encode_samples
from ...data.sources import load_source, mix_samples
from ..config import source_specs
from . import register_task
from .base import Task, split_off_evaluation

STREAM_SHUFFLE_BUFFER = 10_000


@register_task
class CausalLM(Task):
    name = "causal_lm"
    peft_task_type = TaskType.CAUSAL_LM

    def build_datasets(self, tokenizer):
        """Training and evaluation rows from the configured sources: eval_files, else a validation split, else none.

        Each source (`data.files`, or every `data.sources` item) is read file by file into canonical rows by its
        format (thuglm/data/formats), split, tokenized into samples (a dialogue: one per trained answer) and mixed by
        weight; then the samples are packed or laid out in rows. Every file is read, and every column checked, before
        training.
        """
        config = self.config
        data = config.data
        packing, max_seq_len = config.packing, config.max_seq_len
        read = {"streaming": data.streaming, "cache_dir": data.cache_dir, "bad_rows": data.on_bad_row,
                "num_proc": data.num_proc}
        encode = {"max_seq_len": max_seq_len, "num_proc": data.num_proc, "mask_history": data.mask_history,
                  "train_on_prompt": data.train_on_prompt}

        def samples_of(rows, spec):
            return encode_samples(rows, tokenizer, kind=get_format(spec.format).kind, source=spec.describe(), **encode)

        specs = source_specs(data)
        train_parts, eval_parts = [], []
        for spec in specs:
            canonical, held_out = split_off_evaluation(load_source(spec, **read), config)
            if held_out is not None:
                eval_parts.append(samples_of(held_out, spec))
            train_parts.append(samples_of(canonical, spec))
        samples = mix_samples(train_parts, [spec.weight for spec in specs], config.seed,
                              [spec.describe() for spec in specs])
        if data.eval_files:
            eval_spec = specs[0].reading(data.eval_files)  # data.files' settings, or the first source's; every row
            eval_parts = [samples_of(load_source(eval_spec, **read), eval_spec)]
        if data.streaming:
            samples = samples.shuffle(seed=config.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        train_dataset = encode_rows(samples, tokenizer, max_seq_len=max_seq_len, packing=packing,
                                    num_proc=data.num_proc)
        eval_dataset = None
        if eval_parts:
            eval_samples = eval_parts[0] if len(eval_parts) == 1 else concatenate_datasets(eval_parts)
            eval_dataset = encode_rows(eval_samples, tokenizer, max_seq_len=max_seq_len, packing=packing,
                                       num_proc=data.num_proc)
        if not data.streaming and len(train_dataset) == 0:
            where = ", ".join(spec.describe() for spec in specs)
            raise DataError(f"no training rows in {where}: every row was empty or skipped (see the warnings above)")
        return train_dataset, eval_dataset

    def collator(self, tokenizer, model):
        """Packed rows are padded to `max_seq_len`, one shape for every batch: they are nearly full anyway, and a
        compiled layer then compiles once instead of again (and then for any length) when a batch's longest row
        changes; unpacked rows to the batch's longest."""
        config = self.config
        return GlmCollator.for_model(tokenizer.pad_token_id, model.config,
                                    pad_to_multiple_of=config.max_seq_len if config.packing else None)
