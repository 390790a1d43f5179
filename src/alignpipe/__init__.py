"""alignpipe: staged RLHF / preference-alignment pipeline."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns on import when the optional `kernels` package (a faster 4-bit CPU matmul) is
# missing; every process that imports peft would print it. QLoRA works without it, so keep that one logger quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
