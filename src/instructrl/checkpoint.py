"""Atomic checkpoints to resume a run exactly.

A checkpoint is a directory `DIR/step-00000123/` holding, in safetensors and small JSON files only (nothing is
ever unpickled): model weights, optimizer state, scheduler state, every RNG state (python, numpy, torch and our
own generators), the run's counters and the metrics written so far. It is written to a temp directory, fsynced
and renamed, so it is either complete or absent; the last `keep` are kept. Weights with a NaN or inf are never
saved (NonFiniteError): the newest checkpoint stays the last good one. A corrupt newest checkpoint is
skipped with a warning and the previous one is used.

Models are saved unwrapped (a DDP module's keys are the plain model's) and without frozen weights (under LoRA only
the adapters and heads, the base being re-read from its directory). FSDP-sharded models and their optimizer state
are gathered whole into the same files (see `distributed.gathered_state`) and scattered back to the shards on resume.
Under torch.distributed every rank calls `save`; their random states and per-rank counters are gathered and rank 0
alone writes (`rng.safetensors` for rank 0, `rng.rank{r}.safetensors` for the others); on resume each rank restores
its own.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed as dist
from .models import trainable_state
from .utils import fsync_tree, temp_dir


# --- state to and from safetensors + JSON ------------------------------------------------------------------------
def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Tensors by "param_id.name" and the rest as JSON. FSDP-sharded state (DTensors) is gathered whole: a collective,
    every rank calls it, in the same order (rank 0 keeps the result)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid in sorted(sd["state"]):
        for k, v in sorted(sd["state"][pid].items()):
            if torch.is_tensor(v):
                v = dist.whole(v)
                if dist.is_main():
                    tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    params = [p for group in opt.param_groups for p in group["params"]]
    for pid, st in state.items():  # FSDP: each rank's shard of the state of a sharded parameter (no communication)
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == params[pid].shape:
                st[k] = dist.shard_like(params[pid], v)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generators: dict[str, torch.Generator | random.Random]) -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    meta = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
    for name, g in generators.items():
        if isinstance(g, torch.Generator):
            tensors[f"gen.{name}"] = g.get_state()
        else:
            meta[f"gen.{name}"] = _jsonable(g.getstate())
    return tensors, meta


def set_rng_state(generators: dict, tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    random.setstate(_tuplify(meta["python"]))
    st = meta["numpy"]
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), st[2], st[3], st[4]))
    for name, g in generators.items():
        if isinstance(g, torch.Generator):
            g.set_state(tensors[f"gen.{name}"])
        else:
            g.setstate(_tuplify(meta[f"gen.{name}"]))


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# --- the checkpoint directory ------------------------------------------------------------------------------------------
class Checkpointer:
    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.name.startswith("step-") and p.is_dir()), reverse=True)

    def save(self, step: int, models: dict, optimizer=None, scheduler=None, generators: dict | None = None,
             state: dict | None = None, metrics: list[str] | None = None) -> Path | None:
        """Write a checkpoint (rank 0; the other ranks only contribute their random state and `state`).

        `models` maps names to modules or to plain state dicts (e.g. best weights kept aside)."""
        states = {name: _state(model) for name, model in models.items()}  # FSDP: gathered, every rank calls it
        opt = _optimizer_state(optimizer) if optimizer is not None else None  # the same
        ranks = dist.gather_objects((rng_state(generators or {}), state or {}))
        if not dist.is_main():
            return None
        bad = next((f"{name}.{k}" for name, sd in states.items() for k, v in sd.items()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:  # a checkpoint to resume from is never worse than the one before it
            from .optim import NonFiniteError

            raise NonFiniteError(f"checkpoint of step {step} not written: non-finite tensor {bad}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(self.root, ".step-")
        try:
            for name, sd in states.items():
                sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
                save_file(_dedupe_shared(sd), str(tmp / f"model.{name}.safetensors"))
            meta: dict = {"step": step, "state": state or {}, "world_size": len(ranks),
                          "rank_states": [st for _, st in ranks[1:]], "rank_rng": [m for (_, m), _ in ranks[1:]]}
            if opt is not None:
                t, m = opt
                save_file(t, str(tmp / "optimizer.safetensors"))
                meta["optimizer"] = m
            if scheduler is not None:
                meta["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            (t, m), _ = ranks[0]
            save_file(t, str(tmp / "rng.safetensors"))
            for r, ((t_r, _), _) in enumerate(ranks[1:], start=1):
                save_file(t_r, str(tmp / f"rng.rank{r}.safetensors"))
            meta["rng"] = m
            (tmp / "state.json").write_text(json.dumps(meta))
            (tmp / "metrics.jsonl").write_text("".join(x + "\n" for x in (metrics or [])))
            fsync_tree(tmp)
            final = self.root / f"step-{step:08d}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.steps()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_latest(self, models: dict, optimizer=None, scheduler=None, generators: dict | None = None):
        """Restore the newest readable checkpoint; returns (step, state, metrics lines) or None if none exists.

        Every rank reads the same checkpoint (a shared filesystem across machines) and takes its own random state
        and `state`. A module gets `load_state_dict(strict=False)`; a plain dict target is filled with the tensors.
        """
        r = dist.rank()
        for ckpt in self.steps():
            try:
                weights = {name: load_file(str(ckpt / f"model.{name}.safetensors")) for name in models}
                meta = json.loads((ckpt / "state.json").read_text())
                opt_t = load_file(str(ckpt / "optimizer.safetensors")) if optimizer is not None else None
                rng_t = load_file(str(ckpt / ("rng.safetensors" if r == 0 else f"rng.rank{r}.safetensors")))
                metrics = (ckpt / "metrics.jsonl").read_text().splitlines()
            except Exception as e:  # a truncated or corrupt file: fall back to the previous checkpoint
                warnings.warn(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); trying the previous one")
                continue
            if meta.get("world_size", 1) != dist.world_size():
                raise ValueError(f"checkpoint {ckpt} was written by {meta.get('world_size', 1)} process(es); resume "
                                 f"with the same number (now {dist.world_size()})")
            for name, model in models.items():
                if isinstance(model, dict):
                    model.clear()
                    model.update(weights[name])
                elif dist.is_sharded(_unwrap_ddp(model)):  # FSDP: rank 0's copy scattered to the shards
                    dist.load_gathered_state(model, weights[name])
                else:
                    _unwrap_ddp(model).load_state_dict(weights[name], strict=False)
            if optimizer is not None:
                _load_optimizer_state(optimizer, opt_t, meta["optimizer"])
            if scheduler is not None and "scheduler" in meta:
                scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
            rng_meta, state = (meta["rng"], meta["state"]) if r == 0 else (meta["rank_rng"][r - 1],
                                                                            meta["rank_states"][r - 1])
            set_rng_state(generators or {}, rng_t, rng_meta)
            return meta["step"], state, metrics
        return None


def _unwrap_ddp(model):
    """A DDP module's inner model (its state dict keys are the plain model's); anything else as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _state(model) -> dict:
    """What a checkpoint keeps of a model (or a plain state dict), whole: FSDP shards are gathered (a collective)."""
    if isinstance(model, dict):
        return {k: dist.whole(v) for k, v in model.items()}
    model = _unwrap_ddp(model)
    if dist.is_sharded(model):
        return dist.gathered_state(model)
    return trainable_state(model)


def _dedupe_shared(sd: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): store each storage once; load_state_dict with
    strict=False then re-ties through the model's own tying."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.shape, v.stride())
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.clone() if k in out else v
    return out
