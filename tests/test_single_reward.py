"""Tests for alignpipe.rewards.single (one TRL-trained reward model) and alignpipe.rewards.loading."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForSequenceClassification, set_seed

from alignpipe.models.tiny import (
    build_tiny_model,
    save_tiny_checkpoint,
    train_tokenizer,
)
from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.rewards.ensemble_encoding import encode_examples
from alignpipe.rewards.ensemble_scorer import EnsembleScorer
from alignpipe.rewards.loading import load_reward_scorer, reward_model_identity
from alignpipe.rewards.single import (
    SingleRewardScorer,
    save_single_reward_model,
    train_single_reward_model,
)
from alignpipe.tasks import preference_pairs, tokenizer_corpus

QUIET = {"disable_tqdm": True, "lr_scheduler_type": "constant"}


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    tokenizer = train_tokenizer(tokenizer_corpus(n=400), vocab_size=160)
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0)
    return str(save_tiny_checkpoint(model, tokenizer, tmp_path_factory.mktemp("llama") / "ckpt"))


@pytest.fixture(scope="module")
def rows() -> Dataset:
    # The gold columns stay: RewardTrainer drops columns its collator does not use.
    return Dataset.from_list(preference_pairs(48, 0, noise=0.3, temperature=0.5))


def _texts(rows: Dataset):
    prompts = [r["prompt"][-1]["content"] for r in rows]
    chosen = [r["chosen"][-1]["content"] for r in rows]
    rejected = [r["rejected"][-1]["content"] for r in rows]
    return prompts, chosen, rejected


TRAINING = {
    "full": {"lora": None, "learning_rate": 3e-3},
    "lora": {"lora": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), "learning_rate": 1e-2},
}


@pytest.fixture(scope="module", params=sorted(TRAINING))
def trained(request, llama_path, rows, tmp_path_factory):
    kind = request.param
    model, tokenizer, trainer = train_single_reward_model(
        llama_path, rows, tmp_path_factory.mktemp(f"trainer-{kind}"), num_train_epochs=10,
        per_device_train_batch_size=16, max_length=128, seed=0, logging_steps=3, config_overrides=QUIET,
        **TRAINING[kind],
    )
    return kind, model, tokenizer, trainer


def _bt(scorer, prompts, chosen, rejected) -> tuple[float, float]:
    p = torch.tensor(scorer.pairwise_probabilities(prompts, chosen, rejected), dtype=torch.float64)
    return float(-p.log().mean()), float((p > 0.5).double().mean())


def test_training_lowers_the_loss_and_raises_accuracy(trained, llama_path, rows):
    kind, model, tokenizer, trainer = trained
    assert isinstance(model, PeftModel) == (kind == "lora")
    assert model.config.alignpipe_text_format == "chat"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 30 and len(losses) == 10
    assert losses[-1] < losses[0] - 0.05

    set_seed(0)  # RewardTrainer seeds the new head the same way before loading
    initial = AutoModelForSequenceClassification.from_pretrained(llama_path, num_labels=1, dtype=torch.float32)
    texts = _texts(rows)
    loss_before, _ = _bt(SingleRewardScorer(initial, tokenizer), *texts)
    loss_after, acc_after = _bt(SingleRewardScorer(model, tokenizer), *texts)
    assert loss_after < loss_before - 0.05
    assert acc_after >= 0.65
    if kind == "lora":  # SEQ_CLS task type: the new score head is trained in full next to the adapters
        trained_head = model.base_model.model.score.modules_to_save["default"].weight
        assert not torch.allclose(trained_head, initial.score.weight)


def test_scorer_feeds_the_model_what_reward_trainer_fed_it(trained, rows):
    _, model, tokenizer, trainer = trained
    prepared = trainer.train_dataset.select(range(6))
    prompts, chosen, rejected = _texts(prepared)
    scorer = SingleRewardScorer(model, tokenizer, batch_size=4)
    # Same token ids: encode_examples' chat-template rendering == TRL's apply_chat_template(prompt + chosen).
    assert [f["input_ids"] for f in scorer.encode_features(prompts, chosen)] == prepared["chosen_ids"]
    assert [f["input_ids"] for f in scorer.encode_features(prompts, rejected)] == prepared["rejected_ids"]
    assert [f["input_ids"] for f in encode_examples(tokenizer, prompts, chosen, max_length=128)] == \
        prepared["chosen_ids"]
    # Same rewards as the model's own forward on TRL's collated batch (right padding, chosen then rejected).
    batch = trainer.data_collator([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                                   for r in prepared])
    with torch.no_grad():
        reference = model(**batch, use_cache=False).logits.squeeze(-1)
    scored = scorer.score(prompts * 2, chosen + rejected)
    assert torch.allclose(scored.mean, reference, atol=1e-5)
    # The tokenizer's padding side does not change what the scorer computes: it pads on the right, like TRL.
    old_side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        assert scorer.encode(prompts, chosen)["attention_mask"][:, 0].tolist() == [1] * len(prompts)
        assert torch.equal(scorer.score(prompts * 2, chosen + rejected).mean, scored.mean)
    finally:
        tokenizer.padding_side = old_side


def test_save_load_round_trip_gives_identical_rewards(trained, rows, tmp_path):
    kind, model, tokenizer, _ = trained
    prompts, chosen, rejected = _texts(rows.select(range(10)))
    in_memory = SingleRewardScorer(model, tokenizer, batch_size=4)
    before = in_memory.score(prompts, chosen)
    assert before.per_member.shape == (10, 1)
    assert torch.equal(before.std, torch.zeros(10))
    assert torch.equal(before.mean, before.per_member[:, 0])
    unmerged = before.per_member.clone()

    directory = save_single_reward_model(model, tokenizer, tmp_path / "rm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no staging directory left behind
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("format", "version", "members", "text_format")} == {
        "format": "alignpipe-reward-single", "version": 1, "members": 1, "text_format": "chat"}
    assert (directory / "model.safetensors").is_file()
    assert not (directory / "adapter_config.json").exists()  # LoRA merged: a plain checkpoint
    save_single_reward_model(model, tokenizer, directory)  # replacing an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]
    # base_model only records where the (merged, whole) weights came from: a judge's identity leaves it out
    identity = reward_model_identity(directory)
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "base_model": "/elsewhere/sft"}))
    assert reward_model_identity(directory) == identity
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "text_format": "plain"}))
    assert reward_model_identity(directory) != identity
    manifest_path.write_text(json.dumps(manifest))

    loaded = load_reward_scorer(directory, batch_size=4)
    assert isinstance(loaded, SingleRewardScorer)
    assert loaded.judge_id == "reward_single:rm" and loaded.text_format == "chat"
    after = loaded.score(prompts, chosen)
    assert after.per_member.shape == (10, 1) and torch.equal(after.std, torch.zeros(10))
    if kind == "lora":
        # Merging is exact up to float32 rounding of W + s·BA (~1e-6 relative); the save/load itself adds nothing.
        assert torch.allclose(after.per_member, before.per_member, rtol=1e-5, atol=1e-6)
        merged = copy.deepcopy(model).merge_and_unload()
        before = SingleRewardScorer(merged, tokenizer, batch_size=4).score(prompts, chosen)
    assert torch.allclose(after.per_member, before.per_member, rtol=0, atol=1e-6)
    # Saving merged a copy: the in-memory (LoRA) model still scores as before.
    assert torch.equal(in_memory.score(prompts, chosen).per_member, unmerged)

    probs = loaded.pairwise_probabilities(prompts, chosen, rejected)
    r_c, r_r = loaded.score(prompts, chosen).mean, loaded.score(prompts, rejected).mean
    assert probs == pytest.approx(torch.sigmoid(r_c.double() - r_r.double()).tolist(), abs=1e-6)
    assert loaded.pairwise_probabilities([], [], []) == []


def test_plain_text_rows_are_scored_as_trained(llama_path, rows, tmp_path):
    """Plain-string rows: TRL appends EOS and concatenates prompt + response with the tokenizer's special tokens;
    the chat template (what encode_examples would use for this tokenizer) is NOT applied."""
    prompts, chosen, rejected = _texts(rows.select(range(8)))
    plain = Dataset.from_dict({"prompt": [p + "\n" for p in prompts], "chosen": chosen, "rejected": rejected})
    model, tokenizer, trainer = train_single_reward_model(
        llama_path, plain, tmp_path / "trainer", learning_rate=1e-3, max_steps=1, per_device_train_batch_size=4,
        max_length=128, seed=0, logging_steps=1, config_overrides=QUIET,
    )
    assert model.config.alignpipe_text_format == "plain"
    scorer = SingleRewardScorer(model, tokenizer)
    assert scorer.text_format == "plain"
    features = [f["input_ids"] for f in scorer.encode_features(plain["prompt"], chosen)]
    assert features == trainer.train_dataset["chosen_ids"]
    assert features[0][-1] == tokenizer.eos_token_id
    chat = [f["input_ids"] for f in encode_examples(tokenizer, plain["prompt"], chosen, max_length=128)]
    assert chat != features
    loaded = load_reward_scorer(save_single_reward_model(model, tokenizer, tmp_path / "rm"))
    assert loaded.text_format == "plain"
    assert torch.allclose(loaded.score(plain["prompt"], chosen).per_member,
                          scorer.score(plain["prompt"], chosen).per_member, rtol=0, atol=1e-6)


def test_loader_returns_an_ensemble_scorer_for_an_ensemble_directory(llama_path, tmp_path):
    spec = EnsembleSpec(backbone=llama_path, members=2, lora_r=2, lora_alpha=4, seed=0)
    directory = RewardEnsemble.create(spec).save(tmp_path / "ensemble")
    scorer = load_reward_scorer(directory, batch_size=4)
    assert isinstance(scorer, EnsembleScorer)
    rewards = scorer.score(["sort: 3 1 2", "count: 4 4"], ["1 2 3", "2"])
    assert rewards.per_member.shape == (2, 2)


def test_loader_rejects_other_directories_naming_them(tmp_path):
    random_dir = tmp_path / "not a model"
    random_dir.mkdir()
    (random_dir / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=re.escape(str(random_dir))):
        load_reward_scorer(random_dir)
    (random_dir / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=re.escape(str(random_dir)) + ".*something-else"):
        load_reward_scorer(random_dir)
    (random_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(random_dir))):
        load_reward_scorer(random_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        load_reward_scorer(tmp_path / "missing")


def test_saving_a_fully_fine_tuned_model_leaves_its_text_format_alone(llama_path, tmp_path, monkeypatch):
    """A fully fine-tuned model is saved as itself (no merged copy); the text format written into its config.json
    must not stay on the caller's model, whether the save succeeds or fails."""
    from alignpipe.models.loading import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(llama_path, num_labels=1)
    tokenizer = load_tokenizer(llama_path, padding_side=None)
    model.config.alignpipe_text_format = "chat"
    directory = save_single_reward_model(model, tokenizer, tmp_path / "rm", text_format="plain")
    assert json.loads((directory / "config.json").read_text())["alignpipe_text_format"] == "plain"
    assert model.config.alignpipe_text_format == "chat"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_single_reward_model(model, tokenizer, tmp_path / "failed", text_format="plain")
    assert model.config.alignpipe_text_format == "chat" and not (tmp_path / "failed").exists()
    assert SingleRewardScorer(model, tokenizer).text_format == "chat"


def _multi_turn_rows() -> Dataset:
    rows = preference_pairs(8, 1, noise=0.3, temperature=0.5)
    for i, row in enumerate(rows):
        if i % 2 == 0:  # half the rows carry a system prompt and an earlier exchange, as a user's TRL file may
            row["prompt"] = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}, *row["prompt"]]
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def test_single_turn_rows_put_a_multi_message_prompt_into_one_user_turn():
    from alignpipe.data.pairing import plain_text
    from alignpipe.rewards.single import single_turn_rows

    rows = _multi_turn_rows()
    flat = single_turn_rows(rows)
    for before, after in zip(rows, flat):
        assert len(after["prompt"]) == 1 and after["prompt"][0]["role"] == "user"
        assert after["prompt"][0]["content"] == plain_text(before["prompt"])
        assert after["chosen"] == before["chosen"] and after["rejected"] == before["rejected"]
    assert flat[0]["prompt"][0]["content"].startswith("\n\nSystem: answer briefly\n\nHuman: hi\n\nAssistant: hello")
    single = Dataset.from_list(preference_pairs(4, 2, noise=0.3, temperature=0.5))
    assert single_turn_rows(single) is single  # nothing to change: the same rows


def test_multi_turn_training_rows_are_tokenised_as_the_scorer_encodes_them(llama_path, tmp_path):
    """TRL would render a multi-message prompt with the chat template turn by turn; the scorer (and PPO, best-of-n,
    the held-out metrics) scores the prompt's plain_text in one user turn. Training on that form keeps them equal."""
    from alignpipe.data.pairing import plain_text

    rows = _multi_turn_rows()
    model, tokenizer, trainer = train_single_reward_model(
        llama_path, rows, tmp_path / "trainer", learning_rate=1e-3, max_steps=1, per_device_train_batch_size=8,
        max_length=128, seed=0, config_overrides=QUIET)
    scorer = SingleRewardScorer(model, tokenizer)
    prompts = [plain_text(r["prompt"]) for r in rows]
    for side in ("chosen", "rejected"):
        texts = [plain_text(r[side]) for r in rows]
        assert [f["input_ids"] for f in scorer.encode_features(prompts, texts)] == trainer.train_dataset[f"{side}_ids"]


@pytest.mark.parametrize("kind", ["ensemble", "single"])
def test_a_recipe_dtype_name_loads_a_scorer_as_its_stage_trained_it(kind, llama_path, tmp_path, monkeypatch):
    """Stages pass the recipe's ``model.dtype`` name. ``auto`` means float32 on the CPU (resolve_dtype, as the reward
    stage trains); handed to transformers as it is, it would load a bf16-saved checkpoint in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    if kind == "ensemble":
        bf16_backbone = tmp_path / "bf16"
        AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16).save_pretrained(bf16_backbone)
        tokenizer.save_pretrained(bf16_backbone)
        saved = RewardEnsemble.create(EnsembleSpec(backbone=str(bf16_backbone), members=2, lora_r=2, lora_alpha=4,
                                                   seed=0)).save(tmp_path / "rm")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(llama_path, num_labels=1, dtype=torch.bfloat16)
        saved = save_single_reward_model(model, tokenizer, tmp_path / "rm")

    def dtypes(scorer) -> set[torch.dtype]:
        module = scorer.ensemble if kind == "ensemble" else scorer.model
        return {p.dtype for p in module.parameters()}

    assert dtypes(load_reward_scorer(saved, dtype="auto")) == {torch.float32}
    heads = {torch.float32} if kind == "ensemble" else set()  # the ensemble's score heads stay float32
    assert dtypes(load_reward_scorer(saved, dtype="bfloat16")) == {torch.bfloat16} | heads
    assert dtypes(load_reward_scorer(saved, dtype=torch.float32)) == {torch.float32}
    # On a bf16-capable GPU an ensemble is trained in bf16 (RewardEnsemble.create with the resolved dtype), while the
    # trl path keeps float32 weights and only autocasts: auto follows each.
    monkeypatch.setattr("alignpipe.models.loading.bf16_supported", lambda: True)
    on_bf16_gpu = {torch.bfloat16} | heads if kind == "ensemble" else {torch.float32}
    assert dtypes(load_reward_scorer(saved, dtype="auto", device="cpu")) == on_bf16_gpu
