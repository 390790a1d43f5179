"""Built-in tasks with exact gold rewards (the embedded default)."""

from alignpipe.tasks.synthetic import (
    FAMILIES,
    GoldJudge,
    Task,
    TaskSpace,
    gold_reward,
    heldout_gold_pairs,
    heldout_tasks,
    parse_prompt,
    preference_pairs,
    preference_probability,
    sample_tasks,
    scored_response_sets,
    sft_demonstrations,
    tokenizer_corpus,
)

__all__ = [
    "FAMILIES", "GoldJudge", "Task", "TaskSpace", "gold_reward", "heldout_gold_pairs", "heldout_tasks", "parse_prompt",
    "preference_pairs", "preference_probability", "sample_tasks", "scored_response_sets", "sft_demonstrations",
    "tokenizer_corpus",
]
