"""Alembic environment: cliptagd runs migrations itself, on the connection it hands over."""

from alembic import context

from cliptagd.models import Base

connection = context.config.attributes["connection"]
# Batch mode: SQLite can alter a table only by copying it, which batch mode does for us.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
