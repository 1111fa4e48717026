"""Human feedback for real: a ranking web app backed by a database.

store   tables and transactions (SQLite in WAL mode by default, any SQLAlchemy URL works)
app     the FastAPI app: JSON API under /api/, the ranking page at /, /guidelines and /review
importer  responses you already have (any models, conversations) read into tasks
export  per-labeler or consensus rankings, K-way or pairs, JSONL or parquet (read by instructrl.data.read_rankings);
        agreement and per-model win rates
cli     `instructrl label enqueue | import | serve | add-labeler | revoke | exclude | include | export | stats`
"""
from .store import add_labeler, enqueue_tasks, open_store

__all__ = ["add_labeler", "enqueue_tasks", "open_store"]
