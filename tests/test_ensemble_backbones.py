"""The reward ensemble on each backbone family it supports, against the backbone's own forward.

A fresh ensemble's adapters are no-ops (LoRA B = 0), so member k must score ``head_k`` on the native backbone's
output for the pooled token, whatever the padding side, through full forwards and through the shared trunk. The
reference runs each sequence alone without padding, so it needs no padding convention of its own.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, OPTConfig, OPTModel, RobertaConfig, RobertaModel

from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.rewards.ensemble_encoding import collate_features, encode_examples

PROMPTS = ["sort: 3 1 4", "count: 5 5 2 7", "sort: 9 8", "reverse: 1 2 3 4 5 6", "sort: 1"]
RESPONSES = ["1 3 4", "3", "8 9 8 9 8 9 8", "6 5 4 3 2 1", "1"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tokenizer, llama_path) -> dict[str, tuple[str, str]]:
    """arch -> (checkpoint directory, pooling)."""
    out = {"llama": (llama_path, "last")}
    encoders = {"roberta": (RobertaConfig, RobertaModel), "bert": (BertConfig, BertModel)}
    for arch, (config_cls, model_cls) in encoders.items():
        # RoBERTa numbers positions from pad_token_id + 1, so its table has 2 more rows than tokens (514 for 512)
        config = config_cls(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(arch) / "ckpt"
        model_cls(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[arch] = (str(directory), "cls")
    # OPT whose word_embed_proj_dim differs from hidden_size: the decoder projects its output (project_out) to it.
    # Post-LN (opt-350m's shape, no final norm) and pre-LN (final norm, then the projection).
    for arch, pre_ln in (("opt-350m", False), ("opt-pre-ln", True)):
        config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                           ffn_dim=64, num_attention_heads=2, max_position_embeddings=128,
                           do_layer_norm_before=pre_ln, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(arch) / "ckpt"
        OPTModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[arch] = (str(directory), "last")
    return out


def _native_rewards(path: str, pooling: str, ensemble: RewardEnsemble, features) -> torch.Tensor:
    """``[N, K]``: each member's head on the plain backbone's hidden state, one unpadded sequence at a time."""
    native = AutoModel.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for feature in features:
            ids = torch.tensor([feature["input_ids"]])
            hidden = native(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            token = hidden[:, -1] if pooling == "last" else hidden[:, 0]
            rows.append(torch.cat([head(token.float()) for head in ensemble.heads], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("top_layers", [None, 1])
@pytest.mark.parametrize("arch", ["roberta", "bert", "llama", "opt-350m", "opt-pre-ln"])
def test_a_fresh_ensemble_scores_each_members_head_on_the_native_backbone(arch, top_layers, backbones, tokenizer):
    path, pooling = backbones[arch]
    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=path, members=2, pooling=pooling, top_layers=top_layers))
    assert ensemble.hidden_size == (16 if arch.startswith("opt") else 32)  # the width the heads read
    features = encode_examples(tokenizer, PROMPTS, RESPONSES, max_length=64)
    assert len({len(f["input_ids"]) for f in features}) > 1  # the batches below are padded
    want = _native_rewards(path, pooling, ensemble, features)
    old = tokenizer.padding_side
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = collate_features(tokenizer, features)
            with torch.no_grad():
                shared = ensemble(**batch)
                full = torch.stack([ensemble.member_rewards(**batch, member=k) for k in range(2)], dim=1)
            torch.testing.assert_close(full, want, rtol=0, atol=1e-5, msg=f"full forward, {side} padding")
            torch.testing.assert_close(shared, want, rtol=0, atol=1e-5, msg=f"forward, {side} padding")
    finally:
        tokenizer.padding_side = old
    if top_layers is not None:
        assert ensemble.shared_trunk is True  # so forward() above went through the trunk path
