"""The PPO stage's models: policy, reference and critic, laid out to keep one copy of the base weights where possible.

Why by hand: TRL 1.16 has no PPO trainer (its value-head models went with it). The layouts (a recipe choice):

* LoRA policy + ``critic: adapter`` (the memory-lean default): ONE base model carrying two LoRA adapters,
  ``default`` (the policy) and ``critic`` (with a linear value head on the last hidden state). The reference is the
  same base with adapters disabled, so no second copy of the base weights exists;
* ``critic: model``: the critic is a separate copy of the start model's decoder with a value head (fully trained);
* full fine-tuning (``lora: null``): the policy is the model itself and the reference a frozen copy.

Sequences are laid out ``[left-padded prompt | right-padded response]`` (:class:`RolloutTensors`), so the logits
that predict response token ``t`` sit at position ``P − 1 + t`` and the value ``V(s_t)`` is read from the same
position's hidden state.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import Tensor, nn

from alignpipe.models.quantization import merge_adapters_in_full_precision

__all__ = ["ActorCritic", "RolloutTensors", "response_logprobs"]


@dataclass
class RolloutTensors:
    """A batch of (prompt, response) token sequences with the positions of the response tokens."""

    input_ids: Tensor  # [B, P + R]
    attention_mask: Tensor  # [B, P + R]
    response_mask: Tensor  # [B, R] float, 1 on response tokens (right padded)
    prompt_width: int  # P

    @classmethod
    def build(cls, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
              device: torch.device | str = "cpu") -> RolloutTensors:
        width_p = max(map(len, prompt_ids))
        width_r = max(1, max(map(len, response_ids)))
        ids, attention, mask = [], [], []
        for p, r in zip(prompt_ids, response_ids, strict=True):
            lead, tail = width_p - len(p), width_r - len(r)
            ids.append([pad_id] * lead + p + r + [pad_id] * tail)
            attention.append([0] * lead + [1] * (len(p) + len(r)) + [0] * tail)
            mask.append([1.0] * len(r) + [0.0] * tail)
        return cls(torch.tensor(ids, device=device), torch.tensor(attention, device=device),
                   torch.tensor(mask, device=device), width_p)

    def select(self, index: Tensor) -> RolloutTensors:
        return RolloutTensors(self.input_ids[index], self.attention_mask[index], self.response_mask[index],
                              self.prompt_width)

    @property
    def position_ids(self) -> Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_width:]

    def response_slice(self, per_position: Tensor) -> Tensor:
        """The entries (logits, hidden states) at the positions that predict the response tokens."""
        width = self.response_mask.shape[1]
        return per_position[:, self.prompt_width - 1:self.prompt_width - 1 + width]


def response_logprobs(logits: Tensor, batch: RolloutTensors, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token ``log π(a_t | s_t)`` of the response tokens, ``[B, R]``, and the response-position logits.

    ``temperature`` is the sampling temperature: the rollout's tokens come from ``softmax(logits / T)``, so the
    ratio, the KL penalty and the logged KL must use that distribution too (as TRL's GRPO/RLOO do), not ``T = 1``'s.
    """
    logits = batch.response_slice(logits).float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return logp, logits


class ActorCritic(nn.Module):
    """Policy, reference and critic behind three calls: ``policy_logits``, ``reference_logits``, ``values``."""

    def __init__(self, model: nn.Module, *, lora_config, critic: str):
        super().__init__()
        # the width of ``last_hidden_state``, which the head reads: the LM head's input, not config.hidden_size
        # (OPT-350m projects its 1024-wide states to word_embed_proj_dim = 512 before both)
        output = model.get_output_embeddings()
        hidden = output.in_features if isinstance(output, nn.Linear) else model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.critic_mode = critic
        self.reference: nn.Module | None = None
        self.critic_backbone: nn.Module | None = None
        if critic == "model":  # copied before PEFT injects the policy's adapters into ``model``
            self.critic_backbone = copy.deepcopy(_decoder(model)).requires_grad_(True)
        if lora_config is not None:
            self.policy = get_peft_model(model, lora_config)
            if critic == "adapter":
                self.policy.add_adapter("critic", copy.deepcopy(lora_config))
        else:
            if critic == "adapter":
                raise ValueError("critic: adapter needs a LoRA policy (the adapter sits on the policy's base)")
            self.policy = model
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        for name, p in self.policy.named_parameters():  # PEFT's add_adapter may freeze one adapter: keep both
            if "lora_" in name:
                p.requires_grad_(True)
        self._trainable = [p for p in self.parameters() if p.requires_grad]
        self._use("default")

    # --- adapters ---------------------------------------------------------------------------------------------------

    def _use(self, adapter: str) -> None:
        """Activate one adapter; PEFT's ``set_adapter`` also freezes the others, so their flags are restored."""
        if isinstance(self.policy, PeftModel) and self.critic_mode == "adapter":
            self.policy.set_adapter(adapter)
            for p in self._trainable:
                p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable)

    # --- forwards ---------------------------------------------------------------------------------------------------

    def _inputs(self, batch: RolloutTensors) -> dict[str, Tensor]:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids}

    def policy_logits(self, batch: RolloutTensors) -> Tensor:
        self._use("default")
        return self.policy(**self._inputs(batch)).logits

    @torch.no_grad()
    def reference_logits(self, batch: RolloutTensors) -> Tensor:
        if self.reference is not None:
            return self.reference(**self._inputs(batch)).logits
        with self.policy.disable_adapter():
            return self.policy(**self._inputs(batch)).logits

    def values(self, batch: RolloutTensors) -> Tensor:
        """``V(s_t)`` for every response position, ``[B, R]``."""
        if self.critic_backbone is not None:
            hidden = self.critic_backbone(**self._inputs(batch)).last_hidden_state
        else:
            self._use("critic")
            try:
                hidden = _decoder(self.policy)(**self._inputs(batch)).last_hidden_state
            finally:
                self._use("default")
        return self.value_head(batch.response_slice(hidden).float()).squeeze(-1)

    @contextlib.contextmanager
    def generating(self):
        """The policy, ready for ``generate`` (policy adapter active)."""
        self._use("default")
        yield self.policy

    def merged_policy(self, *, full_precision_base: str | None = None, dtype: torch.dtype = torch.float32,
                      workdir: Path | None = None) -> nn.Module:
        """The trained policy as a plain model (LoRA merged, critic adapter dropped) for ``save_pretrained``.

        ``full_precision_base`` (a k-bit QLoRA policy): merge the adapter into an un-quantized reload of that base in
        ``dtype`` instead of into the k-bit weights, which would round the update away.
        """
        if not isinstance(self.policy, PeftModel):
            return self.policy
        if "critic" in self.policy.peft_config:
            self.policy.delete_adapter("critic")
        self.policy.set_adapter("default")
        if full_precision_base is not None:
            return merge_adapters_in_full_precision(self.policy, full_precision_base, dtype=dtype,
                                                    workdir=workdir or Path("."))
        return self.policy.merge_and_unload()


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (LoRA layers injected by PEFT live inside it)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_decoder()

