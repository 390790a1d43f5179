"""HH-RLHF: splitting its raw dialogues into prompt and final reply, the deterministic train/held-out split by
conversation root, and its chosen/rejected dialogues as :class:`~alignpipe.data.pairing.PreferencePair` lists. Apart
because HH's dialogue format and held-out split serve on their own too (the evaluation suites, the preference data's
held-out split, the SFT stage's chosen side)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from alignpipe.data.errors import LoadReport
from alignpipe.data.pairing import PreferencePair
from alignpipe.data.rows import _finish, _text, load_rows, require_columns

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
# A "Human:" turn marker where a turn could start: the reply's start, a line's start or after a sentence's end
# (spaces may precede it). Not mid-sentence, where HH replies quote it ("a real quote from Human: What is ...").
HH_HUMAN_TURN = re.compile(r"(?:^|\n|[.!?][\"'”’)]?\s)\s*Human:")


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt, final assistant reply).

    The prompt is the raw dialogue up to and including the last ``"\\n\\nAssistant:"``, exactly as in the data
    (leading ``"\\n\\nHuman: "`` and all earlier turns kept); the reply is what follows, stripped of surrounding
    whitespace (HH puts a space, sometimes two, after the colon). Raises ValueError when there is no assistant turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        shown = text[:60] + ("…" if len(text) > 60 else "")
        raise ValueError(f"not an HH-RLHF dialogue (no {HH_ASSISTANT!r} turn): {shown!r}")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:].strip()


def hh_reply_has_human_turn(reply: str) -> bool:
    """Whether an HH reply goes on into a ``Human:`` turn: at its start, at a line's start or after a sentence.

    Why these places: HH replies also write the user's turn without the blank line of a real turn marker
    (``"Human: How do I steal..."`` as the whole reply, or ``"Well that doesn't seem like a good idea.  Human:  Why
    not?"``), which ``"\\n\\nHuman:"`` alone missed (29 rows of harmless-base-test); trained on, a policy learns to
    write the user's next turn. Mid-sentence the word is a quote (``"[Click to copy: Human: ...]"``) and stays."""
    return HH_HUMAN_TURN.search(reply) is not None


HH_HELDOUT_FRACTION = 0.2  # the share of HH conversations every stage holds out of training (the suites draw from it)


def hh_conversation_root(prompt: str) -> str:
    """The conversation an HH-RLHF prompt belongs to: its text before the first ``"\\n\\nAssistant:"`` (the opening
    human turn).

    Why: HH stores one transcript cut at several depths as separate rows, so a shorter row's prompt is a prefix of a
    longer row's, and the longer one goes on with one of the shorter row's replies. Every depth of a conversation
    shares this root, so a split keyed on it keeps the whole conversation on one side. Different conversations that
    open with the same request share it too and stay together, which a held-out split wants as well."""
    return prompt.split(HH_ASSISTANT, 1)[0]


def hh_is_heldout(prompt: str, heldout_fraction: float) -> bool:
    """Deterministic split membership from the sha256 of the prompt's conversation root
    (:func:`hh_conversation_root`): every row of one conversation, at whatever depth HH cut it, lands on the same side
    (a hash of the whole prompt put 32 of the harmless-base test file's 464 held-out pairs beside a training row of
    their own conversation), independently of row order, seeds or machines."""
    root = hh_conversation_root(prompt)
    bucket = int.from_bytes(hashlib.sha256(root.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return bucket < heldout_fraction


HH_EXPECTED = '{"chosen": str, "rejected": str}, each a whole "\\n\\nHuman: …\\n\\nAssistant: …" dialogue'


def load_hh_rlhf_pairs(
    path_or_id: str | Path,
    *,
    split: Literal["train", "heldout"],
    heldout_fraction: float = HH_HELDOUT_FRACTION,
    source_split: str = "train",
    data_dir: str | None = None,
    report: LoadReport | None = None,
) -> list[PreferencePair]:
    """HH-RLHF ``{"chosen", "rejected"}`` dialogues as hard-labelled pairs (strength 1.0) for one part of a
    deterministic train/held-out split.

    The prompt is kept as the **raw multi-turn dialogue string** ending in ``"\\n\\nAssistant:"`` (see
    :func:`split_hh_dialogue`); ``to_trl_rows`` puts it into a single user message. Why not parse the turns into
    chat messages: HH's turn markers also occur inside replies, so re-segmenting would guess, and the raw form is
    what the original RLHF work trained on. chosen/rejected are the final assistant replies.

    Only ~20% of conversations are held out (``heldout_fraction``), chosen by :func:`hh_is_heldout` on the prompt's
    conversation root, so the two parts never share a prompt, nor a conversation cut at another depth.
    ``source_split`` is the split read from the source (a local file is read as that one split); ``data_dir``
    selects a tranche of the Hub dataset, e.g. ``"harmless-base"`` of ``"Anthropic/hh-rlhf"``.

    Skipped and counted: rows whose chosen and rejected disagree on the prompt, lack an assistant turn or go on
    after it (a ``Human:`` turn in a reply, :func:`hh_reply_has_human_turn`: trained on, a policy would learn to
    write the user's next turn) (malformed), an empty reply or a prompt with no text but its turn markers (empty),
    identical replies (identical).
    """
    what = "load_hh_rlhf_pairs"
    if split not in ("train", "heldout"):
        raise ValueError(f"{what}: split must be 'train' or 'heldout', got {split!r}")
    if not (0.0 <= heldout_fraction <= 1.0):
        raise ValueError(f"{what}: heldout_fraction must be in [0, 1], got {heldout_fraction}")
    hub_kwargs = {"data_dir": data_dir} if data_dir else {}
    ds = load_rows(path_or_id, source_split, what=what, expected=HH_EXPECTED, **hub_kwargs)
    source = str(path_or_id)
    require_columns(ds, ("chosen", "rejected"), what=what, source=source, expected=HH_EXPECTED)
    want_heldout = split == "heldout"
    rep = LoadReport(source=f"{source} [{split}]")
    out: list[PreferencePair] = []
    for row in ds:
        rep.rows_in += 1
        chosen_text, rejected_text = _text(row["chosen"]), _text(row["rejected"])
        try:
            prompt, chosen = split_hh_dialogue(chosen_text)
            prompt_r, rejected = split_hh_dialogue(rejected_text)
        except ValueError:
            rep.rows_skipped_malformed += 1
            continue
        if prompt != prompt_r or hh_reply_has_human_turn(chosen) or hh_reply_has_human_turn(rejected):
            rep.rows_skipped_malformed += 1
            continue
        if not chosen or not rejected or not prompt.replace(HH_HUMAN, "").replace(HH_ASSISTANT, "").strip():
            rep.rows_skipped_empty += 1
            continue
        if chosen == rejected:
            rep.rows_skipped_identical += 1
            continue
        if hh_is_heldout(prompt, heldout_fraction) != want_heldout:
            rep.rows_other_split += 1
            continue
        out.append(PreferencePair(prompt, chosen, rejected, 1.0))
    rep.items_out = len(out)
    _finish(rep, report)
    return out
