"""Entry point of the `seal-train` command line; the commands live in seal_train.commands.

This module imports only the standard library, so that Ctrl-C during the slow imports of torch and
typer reaches main() and ends the program with one line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

EXIT_INTERRUPTED = 130


def _load_app() -> Any:
    from .commands import app

    return app


def __getattr__(name: str) -> Any:
    # Keeps `from seal_train.cli import app` working without importing torch at module import.
    if name == "app":
        return _load_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    try:
        app = _load_app()
    except KeyboardInterrupt:
        print("interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)

    # Configured after the imports: torch sets its own loggers' levels while it is imported, and
    # a torch import cut short by Ctrl-C would otherwise log its INFO messages at exit.
    # Under torchrun only rank 0 reports progress; the other ranks log warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
