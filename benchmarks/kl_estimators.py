"""How well the leaderboard's Monte-Carlo KL estimators recover a known sequence KL, and how their 95% CIs cover it.

A policy and a reference over ``--tokens`` independent positions (``--vocab`` symbols each, Dirichlet-drawn
distributions; the policy's sharper with a smaller ``--concentration``) have an exact sequence KL: the sum of the
per-position KLs. Each of ``--repeats`` evaluations draws ``--samples`` sequences from the policy, as the harness
does, and computes three estimates with the harness's own functions (``alignpipe.evaluation.metrics``) and their
bootstrap CIs (``mean_with_ci``):

* k1 (``kl_ref_k1``): ``log pi(y) - log pi_ref(y)``;
* k3 of the whole-sequence ratio (what ``kl_ref_k3`` was before it was summed per token);
* k3 summed per token (``kl_ref_k3``, :func:`~alignpipe.evaluation.metrics.sequence_kl_k3`).

Printed per estimator: CI coverage of the true KL (0.95 is right), the median estimate, the spread of the estimates
across evaluations, and that spread over k1's (the baseline, measured in the same run). Run on demand::

    .venv/bin/python benchmarks/kl_estimators.py [--tokens 24 --vocab 8 --concentration 0.5 --samples 256]
"""

from __future__ import annotations

import argparse

import numpy as np

from alignpipe.evaluation.metrics import kl_k1, kl_k3, mean_with_ci, sequence_kl_k3


def true_sequence_kl(policy: np.ndarray, reference: np.ndarray) -> float:
    """The exact KL of the policy to the reference over independent positions (rows): the sum of the per-position
    KLs, with ``0 log(0 / q) = 0``. A small Dirichlet concentration draws exact zeros, so this matters."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(policy > 0, policy * np.log(policy / reference), 0.0)
    kl = float(np.sum(terms))
    if not np.isfinite(kl):
        raise ValueError(f"the true KL is {kl}: the reference gives probability 0 to a symbol the policy can draw, so "
                         "KL(policy || reference) is infinite and no estimator can cover it")
    return kl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=24, help="positions per sequence (default 24)")
    parser.add_argument("--vocab", type=int, default=8, help="symbols per position (default 8)")
    parser.add_argument("--concentration", type=float, default=0.5,
                        help="Dirichlet concentration of the policy's distributions; smaller is sharper (default 0.5)")
    parser.add_argument("--samples", type=int, default=256, help="sequences per evaluation (default 256)")
    parser.add_argument("--repeats", type=int, default=150, help="evaluations (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    positions = np.arange(args.tokens)
    policy = rng.dirichlet(np.full(args.vocab, args.concentration), size=args.tokens)
    reference = rng.dirichlet(np.ones(args.vocab), size=args.tokens)
    true_kl = true_sequence_kl(policy, reference)
    estimators = {
        "k1": lambda lp, lr: kl_k1(lp.sum(-1), lr.sum(-1)),
        "k3 of the whole-sequence ratio": lambda lp, lr: kl_k3(lp.sum(-1), lr.sum(-1)),
        "k3 summed per token": lambda lp, lr: sequence_kl_k3(lp.tolist(), lr.tolist()),
    }
    covered = dict.fromkeys(estimators, 0)
    values: dict[str, list[float]] = {name: [] for name in estimators}
    for repeat in range(args.repeats):
        drawn = np.stack([rng.choice(args.vocab, size=args.samples, p=policy[t]) for t in positions], axis=1)
        logp, logp_ref = np.log(policy[positions, drawn]), np.log(reference[positions, drawn])
        for name, estimate in estimators.items():
            metric = mean_with_ci(estimate(logp, logp_ref), resamples=300, seed=repeat, higher_is_better=None)
            covered[name] += metric.ci95[0] <= true_kl <= metric.ci95[1]
            values[name].append(metric.value)
    print(f"true sequence KL {true_kl:.3f} nats ({args.tokens} tokens, {true_kl / args.tokens:.3f} per token); "
          f"{args.repeats} evaluations of {args.samples} samples each")
    baseline = float(np.std(values["k1"]))
    for name in estimators:
        spread = float(np.std(values[name]))
        print(f"  {name:32s} CI coverage {covered[name] / args.repeats:.2f}   median {np.median(values[name]):8.3f}   "
              f"spread {spread:8.3f}   spread / k1's {spread / baseline:6.2f}x")
    print("coverage: share of evaluations whose 95% CI holds the true KL (0.95 is right); spread: the estimates' "
          "standard deviation across evaluations")


if __name__ == "__main__":
    main()
