"""Names of the files a Hugging Face checkpoint folder needs, shared by the checks that look for them.

Why a module of its own: the preflight checks a local folder and :mod:`alignpipe.models.hub` checks a cached
snapshot for the same tokenizer files, and the preflight must stay importable without torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

# Files a tokenizer's vocabulary is read from (fast, SentencePiece, BPE and WordPiece tokenizers); a SentencePiece
# model may have another name (DeBERTa's ``spm.model``), so any ``*.model`` counts, and a tiktoken vocabulary is any
# ``*.tiktoken`` file. A folder with none of them has no tokenizer transformers can build.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
TOKENIZER_PATTERNS = ("*.model", "*.tiktoken")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds a file a tokenizer's vocabulary is read from (see :data:`TOKENIZER_FILES`)."""
    return (any((folder / name).is_file() for name in TOKENIZER_FILES)
            or any(path.is_file() for pattern in TOKENIZER_PATTERNS for path in folder.glob(pattern)))
