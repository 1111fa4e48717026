"""Human feedback for real: a ranking web app backed by a database.

store   tables and transactions (SQLite in WAL mode by default, any SQLAlchemy URL works)
app     the FastAPI app: JSON API under /api/, the ranking page at /
export  rankings JSONL export (readable by instructrl.data.read_rankings) and agreement stats
cli     `instructrl label enqueue | serve | add-labeler | export | stats`
"""
from .store import add_labeler, enqueue_tasks, open_store

__all__ = ["add_labeler", "enqueue_tasks", "open_store"]
