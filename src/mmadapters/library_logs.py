"""Library log lines that say nothing to a user of our commands, scripts and demo, silenced there only (the library
itself never touches logging configuration): `quiet_library_logs()` is called by `mmadapters ...`, the demo's
`launch` and the scripts in benchmarks/ and experiments/.

bitsandbytes, when installed, tries at import on CPUs with AVX512-BF16 to fetch an optional faster 4-bit kernel
from the Hub (`kernels`); offline it logs a warning and uses its own kernel. With `kernels` installed (transformers
5.25 requires it), `kernels` itself logs that it skips the publisher check offline. MMADAPTERS_VERBOSE=1 keeps them.
"""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def quiet_library_logs() -> None:
    """Raise the level of the QUIET_LOGGERS to ERROR, unless MMADAPTERS_VERBOSE=1."""
    if os.environ.get("MMADAPTERS_VERBOSE") != "1":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
