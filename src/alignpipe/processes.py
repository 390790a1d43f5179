"""Whether a process runs on this machine, for the checks that tell a live writer from one that is gone (the run
lock's holder, a GGUF conversion's temporary folder).

Why a module of its own: the run lock (``pipeline``) and the model cache (``models``) ask the same question, and
neither package should import the other for it.
"""

from __future__ import annotations

import os


def process_exists(pid: object) -> bool:
    """Whether process ``pid`` exists on this machine; one owned by another user counts (it cannot be signalled, but
    runs). Anything that is not a positive process id (a damaged record's value) exists not."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):  # no such process id at all
        return False
    return True
