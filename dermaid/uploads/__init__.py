"""The uploads store: consented uploads as blobs on fsspec plus one row each in a SQL database.

    db.py        the SQL tables (SQLAlchemy 2) and the engine factory: the one place for tables
    uploads.py   UploadStore: write blobs, then insert the row in a transaction; read them back
"""
