"""Alembic migrations of the uploads database (tables in dermaid.uploads.db); run by dermaid.uploads.schema.

A new revision, after changing a table in dermaid/uploads/db.py (from the repository root):
    .venv/bin/python -m dermaid.uploads.schema revision "add the reviewers table"   # autogenerate, then review it
"""
