"""What a real-data loader tells its caller: a :class:`DataError` (raised) for data it cannot use, and a
:class:`LoadReport` (counted) for the rows it read and skipped. Apart from the loaders because the CLI, preflight, the
previews and the stages catch the one and read the other without reading any data themselves.

Bad rows (empty prompts or texts, dialogues that cannot be split) are skipped and counted in a
:class:`LoadReport`, mirroring :class:`~alignpipe.data.pairing.PairingReport`: its :meth:`LoadReport.summary` is
logged at INFO, and callers that want the numbers pass ``report=LoadReport()`` and read it afterwards. Structural
problems (a missing file, a missing column or field, a line that is not UTF-8 or not JSON) raise a :class:`DataError`
with the source, the row or line, the column and the expected layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A dataset problem, phrased for the person fixing the file: the file, the row or line and column, and the fix.

    A ValueError, so callers that already catch those (the CLI) keep working."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A dataset path that names no file; also a FileNotFoundError for callers that catch OS errors."""


@dataclass
class LoadReport:
    """What a loader read and what it skipped (the counterpart of ``PairingReport`` for the I/O side)."""

    source: str = ""
    rows_in: int = 0
    rows_skipped_empty: int = 0  # empty prompt (or, for HH and trl pairs, an empty chosen/rejected reply)
    responses_dropped_empty: int = 0  # scored sets: empty response texts removed from an otherwise kept row
    responses_merged_repeated: int = 0  # scored sets: a response text already in its row, merged (mean score)
    rows_skipped_malformed: int = 0  # HH: no "\n\nAssistant:" turn, or chosen and rejected disagree on the prompt
    rows_skipped_identical: int = 0  # HH and trl pairs: chosen reply == rejected reply
    rows_other_split: int = 0  # HH: valid rows that belong to the other (train/heldout) part
    items_out: int = 0  # ScoredSets or PreferencePairs returned
    examples: list[str] = field(default_factory=list)  # the first few rows that cannot give a pair, and why

    def note(self, problem: str) -> None:
        """Keep a few row-level problems, so an error about the whole file can point at rows to look at."""
        if len(self.examples) < 3:
            self.examples.append(problem)

    def summary(self) -> str:
        return (
            f"load {self.source}: {self.rows_in} rows -> {self.items_out} items; skipped {self.rows_skipped_empty} "
            f"empty, {self.rows_skipped_malformed} malformed, {self.rows_skipped_identical} identical, "
            f"{self.rows_other_split} in the other split; dropped {self.responses_dropped_empty} empty responses; "
            f"merged {self.responses_merged_repeated} repeated responses"
        )
