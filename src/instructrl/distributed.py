"""Several processes on torch.distributed, launched by `torchrun`: data parallel (DDP) by default, FSDP opt-in.

`torchrun --nproc_per_node N -m instructrl.cli sft …` starts N copies of a command; `init` joins them into one
process group from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
NCCL on GPUs, gloo on CPUs. Without torchrun (WORLD_SIZE unset or 1) nothing here touches torch.distributed and
every helper is the identity, so a single process computes bit for bit what it computed before.

The contract the training steps keep:
  * a global batch of B examples is split B/N per rank, and each rank's share into micro-batches (gradient
    accumulation, `micro_batches`); every loss (SFT, RM, PPO, PG, ptx) is normalised by the global count (tokens,
    or prompts with ranked pairs) and × N because DDP averages gradients, so N ranks × k micro-batches give the
    gradients of 1 rank × 1 batch — also when the ranks hold different numbers of tokens;
  * RL ranks sample their own rollouts (seed + rank · SEED_STRIDE) and reduce every statistic that spans the batch
    (advantage whitening, the KL the controller sees, logged metrics);
  * only rank 0 writes: outputs, logs, metrics, checkpoints (which carry every rank's random state).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn

SEED_STRIDE = 100_003  # rank r seeds its random streams with seed + r · SEED_STRIDE (rank 0: the seed itself)


# --- the process group -------------------------------------------------------------------------------------------
def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes, when WORLD_SIZE > 1; a no-op otherwise.

    Returns this process's device: cuda:LOCAL_RANK on GPUs (one GPU per process), else `device` unchanged.
    Rank 0 alone writes outputs, so the others may wait on it for a while: the timeout is generous.
    """
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
        atexit.register(_shutdown)
    return device


def launched() -> bool:
    """Started by torchrun with more than one process (before or after `init`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        tdist.barrier()


def rank_seed(seed: int) -> int:
    """Each rank's seed for its own random streams (sampling, prompt order, ptx text)."""
    return seed + SEED_STRIDE * rank()


# --- reductions ----------------------------------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input itself in a single process)."""
    if not active():
        return t
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size() if active() else t


def all_true(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    if not active():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return bool(t.item() == 0)


def sync_finite(t: torch.Tensor) -> torch.Tensor:
    """`t` in a single process; with several, a scalar that is NaN when `t` is non-finite on any rank. The
    non-finite guard then skips (or stops) on every rank alike: one rank skipping a backward that the others run
    would leave DDP's gradient all-reduce waiting forever."""
    if not active():
        return t
    bad = torch.tensor([0.0 if bool(torch.isfinite(t).all()) else 1.0], device=_comm_device())
    tdist.all_reduce(bad, op=tdist.ReduceOp.SUM)
    return torch.tensor(float("nan") if bad.item() else 0.0)


def mean_dict(stats: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (every rank holds the same keys: its share of the same minibatches)."""
    if not active() or not stats:
        return stats
    keys = sorted(stats)
    t = all_reduce_mean(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device()))
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def sum_floats(*xs: float) -> list[float]:
    """Python numbers summed over ranks (float64)."""
    if not active():
        return list(xs)
    t = all_reduce_sum(torch.tensor(xs, dtype=torch.float64, device=_comm_device()))
    return t.tolist()


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance of the masked entries of `x` over every rank's rows, for whitening with
    global statistics. In one process: exactly `masked_mean` / `masked_var`."""
    from .losses import masked_mean, masked_var

    if not active():
        return masked_mean(x, mask), masked_var(x, mask)
    n = all_reduce_sum(mask.sum()).clamp(min=1)
    mean = all_reduce_sum((x * mask).sum()) / n
    var = all_reduce_sum((((x - mean) ** 2) * mask).sum()) / n
    return mean, var


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable, in memory only), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order (ranks may hold different numbers of rows;
    one collective for all of them). In one process: the tensors themselves."""
    if not active():
        return tensors
    parts = gather_objects(tuple(t.detach().cpu() for t in tensors))
    return tuple(torch.cat([p[i] for p in parts]).to(t.device) for i, t in enumerate(tensors))


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    return gather_rows(t)[0]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


# --- data and models -----------------------------------------------------------------------------------------------
def shard(items: list) -> list:
    """This rank's share of a global batch: items rank, rank + N, rank + 2N, …"""
    return items[rank()::world_size()] if active() else items


def local_batch(batch: list) -> tuple[list, bool]:
    """This rank's share of a global batch. A rank left without examples runs the first one with weight 0, so it
    still joins the gradient all-reduce. Returns (examples, whether they count)."""
    mine = shard(batch)
    return (mine, True) if mine else (batch[:1], False)


def micro_batches(batch: list, size: int) -> list[tuple[list, bool]]:
    """This rank's share of a global batch (`local_batch`) in micro-batches of `size` examples (0: one). Every rank
    gets as many (an FSDP forward is a collective): a rank short of one runs its first example with weight 0.
    Returns [(examples, whether they count)]."""
    mine, counts = local_batch(batch)
    if not size:
        return [(mine, counts)]
    n = math.ceil(math.ceil(len(batch) / world_size()) / size)  # the largest share's count
    chunks = [mine[i * size:(i + 1) * size] for i in range(n)]
    return [(c, counts) if c else (mine[:1], False) for c in chunks]


@contextlib.contextmanager
def accumulating(*models: nn.Module, sync: bool):
    """DDP all-reduces gradients in backward: with `sync` False (every micro-batch but a step's last) the DDP
    wrappers among `models` only accumulate locally (`no_sync`); the last backward then reduces the sum."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    with contextlib.ExitStack() as stack:
        if not sync:
            for m in models:
                if isinstance(m, DDP):
                    stack.enter_context(m.no_sync())
        yield


def eval_share(items: list, model: nn.Module) -> tuple[list, bool]:
    """What this rank evaluates, and whether its results must then be reduced: its share, or everything when the
    model is FSDP-sharded (each forward is a collective, so all ranks must run the same batches)."""
    return (items, False) if is_sharded(model) else (shard(items), active())


def wrap(model: nn.Module, fsdp: bool = False) -> nn.Module:
    """The module to run training forwards through: DDP (gradients averaged over ranks after backward), or the
    model itself — in one process, or when it was sharded in place by `fsdp_shard`. Only trainable parameters
    are synchronised (LoRA: the adapters). Sampling and other no-grad passes use the unwrapped model, so ranks
    may take different numbers of decoding steps without a collective in between."""
    if not active() or fsdp:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    # no buffer broadcast before every forward (newer torch renamed the switch)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=[dev] if dev.type == "cuda" else None, **{no_sync: False})


def fsdp_shard(model: nn.Module) -> nn.Module:
    """FSDP (torch's `fully_shard`): each transformer block (the model's `_no_split_modules`) and then the whole
    model are sharded over the ranks in place; under LoRA the frozen base is sharded too (only the adapters train).
    Every forward is then a collective: RL samples in lockstep. Checkpoints and the final save gather full state
    dicts (`gathered_state`, `full_state_dict`)."""
    from torch.distributed.fsdp import fully_shard

    if not active():
        return model
    _check_lora(model)
    blocks = set(getattr(model, "_no_split_modules", None) or
                 getattr(getattr(model, "backbone", None), "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(model)
    return model


def _check_lora(model: nn.Module) -> None:
    """The final save merges LoRA adapters from the gathered state dict (`models.merged_lora_state`): only adapters
    on linear layers (nn.Linear, GPT-2's Conv1D) without DoRA can be merged there."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and (m.lora_embedding_A or any(m.use_dora.values()) or
                                         type(m.get_base_layer()).__name__ not in ("Linear", "Conv1D")):
            raise ValueError(f"--fsdp with LoRA adapts linear layers only, not {name} "
                             f"({type(m.get_base_layer()).__name__}): choose other --lora-target-modules")


def inference(lockstep: bool):
    """inference_mode, or no_grad for FSDP-sharded models: FSDP reuses its all-gather buffers across calls, and
    tensors made under inference mode cannot be written to outside it."""
    return torch.no_grad() if lockstep else torch.inference_mode()


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict | None:
    """A sharded model's whole state dict (a collective: every rank calls it; on CPU); None for other models,
    whose own `save_pretrained` is used."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- checkpoints of sharded models ----------------------------------------------------------------------------------
# A checkpoint of an FSDP run holds gathered, full state dicts written by rank 0, not per-rank shards (torch's
# distributed checkpoint format): simple, the same safetensors files as without FSDP whatever the process count, so
# any checkpoint reads back in any run; the cost is rank 0's CPU memory for one model (and its Adam state) at save.
def gathered_state(model: nn.Module) -> dict:
    """The trainable part of a sharded model's state dict (`models.trainable_state`'s keys), whole, on CPU: a
    collective (every rank calls it); rank 0 gets the tensors, the other ranks {}. Tied weights are kept once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .models import untied

    return untied(model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                              ignore_frozen_params=True)))


def load_gathered_state(model: nn.Module, sd: dict) -> None:
    """Load a full (gathered) state dict into a sharded model: rank 0's `sd` is scattered to every rank's shards
    (a collective; the other ranks' `sd` is not read). Missing keys (frozen weights, a tied copy) stay as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(sd) if is_main() else {},  # it replaces the dict's values with shards
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A full tensor `t` (the same on every rank) placed as the DTensor `like` is: this rank's shard, taken locally
    without communication; `t` itself when `like` is a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_state_like(model: nn.Module, sd: dict) -> dict:
    """A full state dict (the same on every rank, e.g. read from a checkpoint) as the sharded `model` holds it."""
    ref = model.state_dict()
    return {k: shard_like(ref[k], v) if k in ref else v for k, v in sd.items()}


@contextlib.contextmanager
def output_dir(out: str | os.PathLike):
    """Rank 0: `atomic_dir(out)` (a temp directory renamed to OUT when complete). Other ranks: None, and nothing
    is created. Every rank leaves only once OUT is complete, so a next step on any rank can read it."""
    from .utils import atomic_dir

    if is_main():
        with atomic_dir(out) as tmp:
            yield Path(tmp)
    else:
        yield None
    barrier()
