"""python -m server: parse flags and PARLEY_* variables, then serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from typing import Sequence

from export.package import PackageError
from server.app import serve
from server.config import parse_config, unknown_variables
from server.engine.memory import keep_freed_memory
from server.logs import configure_logging

log = logging.getLogger("parley.config")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    configure_logging(config.log_level, config.log_format)
    log.info("configuration", extra=dataclasses.asdict(config))
    ignored = unknown_variables(os.environ)
    if ignored:
        log.warning("ignoring environment variables that name no setting: %s", ", ".join(ignored))
    keep_freed_memory()
    try:
        asyncio.run(serve(config))
    except (FileNotFoundError, PackageError, ValueError, RuntimeError) as error:
        sys.exit(f"parley-server: {error}")


if __name__ == "__main__":
    main()
