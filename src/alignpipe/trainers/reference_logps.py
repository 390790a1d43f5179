"""Reference log-probabilities precomputed once and kept in memory on every process.

Why: TRL 1.16's ``precompute_ref_log_probs`` stores them in an Arrow file named by ``dataset._get_cache_file_path``.
A dataset with no file behind it (every pair list the stages build with ``Dataset.from_list``) gets a random name in a
temporary folder of each process's own, so rank 0 wrote a file the other ranks then failed to open
(``FileNotFoundError``): a DPO stage with precompute stopped on two or more processes, CPU or GPU. The log-probs are
gathered to every process anyway, so each keeps them as two columns in memory. The pass itself is TRL's: its
collator, its ``compute_ref_log_probs`` (adapters off under PEFT) and its DeepSpeed inference engine.
"""

from __future__ import annotations

import os

import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["InMemoryReferenceLogps"]

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # what TRL's precompute adds and its loss reads


class InMemoryReferenceLogps:
    """Mixed in before ``trl.DPOTrainer``: replaces its ``_precompute_ref_logps`` (see the module docstring)."""

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs needs a map-style dataset, not a streamed one; set "
                             "precompute_ref_log_probs: false")
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
        model = self._precompute_reference()
        chosen, rejected = [], []
        quiet = not self.accelerator.is_main_process or bool(os.environ.get("TQDM_DISABLE", ""))
        for batch in tqdm(loader, desc=f"Reference log-probs for the {name} pairs", disable=quiet):
            logps = self.compute_ref_log_probs(model, batch)
            for kept, gathered in zip((chosen, rejected), self.accelerator.gather_for_metrics(logps)):
                kept.append(gathered.detach().float().cpu())
        values = [torch.cat(kept).numpy() for kept in (chosen, rejected)]
        if len(values[0]) != len(dataset):  # the gathered batches are the dataset in order, once each
            raise RuntimeError(f"the reference pass gave {len(values[0])} log-probs for {len(dataset)} {name} pairs")
        for column, value in zip(COLUMNS, values):
            dataset = dataset.add_column(column, value)
        return dataset

    def _precompute_reference(self):
        """The model the reference pass runs, as TRL picks it: the explicit reference, else the policy (before any
        step; adapters off under PEFT), wrapped once in a DeepSpeed inference engine under DeepSpeed, where its
        parameters are still on the CPU (ZeRO-1/2) or sharded (ZeRO-3)."""
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                from trl.models import prepare_deepspeed

                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model or self.model
