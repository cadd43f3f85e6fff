"""Who we are to Langfuse: the SDK's own environment variables, read in one place,
and the REST client for CLI work."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optimizer import settings

if TYPE_CHECKING:
    from langfuse.api import LangfuseAPI

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BASE_URL",
    "LANGFUSE_BASE_URL",
    "LANGFUSE_HOST",
    "LANGFUSE_PUBLIC_KEY",
    "LANGFUSE_SECRET_KEY",
    "LANGFUSE_TRACING_ENVIRONMENT",
    "LangfuseCredentials",
    "rest_client",
]

#: Public key of the Langfuse project. Default: none (tracing off).
LANGFUSE_PUBLIC_KEY = "LANGFUSE_PUBLIC_KEY"
#: Secret key of the Langfuse project. Default: none (tracing off).
LANGFUSE_SECRET_KEY = "LANGFUSE_SECRET_KEY"
#: Langfuse server URL. Default: ``https://cloud.langfuse.com``.
LANGFUSE_BASE_URL = "LANGFUSE_BASE_URL"
#: Older name of ``LANGFUSE_BASE_URL``, read when that one is unset.
LANGFUSE_HOST = "LANGFUSE_HOST"
#: Langfuse environment of traces and scores (the SDK reads it too). Default: ``default``.
LANGFUSE_TRACING_ENVIRONMENT = "LANGFUSE_TRACING_ENVIRONMENT"
DEFAULT_BASE_URL = "https://cloud.langfuse.com"


@dataclass(frozen=True)
class LangfuseCredentials:
    public_key: str
    secret_key: str
    base_url: str = DEFAULT_BASE_URL

    @classmethod
    def from_env(cls) -> LangfuseCredentials | None:
        """Credentials from the environment, or None (with one log line saying why)."""
        public, secret = settings.env(LANGFUSE_PUBLIC_KEY), settings.env(LANGFUSE_SECRET_KEY)
        if not public or not secret:
            if public or secret:
                log.warning(
                    "Langfuse tracing off: set both %s and %s (only one is set)",
                    LANGFUSE_PUBLIC_KEY,
                    LANGFUSE_SECRET_KEY,
                )
            else:
                log.info(
                    "Langfuse tracing off: set %s and %s to mirror traces and scores",
                    LANGFUSE_PUBLIC_KEY,
                    LANGFUSE_SECRET_KEY,
                )
            return None
        base = settings.env(LANGFUSE_BASE_URL) or settings.env(LANGFUSE_HOST) or DEFAULT_BASE_URL
        return cls(public, secret, base.rstrip("/"))

    def __repr__(self) -> str:  # never print the secret
        return f"LangfuseCredentials(public_key={self.public_key!r}, base_url={self.base_url!r})"


@contextlib.contextmanager
def rest_client(
    credentials: LangfuseCredentials, *, timeout_s: float = 10.0
) -> Iterator[LangfuseAPI]:
    """The SDK's REST client alone (no tracing threads), for CLI work; closed on exit.

    Kept apart from :class:`LangfuseTracer` because the SDK shares one client per
    public key in a process: a tracing-less client made first would disable tracing.
    """
    import httpx
    from langfuse import __version__
    from langfuse.api import LangfuseAPI

    with httpx.Client(timeout=timeout_s) as http:
        yield LangfuseAPI(
            base_url=credentials.base_url,
            username=credentials.public_key,
            password=credentials.secret_key,
            x_langfuse_sdk_name="python",
            x_langfuse_sdk_version=__version__,
            x_langfuse_public_key=credentials.public_key,
            timeout=timeout_s,
            httpx_client=http,
        )
