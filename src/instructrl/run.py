"""The run shell every trainer runs in: seed, device, dtype and autocast, rank-0 atomic output, checkpoints and exact
resume, metric sinks, the progress bar, periodic saves and the summary. A trainer keeps only what is its own
(data, models, the loss and its training step) and reads, nanoGPT-style, top to bottom:

    run = Run("sft", cfg, cfg.run, cfg.out)          # seeds, joins torchrun's process group, picks the device
    ...load data and models, build the optimizer...
    state = run.resume(models, optimizer, scheduler, generators) or fresh_state
    with run.output():                                # OUT appears, complete, only at the end (rank 0)
        for step in run.progress(total, start):
            ...forward, loss.backward(), clip, optimizer.step()...
            run.log({"step": step, "train/loss": ...})
            run.maybe_save(step, last=step == total, state=state)
        ...save the models into run.dir...
        return run.finish({...headline numbers...})
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from pathlib import Path

from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import distributed as dist
from .cards import training_card
from .checkpoint import Checkpointer
from .metrics import MetricSinks, check_sinks
from .models import bf16_autocast
from .optim import NonFinite, NonFiniteError
from .options import RunOptions, to_flat
from .outputs import OutputLock, check_output, clean_temporaries, differences, fingerprint, first_nonfinite, \
    inputs_of
from .utils import checkpoint_dir, console, log_dir, peak_rss_mb, resolve_autocast, resolve_device, resolve_dtype, \
    set_seed, write_json


class Run:
    current: "Run | None" = None  # the run in progress: Ctrl-C (cli.main) says where its checkpoints are

    def __init__(self, stage: str, cfg, opts: RunOptions, out: str):
        cfg.validate()  # every rule of the config class and its option groups, before anything loads
        self.t0 = time.time()
        self.stage, self.cfg, self.opts, self.out = stage, cfg, opts, Path(out)
        check_sinks(opts.log_with)
        self.dtype = resolve_dtype(opts.dtype)
        set_seed(opts.seed)
        self.device = dist.init(resolve_device(opts.device))
        self.autocast = resolve_autocast(opts.autocast, self.device, opts.dtype)  # "bf16" | "off", as it runs
        self.nonfinite = NonFinite(stage, opts.max_nonfinite)
        self.checkpoints = Checkpointer(checkpoint_dir(out), opts.keep_checkpoints)
        self.start, self.previous, self.dir, self.metrics = 0, [], None, None
        self._saved: tuple = ({}, None, None, None)
        self.inputs = inputs_of(cfg)
        check_output(out, stage, self.inputs, opts.overwrite)
        if dist.is_main():
            OutputLock(out).check_free()
        self.fingerprint = fingerprint(to_flat(cfg, learned_only=True), inputs_of(cfg, learned_only=True))
        self._check_checkpoints()
        Run.current = self

    def _check_checkpoints(self) -> None:
        """A fresh run never mixes with an earlier run's checkpoints; a resumed one only continues the same run."""
        root, found = self.checkpoints.root, self.checkpoints.steps()
        if found and not self.opts.resume:
            if not self.opts.overwrite:
                raise ValueError(f"{root} holds checkpoints of an earlier run: pass --resume to continue it, or "
                                 f"--overwrite to start afresh (they are then replaced)")
            if dist.is_main():
                for step_dir in found:
                    shutil.rmtree(step_dir)
        saved = root / "fingerprint.json"
        if found and self.opts.resume and saved.is_file():
            diff = differences(json.loads(saved.read_text()), self.fingerprint)
            if diff:
                raise ValueError(f"--resume: the checkpoints in {root} belong to a run with other settings: "
                                 f"{'; '.join(diff)}; resume with the same ones, or start afresh with --overwrite")

    def interrupted(self) -> str:
        """What Ctrl-C leaves: where the newest checkpoint is and how to continue from it."""
        steps = self.checkpoints.steps() if self.checkpoints.root.is_dir() else []
        if not steps:
            return (f"{self.stage} interrupted: no checkpoint was written (--save-every N writes them), so rerun it "
                    f"from the start; {self.out} was not written")
        return (f"{self.stage} interrupted: checkpoints in {self.checkpoints.root} (newest: {steps[0].name}); "
                f"rerun the same command with --resume to continue")

    def resume(self, models: dict, optimizer=None, scheduler=None, generators: dict | None = None) -> dict | None:
        """Declare what a checkpoint holds; with --resume restore the newest one and return its saved state."""
        self._saved = (models, optimizer, scheduler, generators)
        if not self.opts.resume:
            return None
        restored = self.checkpoints.load_latest(models, optimizer, scheduler, generators)
        if restored is None:
            if dist.is_main():
                console.print(f"[yellow]{self.stage}: --resume: no checkpoint in {self.checkpoints.root}; "
                              f"starting from the beginning[/]")
            return None
        self.start, state, self.previous = restored
        if dist.is_main():
            console.print(f"[dim]{self.stage}: resumed from step {self.start} ({self.checkpoints.root})[/]")
        return state

    def last_good(self) -> str:
        steps = self.checkpoints.steps()
        return (f"the last good checkpoint is {steps[0]} (resume from it with --resume)" if steps
                else "no checkpoint was written")

    @contextlib.contextmanager
    def output(self):
        """Rank 0 writes into a temp directory (`run.dir`) that becomes OUT whole, only when the block succeeds;
        it holds OUT's lock meanwhile (a second run on the same OUT stops here, before it writes anything) and
        first removes what a killed run on the same OUT left behind.

        OUT is not written when the run learned nothing (every update skipped) or a saved tensor is not finite:
        NonFiniteError (exit 3), naming the tensor and the last good checkpoint."""
        lock = OutputLock(self.out).acquire() if dist.is_main() else None
        with contextlib.ExitStack() as stack:
            if lock is not None:
                stack.callback(lock.release)
                clean_temporaries(self.out)
            try:
                yield from self._output()
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; {self.out} was not written; {self.last_good()}") from None
            except SafetensorError as e:  # a full disk, in safetensors' words: the OSError it is (exit 4)
                if "code: 28" not in str(e) and "StorageFull" not in str(e):
                    raise
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out)) from None
        Run.current = None  # OUT is written: a later failure (the pipeline's next step) is not this run's

    def _output(self):
        with dist.output_dir(self.out) as tmp, \
                (bf16_autocast(self.device) if self.autocast == "bf16" else contextlib.nullcontext()):
            self.dir = tmp
            self.metrics = MetricSinks(tmp / "metrics.jsonl" if tmp else None, self.previous,
                                       sinks=self.opts.log_with, log_dir=log_dir(self.out),
                                       run_name=f"{self.out.name}-{self.stage}", config=to_flat(self.cfg),
                                       start=self.start)
            try:
                yield tmp
            finally:
                self.metrics.close()
            self.nonfinite.check_learned()
            bad = first_nonfinite(tmp) if tmp is not None else None
            if bad is not None:
                raise NonFiniteError(f"{self.stage}: the trained weights are not finite ({bad})")

    def progress(self, total: int, start: int | None = None, desc: str | None = None):
        """Steps start+1 … total with a progress bar on rank 0."""
        start = self.start if start is None else start
        bar = tqdm(total=total, initial=start, desc=desc or self.stage, dynamic_ncols=True,
                   disable=not (self.opts.progress and dist.is_main()))
        self.bar = bar
        try:
            for step in range(start + 1, total + 1):
                yield step
                bar.update(1)
        finally:
            bar.close()

    def show(self, **values: float) -> None:
        """Numbers beside the progress bar (refreshed with the bar, not forced)."""
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)

    def log(self, record: dict, tables: dict[str, list[dict]] | None = None) -> None:
        self.metrics.log(record, tables)

    def maybe_save(self, step: int, last: bool, state: dict, models: dict | None = None) -> None:
        """A checkpoint every --save-every steps (not after the last step: OUT itself is then written)."""
        if self.opts.save_every and step % self.opts.save_every == 0 and not last:
            saved_models, optimizer, scheduler, generators = self._saved
            self.checkpoints.save(step, models or saved_models, optimizer, scheduler, generators, state=state,
                                  metrics=self.metrics.lines)
            if dist.is_main():
                write_json(self.checkpoints.root / "fingerprint.json", self.fingerprint)
            self.metrics.flush()

    def finish(self, summary: dict) -> dict:
        """The model card, then summary.json, written last: a stage directory with a summary is complete."""
        summary = {"stage": self.stage, **summary, "world_size": dist.world_size(), "seconds": time.time() - self.t0,
                   "peak_rss_mb": peak_rss_mb(), "autocast": self.autocast, "config": to_flat(self.cfg)}
        if self.dir is not None:
            training_card(self.dir, summary)  # README.md: base model, data, options, final metrics, references
            write_json(self.dir / "summary.json", summary)
        return summary
