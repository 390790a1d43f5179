"""The built-in synthetic instruction task with an exact gold reward.

Why it exists: hub downloads are impossible in CI and alignment claims need ground truth. A tiny model learns
these list-manipulation instructions in minutes on a CPU, and because the gold reward is an exact function of
(prompt, response) we can prove that a stage improves it, and watch a learned proxy being over-optimised.

Prompts read ``"<family>: 3 1 4"`` (``"count 3: 3 1 3"`` for the count family); responses are space-separated
integers. The gold reward gives partial credit for correctness, a format bonus, and a penalty per token beyond the
target length. The noisy demonstrator mostly errs by truncating, so in the data longer responses tend to be better
up to the target length while extra tokens are penalised: quality and length are correlated but not identical.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

Family = Literal["copy", "reverse", "sort", "sum", "count"]
FAMILIES: tuple[str, ...] = get_args(Family)
LIST_FAMILIES = frozenset({"copy", "reverse", "sort"})

FORMAT_BONUS = 0.2
EXCESS_TOKEN_PENALTY = 0.15
NUMERIC_CREDIT_SCALE = 5.0  # |answer - truth| at which numeric partial credit reaches 0
HELDOUT_BUCKETS = 8  # one prompt in eight (by content hash) is held out for evaluation


@dataclass(frozen=True)
class Task:
    """One instruction: a family, its items, and (for ``count``) the digit to count."""

    family: str
    items: tuple[int, ...]
    query: int | None = None

    @property
    def prompt(self) -> str:
        head = f"count {self.query}" if self.family == "count" else self.family
        return f"{head}: {' '.join(map(str, self.items))}"

    @property
    def prompt_id(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]

    def target(self) -> list[str]:
        """The exact answer as response tokens."""
        items = list(self.items)
        if self.family == "copy":
            answer = items
        elif self.family == "reverse":
            answer = items[::-1]
        elif self.family == "sort":
            answer = sorted(items)
        elif self.family == "sum":
            answer = [sum(items)]
        elif self.family == "count":
            answer = [items.count(self.query)]
        else:
            raise ValueError(f"unknown task family {self.family!r}; expected one of {FAMILIES}")
        return [str(a) for a in answer]


def _is_int(token: str) -> bool:
    return token.isascii() and token.isdigit()  # str.isdigit alone accepts '²', which int() rejects


def parse_prompt(prompt: str) -> Task:
    """Invert ``Task.prompt``; raises ValueError naming the prompt when it is not a task prompt.

    Items and the counted digit must be non-negative ASCII integers, the only answers the gold reward credits:
    ``int()`` alone would accept ``-3`` or ``٣``, giving a task whose exact answer scores nothing.
    """
    head, sep, body = prompt.partition(":")
    words, item_words = head.split(), body.split()
    try:
        if not sep or not words or not item_words or not all(_is_int(t) for t in item_words + words[1:2]):
            raise ValueError
        items = tuple(int(t) for t in item_words)
        if words[0] == "count" and len(words) == 2:
            return Task("count", items, int(words[1]))
        if len(words) == 1 and words[0] in FAMILIES and words[0] != "count":
            return Task(words[0], items)
    except ValueError:
        pass
    raise ValueError(f"not a synthetic-task prompt: {prompt!r} (expected e.g. 'sort: 3 1 4' or 'count 3: 3 1 3'; "
                     "items and the counted digit are non-negative integers written in ASCII digits)")


def _numeric_credit(answer: str, truth: str) -> float:
    """``max(0, 1 - |answer - truth| / NUMERIC_CREDIT_SCALE)`` for non-negative integer strings.

    A policy may emit a number of any length: the gap is clamped at the scale before it becomes a float (a huge gap
    would overflow one), and an answer too long for ``int()`` to parse earns no credit, as any huge gap does.
    """
    digits = answer.lstrip("0") or "0"
    limit = sys.get_int_max_str_digits()  # 0 means unlimited
    if limit and len(digits) > limit:
        return 0.0
    gap = min(abs(int(digits) - int(truth)), NUMERIC_CREDIT_SCALE)  # int/float comparison is exact, never overflows
    return max(0.0, 1.0 - gap / NUMERIC_CREDIT_SCALE)


def gold_reward(prompt: str, response: str) -> float:
    """Exact gold reward of ``response`` to ``prompt``.

    correctness (in [0, 1]) + FORMAT_BONUS if every token is a non-negative integer
    - EXCESS_TOKEN_PENALTY per token beyond the target length.
    List families score the fraction of target positions answered correctly; numeric families get credit
    ``max(0, 1 - |answer - truth| / NUMERIC_CREDIT_SCALE)`` for their first token.

    A numeric answer is read as a value, so ``07`` earns the credit of ``7``; a list position must be the target's
    own string (``07`` is not ``7``): a list answer is the items written back, a number is a quantity.
    """
    task = parse_prompt(prompt)
    target = task.target()
    tokens = response.split()
    if task.family in LIST_FAMILIES:
        correctness = sum(a == b for a, b in zip(tokens, target)) / len(target)
    elif tokens and _is_int(tokens[0]):
        correctness = _numeric_credit(tokens[0], target[0])
    else:
        correctness = 0.0
    well_formed = bool(tokens) and all(_is_int(t) for t in tokens)
    excess = max(0, len(tokens) - len(target))
    return correctness + FORMAT_BONUS * well_formed - EXCESS_TOKEN_PENALTY * excess


MAX_GOLD = 1.0 + FORMAT_BONUS


class GoldJudge:
    """The gold reward as a judge: pointwise scores and pairwise preference probabilities.

    ``temperature == 0`` gives a hard comparison (1, 0, or 0.5 for a tie), which is what win rates use;
    ``temperature > 0`` gives the Bradley–Terry probability ``sigmoid((g_a - g_b) / temperature)`` used to label pairs.
    """

    judge_id = "gold:synthetic-v1"

    def __init__(self, temperature: float = 0.0):
        if temperature < 0:
            raise ValueError(f"GoldJudge temperature must be >= 0, got {temperature}")
        self.temperature = temperature

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]

    def pairwise_probability(self, prompt: str, response_a: str, response_b: str) -> float:
        return preference_probability(gold_reward(prompt, response_a), gold_reward(prompt, response_b), self.temperature)


def preference_probability(score_a: float, score_b: float, temperature: float) -> float:
    """P(a preferred over b) under Bradley–Terry with the given temperature (0 = hard comparison, ties 0.5)."""
    diff = score_a - score_b
    if temperature == 0:
        return 0.5 if abs(diff) < 1e-12 else float(diff > 0)
    z = diff / temperature
    if z >= 0:  # numerically stable logistic: exp never overflows
        return 1.0 / (1.0 + math.exp(-z))
    return math.exp(z) / (1.0 + math.exp(z))


# ---------------------------------------------------------------------------------------------------------------------
# Seeded generators
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpace:
    """Which tasks the generators draw from (mirrors the recipe's ``data`` block)."""

    families: tuple[str, ...] = FAMILIES
    min_items: int = 3
    max_items: int = 6


def is_heldout(task: Task) -> bool:
    """Held-out membership is a function of the prompt alone, so train and evaluation prompts never overlap."""
    return int(task.prompt_id, 16) % HELDOUT_BUCKETS == 0


def _random_task(rng: random.Random, space: TaskSpace) -> Task:
    family = rng.choice(space.families)
    n = rng.randint(space.min_items, space.max_items)
    items = tuple(rng.randrange(10) for _ in range(n))
    if family == "count":
        # Count a digit that is present most of the time, so answers are not almost always 0.
        query = rng.choice(items) if rng.random() < 0.75 else rng.randrange(10)
        return Task(family, items, query)
    return Task(family, items)


def sample_tasks(n: int, seed: int, space: TaskSpace = TaskSpace(), split: Literal["train", "heldout"] = "train") -> list[Task]:
    """``n`` tasks from one split; heldout tasks are distinct from each other (train tasks may repeat)."""
    rng = random.Random(f"tasks:{split}:{seed}")
    want_heldout = split == "heldout"
    tasks: list[Task] = []
    seen: set[str] = set()
    for _ in range(100 * n + 10_000):
        if len(tasks) == n:
            return tasks
        task = _random_task(rng, space)
        if is_heldout(task) != want_heldout or (want_heldout and task.prompt in seen):
            continue
        seen.add(task.prompt)
        tasks.append(task)
    if len(tasks) == n:
        return tasks
    raise ValueError(
        f"could not draw {n} distinct {split} tasks from families={list(space.families)}, "
        f"items {space.min_items}..{space.max_items}: the task space is too small; "
        "raise data.max_items or lower the number of prompts"
    )


def corrupt(task: Task, rng: random.Random) -> str:
    """One demonstrator mistake. Truncation is the most common, as with real annotators who stop early."""
    tokens = task.target()
    if task.family not in LIST_FAMILIES:
        value = int(tokens[0])
        kind = rng.choices(["off_by", "extend", "empty_ish"], weights=[0.7, 0.2, 0.1])[0]
        if kind == "off_by":
            return str(value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]))
        if kind == "extend":
            return f"{value} {rng.randrange(10)}"
        return "0" if value != 0 else "1"
    kind = rng.choices(["truncate", "substitute", "swap", "extend"], weights=[0.4, 0.25, 0.2, 0.15])[0]
    if kind in ("truncate", "swap") and len(tokens) == 1:  # nothing to drop or swap in a one-item answer
        kind = "substitute"
    if kind == "truncate":
        tokens = tokens[:rng.randint(1, len(tokens) - 1)]
    elif kind == "substitute":
        i = rng.randrange(len(tokens))
        tokens[i] = str((int(tokens[i]) + rng.randint(1, 9)) % 10)
    elif kind == "swap":
        i = rng.randrange(len(tokens) - 1)
        tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        if tokens == task.target():  # swapping equal neighbours changes nothing: substitute instead
            tokens[i] = str((int(tokens[i]) + 1) % 10)
    else:
        tokens = tokens + [str(rng.randrange(10)) for _ in range(rng.randint(1, 2))]
    return " ".join(tokens)


def demonstrate(task: Task, rng: random.Random, noise: float) -> str:
    """The noisy demonstrator: the exact answer, or with probability ``noise`` a corrupted one."""
    return corrupt(task, rng) if rng.random() < noise else " ".join(task.target())


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_demonstrations(n: int, seed: int, noise: float, space: TaskSpace = TaskSpace()) -> list[dict]:
    """Conversational SFT rows (TRL ``messages`` format) from the noisy demonstrator."""
    rng = random.Random(f"sft:{seed}")
    rows = []
    for task in sample_tasks(n, seed, space):
        reply = demonstrate(task, rng, noise)
        rows.append({"messages": _user(task.prompt) + _assistant(reply)})
    return rows


def preference_pairs(
    n: int, seed: int, *, noise: float, temperature: float, label_noise: float = 0.0, space: TaskSpace = TaskSpace(),
    split: Literal["train", "heldout"] = "train",
) -> list[dict]:
    """Conversational preference rows (TRL ``prompt``/``chosen``/``rejected``) labelled by Bradley–Terry on gold.

    Two distinct demonstrator responses are drawn per prompt; the first is chosen with probability
    ``sigmoid((g_1 - g_2) / temperature)``, then the label is flipped with probability ``label_noise``.
    Gold scores are kept as columns so reward-model accuracy can be checked against the truth.
    """
    rng = random.Random(f"pairs:{seed}")
    rows = []
    for task in sample_tasks(n, seed + 7919, space, split):
        first = demonstrate(task, rng, noise)
        second = demonstrate(task, rng, noise)
        for _ in range(20):
            if second != first:
                break
            second = corrupt(task, rng)
        if second == first:
            continue
        g1, g2 = gold_reward(task.prompt, first), gold_reward(task.prompt, second)
        first_wins = rng.random() < preference_probability(g1, g2, temperature)
        if rng.random() < label_noise:
            first_wins = not first_wins
        chosen, rejected = (first, second) if first_wins else (second, first)
        rows.append({
            "prompt": _user(task.prompt),
            "chosen": _assistant(chosen),
            "rejected": _assistant(rejected),
            "chosen_gold": gold_reward(task.prompt, chosen),
            "rejected_gold": gold_reward(task.prompt, rejected),
        })
    return rows


def heldout_gold_pairs(n: int, seed: int, space: TaskSpace = TaskSpace()) -> list[tuple[str, str, str]]:
    """``n`` (prompt, better, worse) pairs on distinct prompts of the held-out split, which no training stage draws
    from (:func:`is_heldout`), ordered by the gold reward; pairs gold scores equal are left out. For measuring whether
    a model learned the true ordering on prompts it never saw. A smaller ``n`` gives a prefix of a larger one's."""
    drawn = n
    while True:
        try:
            rows = preference_pairs(drawn, seed, noise=0.5, temperature=0.1, space=space, split="heldout")
        except ValueError as error:  # it names the enlarged draw, not the n asked for
            raise ValueError(f"too few distinct held-out prompts for {n} gold-ordered pairs ({error})") from error
        pairs = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["chosen_gold"],
                  r["rejected_gold"]) for r in rows]
        ordered = [(p, c, r) if gc > gr else (p, r, c) for p, c, r, gc, gr in pairs if gc != gr]
        if len(ordered) >= n:
            return ordered[:n]
        drawn = max(drawn + n - len(ordered), round(drawn * 1.25))


def scored_response_sets(n: int, seed: int, *, k: int, noise: float, space: TaskSpace = TaskSpace()) -> list[dict]:
    """UltraFeedback-shaped rows: ``k`` demonstrator responses per prompt with their gold scores."""
    if k < 2:
        raise ValueError(f"scored_response_sets needs k >= 2 responses per prompt, got k={k}")
    rng = random.Random(f"sets:{seed}")
    rows = []
    for task in sample_tasks(n, seed + 104729, space):
        responses = [demonstrate(task, rng, noise) for _ in range(k)]
        rows.append({
            "prompt": task.prompt,
            "responses": responses,
            "scores": [gold_reward(task.prompt, r) for r in responses],
        })
    return rows


def heldout_tasks(n: int, seed: int, space: TaskSpace = TaskSpace()) -> list[Task]:
    """Evaluation prompts, disjoint from every training split."""
    return sample_tasks(n, seed, space, split="heldout")


def longest_prompts(space: TaskSpace = TaskSpace(), n: int = 32, seed: int = 0) -> list[str]:
    """``n`` prompts of every family at the space's most items, digits drawn at random: the longest prompts the task
    poses, to check a model's positions before a run samples (a sample, since a tokenizer may merge some digits)."""
    rng = random.Random(f"longest:{seed}")
    prompts = []
    for family in space.families:
        for _ in range(n):
            items = tuple(rng.randrange(10) for _ in range(space.max_items))
            prompts.append(Task(family, items, rng.randrange(10) if family == "count" else None).prompt)
    return prompts


def tokenizer_corpus(space: TaskSpace = TaskSpace(), seed: int = 0, n: int = 3000) -> list[str]:
    """Texts that cover the task's whole surface vocabulary, for training the tiny model's tokenizer."""
    rng = random.Random(f"corpus:{seed}")
    texts = [f"{family} count" for family in FAMILIES]
    texts += [" ".join(str(i) for i in range(100))]
    for task in sample_tasks(n, seed, space):
        texts.append(task.prompt)
        texts.append(demonstrate(task, rng, noise=0.5))
    return texts
