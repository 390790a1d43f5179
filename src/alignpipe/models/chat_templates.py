"""Chat templates alignpipe can put on a tokenizer in place of the model's own.

Why: TRL's ``assistant_only_loss=True`` finds the assistant tokens through ``{% generation %}`` markers in the chat
template, and most models' own templates (SmolLM2's included) have none, so assistant-only SFT fails on them.
``CHATML_TEMPLATE`` renders the same ChatML text those models were trained on, with the markers added.
"""

from __future__ import annotations

import hashlib

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message. The assistant's content and its closing
# <|im_end|> sit inside the generation markers (the model must learn to stop), the role header and the trailing newline
# do not. Unlike SmolLM2's own template, no default system prompt is injected when the conversation has none: the data
# decides what the model sees, and the template stays simple. With a system message the text is identical to SmolLM2's.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '" + IM_START + "assistant\\n' -}}"
    "{% generation %}{{- message['content'] + '" + IM_END + "' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
)

CHAT_TEMPLATE_CHOICES = ("own", "chatml")


def template_sha256(choice: str) -> str | None:
    """The sha256 of the template ``choice`` installs (None for ``own``, which installs none): what a chat template
    variant and a run's base hash record, so that a changed template is not taken for the one they were made with."""
    if choice == "own":
        return None
    if choice != "chatml":
        raise ValueError(f"chat_template: {choice!r} is not one of {', '.join(CHAT_TEMPLATE_CHOICES)}")
    return hashlib.sha256(CHATML_TEMPLATE.encode()).hexdigest()


def _is_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token


def apply_chat_template_choice(tokenizer: PreTrainedTokenizerBase, choice: str) -> PreTrainedTokenizerBase:
    """``own`` keeps the tokenizer's template; ``chatml`` installs :data:`CHATML_TEMPLATE` (modifies ``tokenizer``).

    ChatML is only safe when ``<|im_start|>``/``<|im_end|>`` are single tokens of the vocabulary: otherwise they would
    be split into ordinary sub-words the model never saw as turn boundaries, and <|im_end|> could not act as a stop token.
    """
    if choice == "own":
        return tokenizer
    if choice != "chatml":
        raise ValueError(f"chat_template: {choice!r} is not one of {', '.join(CHAT_TEMPLATE_CHOICES)}")
    missing = [token for token in (IM_START, IM_END) if not _is_single_token(tokenizer, token)]
    if missing:
        raise ValueError(
            f"chat_template: chatml needs {' and '.join(missing)} as single tokens, but this tokenizer "
            f"({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) splits them; its "
            "model was not trained on ChatML. Use `chat_template: own` for this model."
        )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def reply_end_ids(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> list[int]:
    """The ids that end an assistant reply as far as the tokenizer knows: its EOS, and the first token its chat
    template (``chat_template``, else its own) writes after a reply when that is a special token
    (:func:`template_turn_end`). What the samplers stop at (with the model's declared end ids,
    :func:`alignpipe.evaluation.generation.end_token_ids`) and where the length reports find a reply's end."""
    ends = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    turn_end = template_turn_end(tokenizer, chat_template)
    return list(dict.fromkeys([*ends, *([] if turn_end is None else [turn_end])]))


def template_turn_end(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> int | None:
    """The first token the chat template writes after an assistant reply, when it is a special token (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``); None when the template writes nothing after the reply or plain text
    (a newline must not end a reply), or renders no assistant turn."""
    reply = "Yes"
    rendered = rendered_turn(tokenizer, reply, chat_template)
    if rendered is None:
        return None
    prompt, turn = rendered
    if not turn.startswith(prompt) or reply not in turn[len(prompt):]:
        return None
    after = turn[len(prompt):].split(reply, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and _is_special(tokenizer, ids[0]) else None


def rendered_turn(tokenizer: PreTrainedTokenizerBase, reply: str, chat_template: str | None = None,
                  ) -> tuple[str, str] | None:
    """A one-message user prompt rendered for the assistant's reply, and the same conversation with ``reply`` as the
    assistant's turn, through ``chat_template`` (else the tokenizer's own); None when the template refuses an
    assistant turn. How the template frames a reply is read from the difference (its end of turn here, its token
    count in preflight's position check)."""
    user = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(user, chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=True)
    try:
        turn = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": reply}],
                                             chat_template=chat_template, tokenize=False)
    except TemplateError:  # a template that raises on an assistant turn: the other end ids still hold
        return None
    return prompt, turn


def _is_special(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """A named special token, or an added token flagged special (Llama 3's ``<|eot_id|>`` is only the latter). An
    added token not flagged special is not enough: it may be text (a newline), and decoding keeps it in the reply."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)
