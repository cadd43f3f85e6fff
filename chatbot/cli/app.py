"""The whole ``flywheel`` command tree, built in one place.

Each module adds its own group with ``register(app)``; the optimizer's commands
come from :func:`optimizer.cli.register` (the optimizer never imports the chat
side). Heavy imports happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its cost map

import typer

from chatbot.cli import accounts, chat, finetune, langfuse
from optimizer import cli as optimizer_cli

__all__ = ["app", "main"]

app = typer.Typer(
    name="flywheel",
    help="Flywheel: a chatbot that gets better from its own users.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
optimizer_cli.register(
    app
)  # db, arms, privacy, simulate, report, demo, optimize, scrub, fewshot, export, ope
chat.register(app)  # serve, chat, doctor
langfuse.register(app)  # `flywheel langfuse …`, `flywheel outcomes import`
accounts.register(app)  # `flywheel users …`, `flywheel keys …`
finetune.register(app)  # `flywheel finetune start|status|tick`


def main() -> None:
    app()


if __name__ == "__main__":
    main()
