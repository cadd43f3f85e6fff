"""Entry point of the ``flywheel`` console script.

Takes the optimizer's commands and adds those that need the chat side.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its cost map

from chatbot.cli_chat import chat, doctor, serve
from optimizer.cli import app

app.command()(serve)
app.command()(chat)
app.command()(doctor)

from chatbot import cli_langfuse  # noqa: E402

cli_langfuse.register(app)  # `flywheel langfuse …`, `flywheel outcomes import`

from chatbot import cli_accounts  # noqa: E402

cli_accounts.register(app)  # `flywheel users …`, `flywheel keys …`

from chatbot import cli_finetune  # noqa: E402

cli_finetune.register(app)  # `flywheel finetune start|status|tick`

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
