"""Schema migrations (Alembic): one revision per schema change in `versions/`, applied by `asr db upgrade`.

`models/schema.py` runs them; `env.py` is Alembic's entry point. Revision 0001 is the schema as it stood
when migrations were introduced; a database made by an earlier release (tables created by `create_all`,
no `alembic_version`) is brought up to it by `adopt.py` before the later revisions run.
"""

HEAD = "0010"
"""The newest revision in `versions/`, so that a process finds its database current without importing Alembic
(models/schema.py); tests/test_migrations.py checks it against Alembic's own answer."""
