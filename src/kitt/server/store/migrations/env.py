"""Alembic environment: KITT always hands it a live connection (see ``db.migrate``)."""

from __future__ import annotations

from alembic import context

from kitt.server.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable from a stray `alembic` call
    raise RuntimeError("migrations run on `kitt server start`, not from the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
