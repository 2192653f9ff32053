"""Keep third-party chatter (load reports, progress bars) off the terminal in every process that loads models."""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    """Silence transformers' info output, its deprecation notices (raised by peft's calls into it, not by
    ours) and tokenizers' fork warning; call before loading any model."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
