"""A user's mistake ends in one line, `PROG: error: MESSAGE`, with exit status 2 and no traceback:
bad data, a tokenizer, checkpoint or model config we cannot read, a reward function that does not
fit, a run folder that cannot be used as asked, a run stopped by non-finite steps. Each of these
errors already names the file, line, key or flag at fault. GTACORE_DEBUG=1 shows the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from .checkpointing import TrainingError
from .models.checkpoint import CheckpointError
from .models.config import ConfigError
from .models.gguf_tokenizer import GGUFError
from .models.tokenizer import TokenizerError
from .readers import DataError
from .rewards import RewardFnError
from .run_dir import RunFolderError

USER_ERRORS = (DataError, TokenizerError, ConfigError, CheckpointError, GGUFError, RewardFnError, RunFolderError,
               TrainingError)


def main_with_user_errors(main: Callable[[], None]) -> None:
    """Run a command's main(); a user error becomes one line on stderr and exit status 2, named
    as argparse names the command in its own errors."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("GTACORE_DEBUG", "") not in ("", "0"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
