"""Structured logs: one line per noteworthy thing, JSON or console.

Never log the content of prompts or outputs: log counts, ids and reasons.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import FilteringBoundLogger


def configure(level: str = "info", encoding: str = "console") -> None:
    renderer = (structlog.processors.JSONRenderer() if encoding == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(**bound: object) -> FilteringBoundLogger:
    return structlog.get_logger().bind(**bound)
