"""Models and datasets named by Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `Anthropic/hh-rlhf`).

An argument that is an existing path is that path. One that is not, but looks like an id (`org/name`), is read from
the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub; `hf download ID` or any earlier download fills it): the
snapshot directory of its `main` revision, which the loaders then read like any local directory (models with
transformers, data with `datasets`). Nothing is downloaded unless INSTRUCTRL_ALLOW_DOWNLOADS=1: an id absent from the
cache, or a mistyped path, is a one-line error at once, never a network lookup that may hang.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ALLOW_DOWNLOADS = "INSTRUCTRL_ALLOW_DOWNLOADS"
# org/name as the Hub spells repository ids: no leading dot or dash, no '..', exactly one '/'
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# what a model needs (weights as safetensors only: pickled weights are never fetched, as never loaded)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]


def looks_like_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name and not name.endswith((".jsonl", ".json", ".parquet"))


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOADS, "").strip().lower() in ("1", "true", "yes")


def local(path: str | os.PathLike, repo_type: str = "model") -> str | os.PathLike:
    """PATH itself when it exists or is no Hub id; else the id's snapshot directory in the Hugging Face cache
    (downloaded first only with INSTRUCTRL_ALLOW_DOWNLOADS=1). A ValueError, at once, when it is not there."""
    name = str(path)
    if Path(name).exists() or not looks_like_id(name):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    allowed, cache = downloads_allowed(), cache_dir()
    try:
        return snapshot_download(name, repo_type=repo_type, local_files_only=not allowed, cache_dir=cache,
                                 allow_patterns=MODEL_FILES if repo_type == "model" else None)
    except LocalEntryNotFoundError:
        what = "model" if repo_type == "model" else "dataset"
        fetch = f"hf download {name}" + ("" if repo_type == "model" else " --repo-type dataset")
        raise ValueError(f"{name}: no such path, and no {what} with this Hub id in the Hugging Face cache "
                         f"({cache}); nothing is downloaded unless {ALLOW_DOWNLOADS}=1 (or fetch it first: "
                         f"`{fetch}`)") from None
    except Exception as e:  # with downloads allowed: the Hub's own answer (unknown id, gated, no network …)
        raise ValueError(f"{name}: could not be fetched from the Hugging Face Hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def cache_dir() -> str:
    """The Hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE
