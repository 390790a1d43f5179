"""Run under a 2-process CPU launch by tests/test_distributed.py: checks what must hold across ranks.

    python -m accelerate.commands.launch --config_file recipes/accelerate/ddp-cpu.yaml --num_processes 2 \
        tests/distributed/probe.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank-<r>.json: the examples its SFT dataloader yields (to check sharding) and the
differences between statistics reduced across ranks and the same statistics of the concatenated batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignpipe.pipeline.stage import init_distributed

SMALL_ENSEMBLE_LR = 1e-2


def resumed_ensemble_run(model_dir: str) -> dict:
    """A 2-member ensemble with LoRA dropout (which draws from each rank's own RNG) trained for 3 steps, logging
    every 2, and trained again from the state it saved after step 1 as a stage resumes: rank 0's copy, loaded by every
    rank. Returns both runs' final weights and logs."""
    from alignpipe.models.loading import load_tokenizer
    from alignpipe.pipeline import distributed
    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
    from alignpipe.rewards.ensemble_training import EnsembleTrainingConfig, train_ensemble
    from alignpipe.tasks import preference_pairs

    rows = preference_pairs(12, 0, noise=0.5, temperature=0.05)
    pairs = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    spec = EnsembleSpec(backbone=model_dir, members=2, lora_r=4, lora_alpha=8, lora_dropout=0.5, top_layers=1,
                        seed=0)
    config = EnsembleTrainingConfig(learning_rate=SMALL_ENSEMBLE_LR, epochs=1, batch_size=4, max_length=48,
                                    logging_steps=2, progress_bar=False)
    saved = {}
    runs = {}
    for name, resume in (("whole", None), ("resumed", "after step 1")):
        ensemble = RewardEnsemble.create(spec)
        history = train_ensemble(ensemble, load_tokenizer(model_dir), pairs, config, save_every=1,
                                 on_save=lambda state: saved.setdefault(state.step, state),
                                 resume=distributed.from_main(saved[1]) if resume else None)
        runs[name] = {"weights": torch.cat([p.detach().reshape(-1) for p in ensemble.trainable_parameters()]).tolist(),
                      "logs": list(history)}
    return runs


def small_ensemble_run(model_dir: str) -> dict:
    """A 2-member reward ensemble trained on 7 pairs in batches of 3 with a tight gradient clip, logging every step.
    On 2 ranks each batch splits unevenly (2 and 1 pairs), and the last batch has 1 pair, so rank 0's share of it is
    empty; it must still step, clip and log with rank 1. Returns the logs and the trained weights (to compare with
    one process)."""
    from alignpipe.models.loading import load_tokenizer
    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
    from alignpipe.rewards.ensemble_training import EnsembleTrainingConfig, train_ensemble
    from alignpipe.tasks import preference_pairs

    rows = preference_pairs(7, 0, noise=0.5, temperature=0.05)
    pairs = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=model_dir, members=2, lora_r=4, lora_alpha=8,
                                                  top_layers=1, seed=0))
    config = EnsembleTrainingConfig(learning_rate=SMALL_ENSEMBLE_LR, epochs=1, batch_size=3, max_length=48,
                                    logging_steps=1, max_grad_norm=0.01, diversity_weight=0.1, progress_bar=False)
    history = train_ensemble(ensemble, load_tokenizer(model_dir), pairs, config)
    weights = torch.cat([p.detach().reshape(-1) for p in ensemble.trainable_parameters()])
    return {"steps": [r["step"] for r in history], "losses": [r["loss"] for r in history],
            "bt_losses": [r["bt_loss"] for r in history], "accuracies": [r["accuracy"] for r in history],
            "weights": weights.tolist()}


# Per-member rewards (K = 3) of each response: low- and high-disagreement responses, then two shared ones.
MEMBER_REWARDS = {"calm": [1.0, 1.0, 1.1], "steady": [0.5, 0.5, 0.6], "wild": [0.0, 2.0, 4.0],
                  "wilder": [-1.0, 1.0, 3.0], "a": [1.0, 1.2, 0.8], "b": [0.0, 0.5, 1.0]}
STEP_RESPONSES = (["calm", "steady", "wild", "wilder"], ["a", "b", "a", "b"])


class _TableScorer:
    """Stands in for a reward ensemble: fixed per-member rewards per response."""

    def score(self, prompts, responses):
        from alignpipe.rewards.penalties import EnsembleRewards

        return EnsembleRewards.from_members(torch.tensor([MEMBER_REWARDS[r] for r in responses]))


def running_std_run(rank: int, world: int) -> dict:
    """UP-RLHF-penalised rewards over two steps, each rank scoring its share of every step (rank 0 the calm
    responses, rank 1 the wild ones, then both the same two). Returns the rewards and the running mean of the std."""
    from alignpipe.rewards.plugin import ModelRewardSource

    source = ModelRewardSource(_TableScorer(), "mean_minus_std", 1.0)
    rewards = []
    for responses in STEP_RESPONSES:
        share = responses[rank * len(responses) // world:(rank + 1) * len(responses) // world]
        rewards.append(source(["p"] * len(share), share).reward.tolist())
    return {"rewards": rewards, "state": source.state_dict()["running_std"]}


def sampled_across_ranks(model_dir: str) -> dict:
    """The online rounds' sampling split over the ranks: 10 prompts in batches of 4 (batches 0 and 2 on rank 0,
    batch 1 on rank 1), gathered on every rank. Returns each sample's token ids, and which batches this rank
    sampled."""
    from alignpipe.evaluation import generation
    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.tasks import TaskSpace, sample_tasks

    prompts = [task.prompt for task in sample_tasks(10, 0, TaskSpace())]
    settings = generation.GenerationSettings(max_new_tokens=8, batch_size=4, seed=11)
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    sampled_here = []
    seed = torch.manual_seed

    def recording_seed(value):
        sampled_here.append(value - settings.seed)
        return seed(value)

    torch.manual_seed = recording_seed
    try:
        generations = generation.generate(model, tokenizer, prompts, settings, across_ranks=True)
    finally:
        torch.manual_seed = seed
    return {"ids": [list(g.response_ids) for g in generations], "batches": sampled_here}


def main(model_dir: str, out_dir: str) -> None:
    state = init_distributed()
    from alignpipe.losses.ppo import masked_moments, masked_whiten, whiten_from_moments
    from alignpipe.pipeline import distributed
    from alignpipe.trainers.ppo import RunningMoments

    rank, world = distributed.rank(), distributed.world_size()
    report: dict = {"rank": rank, "world": world, "accelerate_processes": state.num_processes}

    # advantage whitening and score moments over shards == over the whole batch
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(8, 6, generator=generator) * 3 + 1
    mask = (torch.rand(8, 6, generator=generator) > 0.3).float()
    mine = slice(rank * 4, rank * 4 + 4)
    reduced = whiten_from_moments(full[mine], mask[mine], distributed.all_reduce_sum(masked_moments(full[mine],
                                                                                                   mask[mine])))
    report["whiten_max_error"] = float((reduced - masked_whiten(full, mask)[mine]).abs().max())
    scores = torch.randn(8, generator=generator)
    shared, single = RunningMoments(), RunningMoments()
    shared.update(scores[mine])
    single.combine(8, float(scores.mean()), float(scores.var(correction=0)))
    report["moments_error"] = max(abs(shared.mean - single.mean), abs(shared.var - single.var))

    # averaged gradients are the mean of the ranks' gradients, identical on every rank
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.full((3,), float(rank + 1))
    distributed.average_gradients([parameter])
    report["averaged_gradient"] = parameter.grad.tolist()

    # a non-finite number on one rank stops every rank at the same check (alone, it left the others waiting)
    from alignpipe.trainers.ppo import _require_finite

    try:
        _require_finite(torch.tensor([float("nan") if rank == 1 else 0.0]), "policy loss", "iteration 0")
        report["non_finite_elsewhere"] = None
    except FloatingPointError as error:
        report["non_finite_elsewhere"] = str(error)
    _require_finite(torch.tensor([0.0]), "policy loss", "iteration 1")  # every rank is still in step

    # resuming on several ranks: rank 0 verifies the checkpoints and sets a bad one aside, both get its answer
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.pipeline.stage import verified_trainer_checkpoint

    stage = StageDir(Path(out_dir) / "stage")
    if distributed.is_main():
        stage.root.mkdir(parents=True)
        stage.write_manifest({"status": "running"})
        for step in (2, 4):
            (stage.trainer / f"checkpoint-{step}").mkdir(parents=True)
            (stage.trainer / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
        stage.record_checkpoint(stage.trainer / "checkpoint-2")  # checkpoint-4's save never finished
    distributed.barrier()
    found = verified_trainer_checkpoint(stage)
    report["resume_checkpoint"] = found.name if found else None
    report["set_aside"] = sorted(p.name for p in stage.trainer.iterdir())

    report["small_ensemble"] = small_ensemble_run(model_dir)
    report["resumed_ensemble"] = resumed_ensemble_run(model_dir)
    report["running_std"] = running_std_run(rank, world)
    report["sampled_across_ranks"] = sampled_across_ranks(model_dir)

    # the SFT dataloader gives each rank different examples
    from trl import SFTConfig, SFTTrainer

    from alignpipe.data.synthetic import sft_dataset
    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.recipe import DataSpec

    dataset = sft_dataset(DataSpec(n_sft=64), 0)
    tokenizer = load_tokenizer(model_dir)
    args = SFTConfig(output_dir=str(Path(out_dir) / "trainer"), per_device_train_batch_size=4, max_length=48,
                     use_cpu=True, report_to=[], bf16=False, seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=load_causal_lm(model_dir), args=args, train_dataset=dataset, processing_class=tokenizer)
    examples = []
    for batch in trainer.get_train_dataloader():
        for ids, attention in zip(batch["input_ids"], batch["attention_mask"]):
            examples.append(tokenizer.decode(ids[attention.bool()]))
    report["examples"] = examples

    # a published checkpoint is on disk on every rank when publish_model returns (they load it next: a round's
    # evaluation, the next round), even when rank 0's save is slow
    import time
    from types import SimpleNamespace

    from alignpipe.trainers.common import publish_model

    if distributed.is_main():
        save = trainer.model.save_pretrained
        trainer.model.save_pretrained = lambda *args, **kwargs: (time.sleep(2), save(*args, **kwargs))
    published = Path(out_dir) / "published" / "checkpoint"
    ctx = SimpleNamespace(is_main_process=distributed.is_main(), dir=StageDir(Path(out_dir) / "published"))
    publish_model(trainer, tokenizer, ctx, published)
    report["published_on_return"] = (published / "model.safetensors").exists()
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
