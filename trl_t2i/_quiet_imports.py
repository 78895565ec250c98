"""Filters for messages that dependencies log on import and that no trl_t2i user can act on.

PEFT imports bitsandbytes whenever it is installed; on CPU, bitsandbytes then logs that an inference kernel is missing,
on every run. trl_t2i never uses that kernel: it disables the repack that would need it (`disable_bnb_cpu_repack`).
"""

import logging


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)
