"""``alignpipe data``'s output: a :class:`~alignpipe.data.preview.RecipePreview` as terminal text or as one JSON
document (for scripts). Pure formatting: every number comes from :mod:`alignpipe.data.preview`.

Why the two differ: the text shortens long fields so an example row fits a terminal line; the JSON keeps the example
rows exactly as the stage builds them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from alignpipe.data.length_report import PairTruncationCounts
from alignpipe.data.preview import RecipePreview, StageLengths, StagePreview

LABEL = 18  # width of the label column
FIELD = 100  # characters of a field shown before it is cut


def render_json(preview: RecipePreview, exported: Sequence[Path] = ()) -> str:
    """One JSON document: every field of the preview (example rows whole), and the files ``--export`` wrote."""
    document = {f.name: _plain(getattr(preview, f.name)) for f in fields(preview)}
    return json.dumps({**document, "exported": [str(p) for p in exported]}, indent=2, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """Dataclasses as dicts, without a stage's ``rows`` (the dataset itself: --export writes it)."""
    if isinstance(value, StagePreview):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.name != "rows"}
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def render_text(preview: RecipePreview, exported: Sequence[Path] = ()) -> str:
    """The preview as aligned ``label  value`` lines, one block per stage."""
    measured = (f"token lengths with {preview.tokenizer}" if preview.tokenizer
                else f"token lengths not measured: {preview.no_tokenizer}" if preview.no_tokenizer else "")
    lines = [f"recipe {preview.recipe!r} (model {preview.model})" + (f": {measured}" if measured else "")]
    if not preview.stages:
        lines.append("no stage reads a dataset")
    for stage in preview.stages:
        lines += ["", *_stage_lines(stage, preview.no_tokenizer)]
    if preview.without_data:
        lines += ["", "stages without a dataset:"]
        lines += [_row(f"{s.name} ({s.type})", s.note) for s in preview.without_data]
    if exported:
        lines += ["", *(f"wrote {path}" for path in exported)]
    return "\n".join(lines)


def _row(label: str, value: str) -> str:
    return f"  {label:<{LABEL - 2}} {value}" if len(label) < LABEL - 2 else f"  {label} {value}"


def _stage_lines(stage: StagePreview, no_tokenizer: str | None) -> list[str]:
    lines = [f"{stage.name} ({stage.type}): {_source(stage)}"]
    if stage.read is not None:
        lines.append(_row("read", f"{stage.read} rows"))
    for skip in stage.skipped:
        lines.append(_row("skipped", f"{skip.count} {skip.unit if skip.count != 1 else skip.unit[:-1]}: {skip.reason}"))
    if stage.limit is not None:
        picked = (f"a seeded shuffle picked {stage.size} of {stage.before_limit}" if stage.size < stage.before_limit
                  else f"all {stage.before_limit} kept")
        lines.append(_row("limit", f"{stage.limit}: {picked}"))
    labels = f" ({stage.labels} labels{_strengths(stage)})" if stage.labels else ""
    lines.append(_row(stage.unit, f"{stage.size}{labels}"))
    if stage.heldout is not None:
        lines.append(_row("held out", f"{stage.heldout} by prompt hash for the reward metrics; trains on "
                                      f"{stage.size - stage.heldout}"))
    if stage.lengths is not None:
        lines += _length_lines(stage.lengths)
    elif stage.lengths_skipped:
        why = "no tokenizer (see the first line)" if stage.lengths_skipped == no_tokenizer else stage.lengths_skipped
        lines.append(_row("tokens", f"not measured: {why}"))
    for number, row in enumerate(stage.examples, 1):
        lines += [_row(f"example {number}" if i == 0 else "", f"{key}: {_short(value)}")
                  for i, (key, value) in enumerate(row.items())]
    return lines


def _source(stage: StagePreview) -> str:
    if stage.source == "synthetic":
        return "the synthetic task (the recipe's data: block)"
    where = f"hub dataset {stage.path} at commit {stage.commit}" if stage.commit else stage.path
    return f"{stage.source} {where} (split {stage.split})"


def _strengths(stage: StagePreview) -> str:
    s = stage.strengths
    return f": strength mean {s.mean:.3f}, min {s.min:.3f}, max {s.max:.3f}" if s else ""


def _length_lines(lengths: StageLengths) -> list[str]:
    of = (f"a seeded sample of {lengths.measured} of {lengths.sampled_from}, as the stage measures"
          if lengths.sampled_from else f"all {lengths.measured}")
    parts = [("prompt", lengths.prompt), *lengths.replies.items(), ("sequence", lengths.sequence)]
    lines = [_row("tokens", f"p50 / p95 / max of {of}")]
    lines += [_row(f"  {name}", f"{stats.p50} / {stats.p95} / {stats.max}") for name, stats in parts]
    counts = lengths.truncation
    if isinstance(counts, PairTruncationCounts):
        total, cut, whole = counts.pairs, (f"{counts.dropped} dropped (the prompt fills it), {counts.chosen_end_lost} "
                                           f"chosen and {counts.rejected_end_lost} rejected replies lose their end"), \
            f"both replies of every pair whole at {counts.tokens_for_every_pair} tokens"
    else:
        total, cut, whole = counts.examples, f"{counts.reply_lost} lose their whole reply, {counts.end_lost} its end", \
            f"every reply whole at {counts.tokens_for_every_reply} tokens"
    longer = f"{counts.over_max_length} of the {total} measured are longer"
    rows = [longer, cut, whole] if lengths.keeps_start else [longer]
    return [*lines, _row(f"max_length {counts.max_length}", rows[0]), *(_row("", row) for row in rows[1:]),
            _row("", f"({lengths.cut_note})")]


def _short(value: Any) -> str:
    """A field on one line: chat messages as ``role: 'text'`` turns, every text cut to FIELD characters."""
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return " | ".join(f"{m['role']}: {_cut(m.get('content'))}" for m in value)
    return _cut(value)


def _cut(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= FIELD else text[:FIELD - 1] + "…"
