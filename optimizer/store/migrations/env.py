"""Alembic environment: uses the connection handed over by optimizer.store.migrate."""

from __future__ import annotations

from alembic import context

from optimizer.store.engine import make_engine as engine_from_config
from optimizer.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # `alembic` command line: build our own engine
    engine = engine_from_config(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
