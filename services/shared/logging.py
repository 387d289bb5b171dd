"""Logging set-up shared by the services.

Keys must never reach a log. The first line of defence is that no code logs them; this filter is the
second: it masks anything shaped like a provider key in every record, whatever logged it.
"""

from __future__ import annotations

import logging
import sys

import providers


def redact(text: str) -> str:
    """`text` with anything shaped like a key of any registered provider (each module's key prefixes and
    characters, `providers.key_pattern()`) replaced by `[REDACTED]`."""
    return providers.key_pattern().sub("[REDACTED]", text)


class RedactKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(level: str = "INFO", service: str = "byok") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactKeys())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # httpx logs every request URL at INFO; a provider URL may carry a key (Gemini accepts ?key=).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # The provider and credit-service clients are aiohttp's: none of its loggers may print a URL either.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
