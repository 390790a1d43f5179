"""Training loop for :class:`alignpipe.rewards.ensemble.RewardEnsemble` (plain PyTorch).

TRL's ``RewardTrainer`` trains one scalar model. The ensemble needs all K members' rewards per batch, which one
:meth:`RewardEnsemble.forward` call gives through the shared trunk. It also needs UP-RLHF's diversity term over all
members' LoRA A matrices, so the loop is written out here. The maths comes from :mod:`alignpipe.losses.reward` and
:mod:`alignpipe.losses.ensemble_rank` (the batch's rank loss under each objective below).

Per step, with chosen/rejected rewards ``[B, K]`` from ONE forward over the ``2B`` sequences:

* ``objective="members"``: each member has its own Bradley–Terry loss, averaged over members (an independent
  ensemble, Coste et al.). A member's loss depends only on its own adapter and head, so the average trains each
  member as if alone, scaled by 1/K (AdamW is invariant to that scale). Averaging keeps ``bt_loss`` on one model's
  scale, so λ means the same thing under both objectives.
* ``objective="mean"``: Bradley–Terry on the ensemble-mean reward (UP-RLHF eq. 12,
  :func:`ensemble_bradley_terry_loss`).
* ``bootstrap=True`` (``members`` only): member k draws a bootstrap resample of the n pairs once, before training
  (seeded). Its copy counts multiply the pairs' weights on the shared batches, and its batch loss is normalised by
  the weights' sum without them (the batch size when there are no ``weights``), their expected sum, not by their
  own sum. A pair then weighs its copy count whatever its batch-mates drew, as in a pass over the resample, without
  K separate data loaders. A member whose weights in a batch are all zero gets no loss from that batch.
* ``+ diversity_loss(ensemble.lora_down_projections(), λ)``, which is exactly 0 for λ = 0.

Optional per-pair ``margins`` / ``weights`` go into :func:`bradley_terry_loss` (for ``mean``, applied to the mean
rewards). Logged every ``logging_steps`` and at the last step, averaged over the steps since the last log: ``loss``,
``bt_loss``, ``accuracy`` (pairwise train accuracy of the mean reward), ``grad_norm``; plus at the log step itself
``diversity_ratio`` (the mean nuclear/Frobenius ratio, logged even when λ = 0) and ``lr``.

Soft labels and Iterative Data Smoothing (ALGORITHMS.md §14)
-----------------------------------------------------------

``labels`` gives each pair a target probability ``y`` that ``chosen`` beats ``rejected``. The rank loss is then the
soft cross-entropy :func:`~alignpipe.losses.preference.soft_preference_loss` with ``h = r_c − r_r − margin`` and
``β = 1``, i.e. ``−[y log σ(h) + (1 − y) log σ(−h)] = −log σ(h) + (1 − y) h``, per member (``members``) or on the
mean reward (``mean``), reduced exactly like :func:`bradley_terry_loss` (mean, or weighted mean with ``weights``;
bootstrap copy counts as above). With ``y = 1`` the second term is multiplied by an exact zero, so it equals the
Bradley–Terry loss bit for bit. Without ``labels`` and with ``ids_rate = 0`` the original Bradley–Terry code path
runs unchanged.

``ids_rate > 0`` turns on Iterative Data Smoothing (Zhu, Jordan & Jiao 2024): the labels start at ``labels`` (or 1)
and after each FULL epoch (``step % steps_per_epoch == 0``; a trailing fractional epoch gets no update) every
training pair's label moves toward the ensemble's current prediction,
``y ← (1 − rate)·y + rate·σ(h̄)`` (:func:`~alignpipe.losses.preference.ids_label_update`). Choices:

* ``h̄ = r̄_c − r̄_r − margin`` uses the ensemble-MEAN reward, under both objectives, so all members share one smoothed
  label per pair. The mean is the ensemble's prediction (what :class:`EnsembleScorer` reports as ``σ(r̄_a − r̄_b)``);
  per-member labels would let each member smooth toward its own errors and pull the members' targets apart. The
  margin (0 without ``margins``) is subtracted because ``σ(h̄)`` is exactly the probability the loss compares the
  label to, so a label equal to the prediction gives that pair zero gradient, as in the paper.
* The prediction is one no-grad scoring pass over all ``n`` training pairs in eval mode (no LoRA dropout), in
  length-sorted batches of ``2·batch_size`` sequences; the model is put back in train mode afterwards. Bootstrap
  copy counts and pair weights do not matter here: every pair's label is updated.
* Each update forces a log record at that step with ``ids/mean_label`` (mean label after the update),
  ``ids/mean_probability`` (mean ``σ(h̄)``) and ``ids/mean_margin`` (mean ``r̄_c − r̄_r``); when IDS is on, the last
  record also carries ``ids/final_mean_label``. The final per-pair labels are returned as ``history.labels``
  (:class:`EnsembleTrainingHistory`, a ``list`` of the log records).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from alignpipe.io import atomic_write_json
from alignpipe.losses.ensemble_rank import ensemble_rank_loss
from alignpipe.losses.preference import ids_label_update
from alignpipe.losses.reward import DiversityForm, diversity_loss
from alignpipe.pipeline import distributed
from alignpipe.rewards.ensemble import RewardEnsemble
from alignpipe.rewards.ensemble_encoding import collate_features, encode_examples

__all__ = ["EnsembleObjective", "EnsembleTrainingConfig", "EnsembleTrainingHistory", "EnsembleTrainingState",
           "train_ensemble"]

EnsembleObjective = Literal["members", "mean"]
_SCHEDULERS = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class EnsembleTrainingConfig:
    learning_rate: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 16
    max_length: int = 512
    diversity_weight: float = 0.0
    diversity_form: DiversityForm = "ratio"
    objective: EnsembleObjective = "members"
    bootstrap: bool = False
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0
    progress_bar: bool = True
    ids_rate: float = 0.0  # Iterative Data Smoothing label-update rate per epoch; 0 = off (plain MLE)

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.max_length < 2 or self.logging_steps < 1:
            raise ValueError("batch_size and logging_steps must be >= 1 and max_length >= 2")
        if not (self.diversity_weight >= 0 and math.isfinite(self.diversity_weight)):
            raise ValueError(f"diversity_weight must be finite and >= 0, got {self.diversity_weight}")
        if self.diversity_form not in get_args(DiversityForm):
            raise ValueError(f"diversity_form must be one of {get_args(DiversityForm)}, got {self.diversity_form!r}")
        if self.objective not in get_args(EnsembleObjective):
            raise ValueError(f"objective must be one of {get_args(EnsembleObjective)}, got {self.objective!r}")
        if self.bootstrap and self.objective == "mean":
            raise ValueError(
                "bootstrap resamples the pairs per member, but objective='mean' has a single loss on the ensemble "
                "mean; use objective='members' with bootstrap"
            )
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0):  # also rejects NaN
            raise ValueError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0 = no clipping)")
        if self.lr_scheduler not in _SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {_SCHEDULERS}, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.ids_rate <= 1.0:  # False for NaN
            raise ValueError(f"ids_rate (the IDS label-update rate) must be in [0, 1] (0 = off), got {self.ids_rate}")

    def to_dict(self) -> dict:
        return asdict(self)


class EnsembleTrainingHistory(list):
    """The log records of :func:`train_ensemble` (a plain ``list`` of dicts), plus ``labels``: the final per-pair
    target probabilities (after the last IDS update; the given ``labels``, or all 1.0, when IDS is off)."""

    labels: list[float]

    def __init__(self, records=(), labels: Sequence[float] = ()):
        super().__init__(records)
        self.labels = list(labels)


@dataclass
class EnsembleTrainingState:
    """Everything exact resume of :func:`train_ensemble` needs after ``step`` steps: the members' trainable weights,
    AdamW's and the schedule's state, torch's RNG (LoRA dropout) of every rank (``[world, n]``, rank order; ``[n]``
    in states saved before, one for all ranks), the IDS labels, the unlogged averaging window (summed over ranks) and
    the records logged so far. The batch order is not stored: it is a pure function of the seed (``_batches``). Rank
    0 writes it and every rank resumes from that one copy, so what differs by rank is saved whole. (A state saved
    before that by several processes holds rank 0's part of the window only: the first record after resuming it
    averages that part.)"""

    step: int
    parameters: list[Tensor]
    optimizer: dict
    scheduler: dict
    torch_rng: Tensor
    cuda_rng: Tensor | None
    labels: Tensor | None
    window: dict
    logs: list[dict]

    def save(self, directory: Path) -> None:
        """Write into ``directory`` (the caller publishes it atomically): safetensors for tensors, JSON for the rest;
        the optimizer and schedule through ``torch.save``, loaded back with ``weights_only=True``."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.parameters)}
        tensors["torch_rng"] = self.torch_rng
        if self.cuda_rng is not None:
            tensors["cuda_rng"] = self.cuda_rng
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        save_file(tensors, directory / "ensemble_state.safetensors")
        torch.save({"optimizer": self.optimizer, "scheduler": self.scheduler}, directory / "optimizer.pt")
        atomic_write_json(directory / "trainer_state.json",
                          {"global_step": self.step, "window": self.window, "logs": self.logs})

    @classmethod
    def load(cls, directory: Path) -> EnsembleTrainingState:
        from safetensors.torch import load_file

        tensors = load_file(directory / "ensemble_state.safetensors")
        states = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        meta = json.loads((directory / "trainer_state.json").read_text())
        count = sum(1 for key in tensors if key.startswith("p"))
        return cls(step=meta["global_step"], parameters=[tensors[f"p{i}"] for i in range(count)],
                   optimizer=states["optimizer"], scheduler=states["scheduler"], torch_rng=tensors["torch_rng"],
                   cuda_rng=tensors.get("cuda_rng"),
                   labels=tensors.get("labels"), window=meta["window"], logs=meta["logs"])


def _set_rng_state(state: EnsembleTrainingState, device: torch.device) -> None:
    """This rank's saved RNG states (rank 0's where the saving launch had fewer ranks, or saved one for all)."""
    torch.set_rng_state(_rank_row(state.torch_rng))
    if state.cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_rank_row(state.cuda_rng), device)


def _rank_row(states: Tensor) -> Tensor:
    """A copy of this rank's row: torch's ``set_rng_state`` crashes the process on a view into a larger tensor."""
    if states.dim() == 1:
        return states
    return states[distributed.rank() if distributed.rank() < len(states) else 0].clone()


@torch.no_grad()
def _mean_reward_margins(
    ensemble: RewardEnsemble, tokenizer, chosen_f: list, rejected_f: list, batch_size: int, device
) -> Tensor:
    """``r̄_c − r̄_r`` for every pair (``[n]``, float32, CPU): one eval-mode pass in length-sorted batches of
    ``2·batch_size`` sequences; the previous train/eval mode is restored."""
    features = list(chosen_f) + list(rejected_f)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    means = torch.empty(len(features), dtype=torch.float32)
    was_training = ensemble.training
    ensemble.eval()
    try:
        for start in range(0, len(order), 2 * batch_size):
            idx = order[start:start + 2 * batch_size]
            batch = collate_features(tokenizer, [features[i] for i in idx])
            batch = {key: value.to(device) for key, value in batch.items()}
            means[torch.tensor(idx)] = ensemble(**batch).float().mean(dim=1).cpu()
    finally:
        ensemble.train(was_training)
    n = len(chosen_f)
    return means[:n] - means[n:]


def _batches(n: int, batch_size: int, total_steps: int, generator: torch.Generator) -> list[list[int]]:
    """Index batches: a fresh seeded permutation per epoch, the last batch of an epoch possibly smaller; stops at
    ``total_steps`` (so fractional epochs see a prefix of the last permutation)."""
    out: list[list[int]] = []
    while len(out) < total_steps:
        perm = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            out.append(perm[start:start + batch_size])
            if len(out) == total_steps:
                break
    return out


def train_ensemble(
    ensemble: RewardEnsemble,
    tokenizer,
    pairs: Sequence[tuple[str, str, str]],
    config: EnsembleTrainingConfig,
    *,
    margins: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    on_log: Callable[[dict], None] | None = None,
    labels: Sequence[float] | None = None,
    save_every: int = 0,
    on_save: Callable[[EnsembleTrainingState], None] | None = None,
    resume: EnsembleTrainingState | None = None,
) -> EnsembleTrainingHistory:
    """Train ``ensemble`` in place on ``(prompt, chosen, rejected)`` pairs; return the log records.

    ``steps = ceil(epochs * ceil(n / batch_size))``. AdamW on :meth:`RewardEnsemble.trainable_parameters`, with a
    linear/cosine/constant schedule (optional warmup), gradient clipping at ``max_grad_norm`` and seeded shuffling.
    The model is in train mode during the loop and in eval mode afterwards. Each log record is passed to
    ``on_log`` as soon as it is made.

    ``labels`` (optional, one per pair, each in [0, 1]; ``None`` = 1.0 for all) are soft targets P(chosen ≻ rejected);
    ``config.ids_rate > 0`` smooths them after every full epoch (module docstring). The return value is a ``list``
    of the log records (:class:`EnsembleTrainingHistory`) whose ``labels`` attribute holds the final per-pair labels.

    Data parallel (under ``accelerate launch``): every rank draws the same global batches, scores its contiguous share
    and scales its loss by its share of the batch, and the gradients are averaged across ranks, so the update equals
    the one-process update for unweighted losses (weighted or margin losses normalise by each rank's own weights:
    close, not identical; with LoRA dropout every rank draws the dropout stream one process draws, over its own
    pairs, so the masks differ too). Every rank keeps an identical replica; the caller writes from rank 0.

    Resume: every ``save_every`` steps and after the last one, ``on_save`` gets an :class:`EnsembleTrainingState`
    (on every rank; the caller writes from rank 0). Passing one back as ``resume`` continues after its step with the
    same weights, optimizer, schedule, RNG, labels and batches, so the result equals an uninterrupted run; the last
    step's state (a run stopped after training, e.g. while its caller evaluated) restores the result without a step.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("train_ensemble needs at least one (prompt, chosen, rejected) pair")
    for i, p in enumerate(pairs):
        if len(p) != 3 or not all(isinstance(x, str) for x in p):
            raise ValueError(f"pair {i} must be a (prompt, chosen, rejected) tuple of strings, got {p!r:.120}")
    n = len(pairs)
    margin_t = _per_pair(margins, n, "margins")
    weight_t = _per_pair(weights, n, "weights")
    if weight_t is not None and not bool(((weight_t >= 0) & torch.isfinite(weight_t)).all()):
        raise ValueError("weights must be finite and >= 0")
    label_t = _labels(labels, n)
    ids = config.ids_rate > 0
    if ids and label_t is None:
        label_t = torch.ones(n, dtype=torch.float32)

    prompts = [p[0] for p in pairs]
    chosen_f = encode_examples(tokenizer, prompts, [p[1] for p in pairs], max_length=config.max_length)
    rejected_f = encode_examples(tokenizer, prompts, [p[2] for p in pairs], max_length=config.max_length)

    K = ensemble.num_members
    generator = torch.Generator().manual_seed(config.seed)
    multiplicity = None
    if config.bootstrap:
        multiplicity = torch.stack(
            [torch.bincount(torch.randint(n, (n,), generator=generator), minlength=n) for _ in range(K)], dim=1
        ).float()  # [n, K] copy counts of each pair in each member's resample
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    batches = _batches(n, config.batch_size, total_steps, generator)

    params = ensemble.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    device = next(ensemble.parameters()).device

    world, rank = distributed.world_size(), distributed.rank()
    logs: list[dict] = []
    window = {"loss": 0.0, "bt_loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0, "steps": 0}
    start = 0
    if resume is not None:
        start, logs = resume.step, list(resume.logs)
        if rank == 0:  # the window was saved summed over ranks: one rank holds it, as _window_means adds them
            window = dict(resume.window)
        with torch.no_grad():
            for p, saved in zip(params, resume.parameters, strict=True):
                p.copy_(saved.to(p.device))
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        if resume.labels is not None:
            label_t = resume.labels.clone()

    def checkpoint(step: int) -> None:
        if on_save is not None and save_every and (step % save_every == 0 or step == total_steps):
            on_save(EnsembleTrainingState(
                step=step, parameters=[p.detach().clone() for p in params],
                # copies: the optimizer's state_dict holds its live moment tensors, which the next steps change
                optimizer=copy.deepcopy(optimizer.state_dict()), scheduler=copy.deepcopy(scheduler.state_dict()),
                torch_rng=distributed.all_gather_stack(torch.get_rng_state()),
                cuda_rng=distributed.all_gather_stack(torch.cuda.get_rng_state(device)) if device.type == "cuda"
                else None,
                labels=None if label_t is None else label_t.clone(), window=_window_totals(window), logs=list(logs)))

    ensemble.train()
    progress = tqdm(total=total_steps, initial=start, desc="reward ensemble", disable=not config.progress_bar,
                    leave=False)
    # LoRA dropout draws from a stream seeded here (restored on resume): reproducible in any process, and the
    # caller's RNG is left as it was.
    rng_scope = contextlib.ExitStack()
    rng_scope.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    try:
        torch.manual_seed(config.seed)
        if resume is not None:
            _set_rng_state(resume, device)
        for step, global_idx in enumerate(batches, start=1):
            if step <= start:
                continue
            idx = _rank_share(global_idx, rank, world)
            b = len(idx)
            if b:
                batch = collate_features(tokenizer, [chosen_f[i] for i in idx] + [rejected_f[i] for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                rewards = ensemble(**batch)  # [2B, K], one trunk pass for chosen and rejected
                chosen, rejected = rewards[:b], rewards[b:]
                index = torch.tensor(idx)
                bt = ensemble_rank_loss(
                    chosen, rejected, config.objective,
                    margin=None if margin_t is None else margin_t[index].to(device),
                    weight=None if weight_t is None else weight_t[index].to(device),
                    multiplicity=None if multiplicity is None else multiplicity[index].to(device),
                    target=None if label_t is None else label_t[index].to(device),
                )
            else:  # a last batch smaller than the world size: no pairs here, but every other part of the step
                # (diversity gradient, averaging, clipping, IDS, the log's all-reduce) is taken with the other ranks
                bt = sum(p.sum() for p in params) * 0.0
            div = diversity_loss(ensemble.lora_down_projections(), config.diversity_weight, config.diversity_form)
            loss = bt + div.to(bt.device)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"reward ensemble loss is {float(loss.detach())} at step {step}; stopping "
                                         "before the optimizer step. Lower learning_rate or check the pairs' labels "
                                         "and margins")
            share = world * b / len(global_idx)  # this rank's part of the global batch mean (1 in one process)

            optimizer.zero_grad(set_to_none=True)
            (share * bt + div.to(bt.device)).backward()
            distributed.average_gradients(params)
            if config.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()

            # the step's means over its pairs on every rank: this rank's parts of them sum to the whole over ranks
            part = b / len(global_idx)
            if b:
                with torch.no_grad():
                    window["accuracy"] += part * float((chosen.mean(dim=1) > rejected.mean(dim=1)).float().mean())
            window["bt_loss"] += part * float(bt.detach())
            window["loss"] += part * float(bt.detach()) + float(div.detach()) / world
            window["grad_norm"] += float(grad_norm) / world  # the same on every rank
            window["steps"] += 1 / world
            progress.update(1)

            ids_record: dict = {}
            if ids and step % steps_per_epoch == 0:  # a full epoch ends here: Iterative Data Smoothing update
                h = _mean_reward_margins(ensemble, tokenizer, chosen_f, rejected_f, config.batch_size, device)
                raw = h.clone()
                if margin_t is not None:
                    h = h - margin_t
                probabilities = torch.sigmoid(h)
                label_t = ids_label_update(label_t, probabilities, config.ids_rate).clamp(0.0, 1.0)
                ids_record = {
                    "ids/mean_label": float(label_t.mean()),
                    "ids/mean_probability": float(probabilities.mean()),
                    "ids/mean_margin": float(raw.mean()),
                }

            if step % config.logging_steps == 0 or step == total_steps or ids_record:
                record = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    **_window_means(window),
                    "diversity_ratio": ensemble.diversity_ratio(),
                    "lr": lr,
                    **ids_record,
                }
                if ids and step == total_steps:
                    record["ids/final_mean_label"] = float(label_t.mean())
                logs.append(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
                if on_log is not None:
                    on_log(dict(record))
                window = {"loss": 0.0, "bt_loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0, "steps": 0}
            checkpoint(step)
    finally:
        progress.close()
        ensemble.eval()
        rng_scope.close()
    final = [1.0] * n if label_t is None else label_t.tolist()
    return EnsembleTrainingHistory(logs, final)


def _window_means(window: dict[str, float]) -> dict[str, float]:
    """Each logged statistic's mean over the window's steps, reduced over ranks: each rank holds its parts of the
    steps' means (its share of a step's pairs, ``1 / world`` of a statistic every rank shares), so the log is the
    one-process log whatever the world size and however a batch splits (a rank with no pairs adds nothing)."""
    totals = _window_totals(window)
    steps = totals.pop("steps")
    return {key: value / steps for key, value in totals.items()}


def _window_totals(window: dict[str, float]) -> dict[str, float]:
    """The window's parts summed over ranks: what a checkpoint saves, since the ranks' own parts differ."""
    keys = sorted(window)
    return dict(zip(keys, distributed.all_reduce_sum(torch.tensor([float(window[k]) for k in keys],
                                                                  dtype=torch.float64)).tolist()))


def _rank_share(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch (the shares differ by at most one pair)."""
    bounds = [round(i * len(batch) / world) for i in range(world + 1)]
    return batch[bounds[rank]:bounds[rank + 1]]


def _labels(values: Sequence[float] | None, n: int) -> Tensor | None:
    """Per-pair soft labels as float32, each checked to be a probability (the error names the first bad pair)."""
    if values is None:
        return None
    values = list(values)
    if len(values) != n:
        raise ValueError(f"labels must have one value per pair ({n}), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"labels[{i}] (pair {i}) must be a number in [0, 1], got {v!r:.60}") from None
        if not 0.0 <= f <= 1.0:  # False for NaN
            raise ValueError(
                f"labels[{i}] (pair {i}) must be a probability in [0, 1] that chosen beats rejected, got {f}"
            )
        out.append(f)
    return torch.tensor(out, dtype=torch.float32)


def _per_pair(values: Sequence[float] | None, n: int, name: str) -> Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(list(values), dtype=torch.float32)
    if t.shape != (n,):
        raise ValueError(f"{name} must have one value per pair ({n}), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t
