"""The ``flywheel`` command line; the console script's entry point is :func:`main`."""

from __future__ import annotations

from chatbot.cli.app import app, main

__all__ = ["app", "main"]
