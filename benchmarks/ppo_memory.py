"""Peak memory of one PPO iteration vs one SFT step on the same LoRA model (issue target: <= 1.3x).

Each measurement runs in its own subprocess (peak RSS is per process, ``ru_maxrss``), on a randomly initialised
Llama-style model created locally (no downloads):

* SFT step: the model with a LoRA adapter, forward + backward + AdamW step on ``batch`` sequences of
  ``prompt + response`` tokens;
* PPO iteration: :class:`alignpipe.trainers.actor_critic.ActorCritic` with the memory-lean layout (policy and critic
  LoRA adapters on one base, reference = adapters off), sampling ``batch`` responses, old / reference log-probs and
  values, then one minibatch update (``alignpipe.trainers.ppo.minibatch_backward``, the PPO stage's own code) with AdamW.

The workers run with a fixed glibc mmap threshold (``bench_common.MALLOC_ENV``, as ``reward_ensemble.py``'s): under
glibc's dynamic threshold, freed activations stay cached in the heap, so the peak RSS held memory that was no longer
live and the PPO/SFT ratio moved between 1.13x and 1.44x over six runs of the same code. Each pair of
measurements is repeated ``--repeats`` times (default 4: each arm first as often), alternating which arm runs first.

Printed, for each arm: the median and [min-max] over the repeats of the peak RSS and of the same minus the RSS after
imports (what the model and the step add); and of the PPO/SFT ratios of both (one ratio per repeat, from the pair
measured together). Run on demand::

    .venv/bin/python benchmarks/ppo_memory.py [--hidden 512 --layers 8 --batch 16 --new-tokens 32 --repeats 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics

from bench_common import run_worker


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from alignpipe.evaluation.generation import GenerationSettings, generate, render_prompts
    from alignpipe.losses.ppo import gae, masked_whiten
    from alignpipe.models.tiny import build_tiny_model, train_tokenizer
    from alignpipe.recipe import PPOStage
    from alignpipe.tasks import sample_tasks, tokenizer_corpus
    from alignpipe.trainers.actor_critic import ActorCritic, RolloutTensors, response_logprobs
    from alignpipe.trainers.ppo import minibatch_backward

    torch.set_num_threads(1)
    tokenizer = train_tokenizer(tokenizer_corpus(n=400), 160)
    baseline = _rss_mib()
    model = build_tiny_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                             intermediate_size=4 * args.hidden, max_position_embeddings=256, seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    prompts = [t.prompt for t in sample_tasks(args.batch, 0)]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(tokenizer, prompts)]
    responses = [[5] * args.new_tokens for _ in prompts]  # same shape as a full-length rollout
    batch = RolloutTensors.build(prompt_ids, responses, tokenizer.pad_token_id)

    if mode == "sft":
        policy = get_peft_model(model, lora)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits
        logp, _ = response_logprobs(logits, batch)
        (-(logp * batch.response_mask).sum() / batch.response_mask.sum()).backward()
        optimizer.step()
    else:
        actor_critic = ActorCritic(model, lora_config=lora, critic="adapter").eval()
        optimizer = torch.optim.AdamW(actor_critic.trainable_parameters(), lr=1e-4)
        with actor_critic.generating() as policy:
            settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.batch, seed=0)
            generate(policy, tokenizer, prompts, settings, desc="rollout")
        with torch.no_grad():
            old, _ = response_logprobs(actor_critic.policy_logits(batch), batch)
            ref, _ = response_logprobs(actor_critic.reference_logits(batch), batch)
            values = actor_critic.values(batch)
        mask = batch.response_mask
        rewards = torch.zeros_like(mask)
        rewards[:, -1] = 1.0
        advantages, returns = gae(rewards, values, mask, 1.0, 0.95)
        advantages = masked_whiten(advantages, mask)
        # the PPO stage's own defaults (clip ranges, vf_coef, kl_loss_coef, temperature), so they cannot drift apart
        minibatch_backward(actor_critic, batch, old, ref, values, advantages, returns, PPOStage.model_construct())
        optimizer.step()
    return {"mode": mode, "baseline_mib": baseline, "peak_mib": _peak_mib()}


def _spread(values: list[float], fmt: str, unit: str = "") -> str:
    """``median [min-max]`` of ``values``, each formatted with ``fmt``; ``unit`` follows the median."""
    return f"{statistics.median(values):{fmt}}{unit} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4,
                        help="measurements of each arm, alternating which runs first (default 4)")
    parser.add_argument("--mode", choices=["sft", "ppo"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args)))
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    forwarded = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
                 "--new-tokens", str(args.new_tokens)]
    runs: dict[str, list[dict]] = {"sft": [], "ppo": []}
    for repeat in range(args.repeats):
        for mode in ("sft", "ppo") if repeat % 2 == 0 else ("ppo", "sft"):
            runs[mode].append(run_worker(__file__, ["--mode", mode, *forwarded], mode))
    peak = {m: [r["peak_mib"] for r in rs] for m, rs in runs.items()}
    added = {m: [r["peak_mib"] - r["baseline_mib"] for r in rs] for m, rs in runs.items()}
    peak_ratio = [p / s for p, s in zip(peak["ppo"], peak["sft"], strict=True)]
    added_ratio = [p / s for p, s in zip(added["ppo"], added["sft"], strict=True)]
    print(f"model: hidden {args.hidden}, {args.layers} layers, LoRA r=16 all-linear; batch {args.batch}, "
          f"{args.new_tokens} response tokens; {args.repeats} measurement(s) of each, alternating which runs first, "
          "glibc mmap threshold fixed at 256 KiB")
    print("each: median [min-max] over the repeats; RSS in MiB")
    print(f"peak RSS   SFT step {_spread(peak['sft'], '.1f')}   PPO iteration {_spread(peak['ppo'], '.1f')}   "
          f"ratio {_spread(peak_ratio, '.2f', 'x')}")
    print(f"added RSS  SFT step {_spread(added['sft'], '.1f')}   PPO iteration {_spread(added['ppo'], '.1f')}   "
          f"ratio {_spread(added_ratio, '.2f', 'x')}   (peak minus the RSS after imports)")


if __name__ == "__main__":
    main()
