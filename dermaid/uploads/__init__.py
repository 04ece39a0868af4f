"""The uploads store: consented uploads as blobs on fsspec plus one row each in a SQL database, and their review.

    db.py           the SQL tables (uploads, labels; SQLAlchemy 2) and the engine factory: the one place for tables
    store.py        UploadStore: write blobs, then insert the row in a transaction; read them back
    validation.py   what a review request may carry: upload ids (uuid4), review codes, comments, reviewer names
    agreement.py    votes, consensus and agreement between the reviewers of one upload
    labels.py       LabelStore: add labels, history, the review queue, labeled uploads, Label Studio import
    labelstudio.py  Label Studio's labeling config, uploads as tasks, an export parsed into label rows
    export.py       `dermaid labels-export`: reviewed uploads -> a dataset in the ISIC 2019 training layout
"""
