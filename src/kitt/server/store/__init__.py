"""Persistence: SQLAlchemy models, engine setup, Alembic migrations, and queries."""
