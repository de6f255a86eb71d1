"""Entry point: `python -m train {fit,validate} ...` (LightningCLI) or `python -m train export CKPT OUT`."""
from __future__ import annotations

import sys

from rwkv_lm.files import CheckpointError

from .corpus import CorpusMissing
from .data import DataError
from .module import ConfigError, TrainingDiverged


def main(argv: list[str] | None = None) -> int:
    """argv None: the command line (LightningCLI then reads sys.argv itself, as it prefers)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["export"]:
            from .export import main as export_main

            export_main(args[1:])
        else:
            from .cli import run

            run(argv)
    except (DataError, ConfigError, CorpusMissing, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
