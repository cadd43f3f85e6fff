"""The optimizer's commands of the ``flywheel`` command line.

``chatbot.cli.app`` builds the whole tree: these commands plus those that need
the chat server, the LLM or Langfuse; this package never imports ``chatbot``.
Heavy imports happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from optimizer.cli import arms, db, demo, fewshot, optimize, privacy, report, scrub, simulate
from optimizer.cli import export as export_cmd
from optimizer.cli import ope as ope_cmd

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the optimizer's commands to ``app`` (the tree is built in ``chatbot.cli.app``)."""
    app.add_typer(db.app, name="db")
    app.add_typer(arms.app, name="arms")
    app.add_typer(privacy.app, name="privacy")
    app.command()(simulate.simulate)
    app.command()(report.report)
    app.command()(demo.demo)
    app.command()(optimize.optimize)
    app.command()(scrub.scrub)
    app.add_typer(fewshot.app, name="fewshot")
    app.command()(export_cmd.export)
    app.command()(ope_cmd.ope)
