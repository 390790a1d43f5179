"""Pairwise judges shared by training (OSP, online DPO, SPPO) and evaluation (ALGORITHMS.md §4b).

A pairwise judge returns ``P(a preferred over b | prompt)`` for a batch of triples, in ONE presentation order
(``a`` shown first). Judges that read a prompt (an LLM judge, the policy judging itself) are biased towards a
position; :func:`order_averaged` judges both orders and averages, ``0.5 * (P(a, b) + 1 - P(b, a))``, which cancels
any additive position bias (a judge that always answers "first" with 0.8 averages to exactly 0.5).
:func:`judge_against_anchor` is the OSP ranked-pairing step: every sample against one anchor, K−1 comparisons
per order, the anchor itself at exactly 0.5.

Judges here:

* :class:`GoldPairwiseJudge`: the synthetic task's exact gold judge (hard, or Bradley–Terry with a temperature).
* :class:`RewardJudge`: Bradley–Terry probability from any pointwise reward function (a reward model, gold, ...).
* :class:`SelfJudge`: the policy itself as an LLM judge, strength from the next-token probabilities of the two
  answer labels (the §4b choice: token probabilities, not a sampled verdict).

The evaluation harness keeps its own per-pair :class:`alignpipe.evaluation.harness.Judge` protocol
(``score`` / ``pairwise_probability``); :class:`GoldPairwiseJudge` and :class:`RewardJudge` implement both.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from alignpipe.evaluation.generation import render_prompts
from alignpipe.evaluation.metrics import order_averaged_preference
from alignpipe.rewards.plugin import reward_values
from alignpipe.tasks.synthetic import GoldJudge, preference_probability

log = logging.getLogger("alignpipe")

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_TEMPLATE",
    "GoldPairwiseJudge",
    "PairwiseJudge",
    "RewardJudge",
    "SelfJudge",
    "judge_against_anchor",
    "judge_against_anchors",
    "order_averaged",
    "pair_preferences",
    "preference_matrices",
]


@runtime_checkable
class PairwiseJudge(Protocol):
    """``pairwise_probabilities(prompts, a, b)[i] = P(a[i] preferred over b[i] | prompts[i])``, ``a`` shown first."""

    judge_id: str

    def pairwise_probabilities(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> list[float]: ...


# ---------------------------------------------------------------------------------------------------------------------
# Order averaging and anchor judging
# ---------------------------------------------------------------------------------------------------------------------

def _check_lengths(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> None:
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"prompts, a and b must have the same length, got {len(prompts)}, {len(a)}, {len(b)}")


def _one_order(judge: PairwiseJudge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
    probs = [float(p) for p in judge.pairwise_probabilities(prompts, a, b)]
    if len(probs) != len(prompts):
        raise ValueError(f"judge {judge.judge_id!r} returned {len(probs)} probabilities for {len(prompts)} pairs")
    return probs


def order_averaged(
    judge: PairwiseJudge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
) -> list[float]:
    """``0.5 * (P(a, b) + 1 - P(b, a))`` per triple: both presentation orders, position bias cancelled.

    Makes exactly two judge calls (``a`` first, then ``b`` first), each over the whole batch. Probabilities outside
    [0, 1] raise ValueError (:func:`alignpipe.evaluation.metrics.order_averaged_preference`).
    """
    _check_lengths(prompts, a, b)
    if not prompts:
        return []
    p_ab = _one_order(judge, prompts, a, b)
    p_ba = _one_order(judge, prompts, b, a)
    return [order_averaged_preference(x, y) for x, y in zip(p_ab, p_ba, strict=True)]


def judge_against_anchors(
    judge: PairwiseJudge,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    anchor_indices: Sequence[int],
) -> list[list[float]]:
    """:func:`judge_against_anchor` for many prompts at once, all comparisons in one :func:`order_averaged` call.

    ``responses[j]`` are prompt ``j``'s K_j samples and ``anchor_indices[j]`` its anchor. Returns one strength list
    per prompt, aligned with ``responses[j]``. Use this in trainers: the judge sees large batches.
    """
    if not len(prompts) == len(responses) == len(anchor_indices):
        raise ValueError(
            f"prompts, responses and anchor_indices must have the same length, "
            f"got {len(prompts)}, {len(responses)}, {len(anchor_indices)}"
        )
    flat_prompts: list[str] = []
    flat_a: list[str] = []
    flat_b: list[str] = []
    for j, (prompt, group, anchor) in enumerate(zip(prompts, responses, anchor_indices)):
        if isinstance(group, str):
            raise TypeError(f"responses[{j}] must be a sequence of response strings, not a string")
        if not 0 <= anchor < len(group):
            raise ValueError(f"anchor index {anchor} out of range for prompt {j} with {len(group)} responses")
        for i, response in enumerate(group):
            if i != anchor:
                flat_prompts.append(prompt)
                flat_a.append(response)
                flat_b.append(group[anchor])
    scores = iter(order_averaged(judge, flat_prompts, flat_a, flat_b))
    return [
        [0.5 if i == anchor else next(scores) for i in range(len(group))]
        for group, anchor in zip(responses, anchor_indices)
    ]


def judge_against_anchor(
    judge: PairwiseJudge, prompt: str, responses: Sequence[str], anchor_index: int
) -> list[float]:
    """OSP anchor strengths (§4b steps 1–2): ``s_i = order-averaged P(responses[i] > responses[anchor_index])``.

    The anchor gets exactly 0.5 without being judged; the other K−1 responses are judged against it in both orders
    (two judge calls of K−1 pairs each).
    """
    return judge_against_anchors(judge, [prompt], [responses], [anchor_index])[0]


def preference_matrices(
    judge: PairwiseJudge, prompts: Sequence[str], responses: Sequence[Sequence[str]]
) -> list[list[list[float]]]:
    """Full K×K preference matrices ``P[i][j] = P(y_i ≻ y_j)`` per prompt (SPPO/DNO, ALGORITHMS.md §7b).

    Each unordered pair is judged once in both orders (:func:`order_averaged`, one batched call for every prompt);
    ``P[j][i] = 1 − P[i][j]`` and the diagonal is exactly ½, so the matrix is constant-sum by construction.
    K(K−1) judge evaluations per prompt: with K = 5 that is 20, against OSP's 2(K−1) = 8 anchor comparisons.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)}, {len(responses)}")
    index: list[tuple[int, int, int]] = []
    flat_prompts: list[str] = []
    flat_a: list[str] = []
    flat_b: list[str] = []
    for n, (prompt, group) in enumerate(zip(prompts, responses)):
        if isinstance(group, str):
            raise TypeError(f"responses[{n}] must be a sequence of response strings, not a string")
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                index.append((n, i, j))
                flat_prompts.append(prompt)
                flat_a.append(group[i])
                flat_b.append(group[j])
    matrices = [[[0.5] * len(group) for _ in group] for group in responses]
    for (n, i, j), p in zip(index, order_averaged(judge, flat_prompts, flat_a, flat_b), strict=True):
        matrices[n][i][j], matrices[n][j][i] = p, 1.0 - p
    return matrices


def pair_preferences(
    judge: PairwiseJudge, prompts: Sequence[str], responses: Sequence[Sequence[str]], pairs: Sequence[tuple[int, int]]
) -> list[float]:
    """``P(responses[n][i] ≻ responses[n][j])`` for one index pair ``(i, j)`` per prompt ``n`` (INPO, §10a).

    The entry ``P[i][j]`` of :func:`preference_matrices`, judged the same way (the lower index shown first, both
    orders averaged, one batched call), so it is the same number: 2 judge evaluations per prompt instead of K(K−1).
    """
    if not len(prompts) == len(responses) == len(pairs):
        raise ValueError(f"prompts, responses and pairs must have the same length, "
                         f"got {len(prompts)}, {len(responses)}, {len(pairs)}")
    first: list[str] = []
    second: list[str] = []
    for n, (group, (i, j)) in enumerate(zip(responses, pairs)):
        if i == j or not (0 <= i < len(group) and 0 <= j < len(group)):
            raise ValueError(f"pair {(i, j)} of prompt {n} is not two distinct indices into its {len(group)} responses")
        first.append(group[min(i, j)])
        second.append(group[max(i, j)])
    judged = order_averaged(judge, prompts, first, second)
    return [p if i < j else 1.0 - p for p, (i, j) in zip(judged, pairs, strict=True)]


# ---------------------------------------------------------------------------------------------------------------------
# Gold and reward-derived judges
# ---------------------------------------------------------------------------------------------------------------------

class GoldPairwiseJudge:
    """The synthetic task's exact judge (:class:`alignpipe.tasks.synthetic.GoldJudge`) in the batched protocol.

    ``temperature == 0``: hard verdicts (1, 0, ties 0.5), as win rates use; ``> 0``: Bradley–Terry
    ``sigmoid((g_a - g_b) / temperature)``. Position-free, so order averaging leaves it unchanged. The id is
    GoldJudge's at temperature 0 (the evaluation judge) and carries the temperature otherwise.
    """

    def __init__(self, temperature: float = 0.0):
        self.gold = GoldJudge(temperature)  # validates temperature >= 0
        self.temperature = float(temperature)
        self.judge_id = GoldJudge.judge_id if self.temperature == 0 else f"{GoldJudge.judge_id}:t={self.temperature:g}"

    def pairwise_probabilities(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        _check_lengths(prompts, a, b)
        return [self.gold.pairwise_probability(p, x, y) for p, x, y in zip(prompts, a, b)]

    # The evaluation harness's per-pair Judge protocol.
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.gold.score(prompts, responses)

    def pairwise_probability(self, prompt: str, response_a: str, response_b: str) -> float:
        return self.gold.pairwise_probability(prompt, response_a, response_b)


class RewardJudge:
    """Bradley–Terry preference from a pointwise reward: ``P(a > b) = sigmoid((r_a - r_b) / temperature)``.

    ``reward_fn(prompts, responses) -> list[float]`` is any batched scorer (a reward model, the gold reward, ...);
    ``temperature == 0`` gives hard verdicts with ties at 0.5. Each call scores ``a`` and ``b`` in one
    ``reward_fn`` call. ``judge_id`` names the reward source and is the caller's to choose.
    """

    def __init__(
        self,
        reward_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
        *,
        judge_id: str,
        temperature: float = 1.0,
    ):
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"RewardJudge temperature must be a finite number >= 0, got {temperature}")
        if not judge_id:
            raise ValueError("RewardJudge needs a non-empty judge_id naming the reward source")
        self.reward_fn = reward_fn
        self.judge_id = judge_id
        self.temperature = float(temperature)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        returned = self.reward_fn(list(prompts), list(responses))
        return reward_values(returned, len(responses), f"reward_fn of judge {self.judge_id!r}")

    def pairwise_probabilities(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        _check_lengths(prompts, a, b)
        n = len(prompts)
        if n == 0:
            return []
        rewards = self.score(list(prompts) * 2, list(a) + list(b))
        return [preference_probability(ra, rb, self.temperature) for ra, rb in zip(rewards[:n], rewards[n:])]

    def pairwise_probability(self, prompt: str, response_a: str, response_b: str) -> float:
        return self.pairwise_probabilities([prompt], [response_a], [response_b])[0]


# ---------------------------------------------------------------------------------------------------------------------
# The policy as its own judge
# ---------------------------------------------------------------------------------------------------------------------

#: Answer labels of :class:`SelfJudge`. Digits, not "A"/"B": the tiny task tokenizer is trained on task text only
#: (digits and family words), so "A" is not in its vocabulary at all (it encodes as ['▁', '<unk>']), while "1" and
#: "2" are single tokens ('▁1', '▁2') there and single tokens in every common real tokenizer (GPT-2/Llama-3/Qwen BPE
#: split digits individually). Pass ``labels=("A", "B")`` for a real model if preferred; both are validated.
DEFAULT_LABELS: tuple[str, str] = ("1", "2")

#: The judge question, a single user message. Placeholders: ``{instruction}``, ``{response_a}``, ``{response_b}``
#: (required) and ``{label_a}``, ``{label_b}``. The question comes last, right before the answer position.
DEFAULT_TEMPLATE = (
    "Instruction: {instruction}\n"
    "Response {label_a}: {response_a}\n"
    "Response {label_b}: {response_b}\n"
    "Which response follows the instruction better? Answer {label_a} or {label_b}."
)

_REQUIRED_FIELDS = ("instruction", "response_a", "response_b")


class SelfJudge:
    """The policy as an LLM judge: ``P(a > b) = softmax([logit(label_a), logit(label_b)])[0]`` at the answer position.

    The judge prompt is ``template`` filled with the instruction and the two responses (``a`` as label 0, ``b`` as
    label 1), rendered as one user message in the tokenizer's chat template with ``add_generation_prompt=True``; the
    logits of the next token (the assistant's first token) are read for the two label tokens.

    Label tokens: what matters is the token the model would produce first *at that position*, which may differ
    from ``tokenizer.encode(label)`` (the tiny Metaspace tokenizer writes "1" as '▁1'; SentencePiece tokenizers
    may merge the label with preceding whitespace). So each label's token is found by encoding the rendered judge
    prompt followed by the label and taking the new token; exactly one new token must appear and the prompt's own
    tokens must be unchanged, else ValueError naming the label and its tokenization. The two tokens must differ.

    Runs under ``torch.no_grad`` in eval mode (the model's previous train/eval mode is restored afterwards, since the
    judge is usually the policy being trained), batched with left padding and explicit position ids, ``batch_size``
    prompts per forward pass (sorted by length to limit padding). ``judge_id = f"self:{sha[:8]}"`` with ``sha`` the
    SHA-256 of the template and labels; it does not identify the weights (those change as the policy trains).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = DEFAULT_TEMPLATE,
        labels: tuple[str, str] = DEFAULT_LABELS,
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"SelfJudge batch_size must be >= 1, got {batch_size}")
        labels = tuple(labels)
        if len(labels) != 2 or not all(isinstance(x, str) and x for x in labels) or labels[0] == labels[1]:
            raise ValueError(f"SelfJudge labels must be two distinct non-empty strings, got {labels!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("SelfJudge needs a tokenizer with a chat template (tokenizer.chat_template is None)")
        missing = [f for f in _REQUIRED_FIELDS if "{" + f + "}" not in template]
        if missing:
            raise ValueError(f"SelfJudge template lacks the placeholder(s) {['{' + f + '}' for f in missing]}")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.labels: tuple[str, str] = labels  # type: ignore[assignment]
        self.batch_size = batch_size
        try:
            probe = self.judge_texts(["instruction"], ["first response"], ["second response"])[0]
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"SelfJudge template is not a valid format string for its placeholders: {err!r}") from err
        self.label_token_ids: tuple[int, int] = tuple(self._label_token(probe, x) for x in labels)  # type: ignore
        if self.label_token_ids[0] == self.label_token_ids[1]:
            raise ValueError(f"SelfJudge labels {labels!r} map to the same token id {self.label_token_ids[0]}")
        digest = hashlib.sha256(("\0".join([template, *labels])).encode()).hexdigest()
        self.judge_id = f"self:{digest[:8]}"
        self._warned_long = False
        self._logits_to_keep = True

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _label_token(self, rendered_probe: str, label: str) -> int:
        prefix = self._encode(rendered_probe)
        full = self._encode(rendered_probe + label)
        new = full[len(prefix):]
        if full[:len(prefix)] != prefix or len(new) != 1 or new[0] == self.tokenizer.unk_token_id:
            alone = self.tokenizer.convert_ids_to_tokens(self._encode(label))
            at_answer = self.tokenizer.convert_ids_to_tokens(new) if full[:len(prefix)] == prefix else "(merges with the prompt)"
            raise ValueError(
                f"SelfJudge label {label!r} is not a single known token at the answer position: it tokenizes as "
                f"{alone} alone and as {at_answer} after the judge prompt; choose labels that are single tokens "
                f"in this tokenizer (e.g. {DEFAULT_LABELS})"
            )
        return new[0]

    def judge_texts(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[str]:
        """The rendered judge prompts (chat template applied, generation prompt added), for inspection and tests."""
        _check_lengths(prompts, a, b)
        la, lb = self.labels
        questions = [
            self.template.format(instruction=p, response_a=x, response_b=y, label_a=la, label_b=lb)
            for p, x, y in zip(prompts, a, b)
        ]
        return render_prompts(self.tokenizer, questions)

    def pairwise_probabilities(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        rows = [self._encode(t) for t in self.judge_texts(prompts, a, b)]
        if not rows:
            return []
        self._warn_if_long(max(map(len, rows)))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = [0.0] * len(rows)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    probs = self._forward([rows[i] for i in chunk])
                    for i, p in zip(chunk, probs):
                        out[i] = p
        finally:
            if was_training:
                model.train()
        return out

    def _forward(self, rows: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}
        if self._logits_to_keep:  # only the last position's logits: a (batch, seq, vocab) tensor can be gigabytes
            try:
                logits = self.model(**inputs, logits_to_keep=1).logits
            except TypeError:  # a model whose forward does not take logits_to_keep
                self._logits_to_keep = False
        if not self._logits_to_keep:
            logits = self.model(**inputs).logits
        pair = logits[:, -1, list(self.label_token_ids)].float()
        return torch.softmax(pair, dim=-1)[:, 0].tolist()

    def _warn_if_long(self, length: int) -> None:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not self._warned_long and isinstance(limit, int) and length > limit:
            self._warned_long = True
            log.warning(
                "SelfJudge: judge prompts of up to %d tokens exceed the model's max_position_embeddings=%d; "
                "its judgments extrapolate beyond the trained positions (shorten the template?)", length, limit,
            )
