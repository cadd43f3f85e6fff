"""The ``flywheel`` command line (optimizer side).

``chatbot.cli`` adds the commands that need the chat server, the LLM or
Langfuse (``serve``, ``chat``, ``langfuse``, ``outcomes``) and is the console
script's entry point; this package never imports ``chatbot``.
Heavy imports happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from optimizer.cli import arms, db, demo, fewshot, optimize, privacy, report, scrub, simulate
from optimizer.cli import export as export_cmd
from optimizer.cli import ope as ope_cmd

__all__ = ["app"]

app = typer.Typer(
    name="flywheel",
    help="Flywheel: a chatbot that gets better from its own users.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
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
