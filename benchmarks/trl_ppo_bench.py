"""TRL 1.12's PPOTrainer on protocol P / P-long (see ppo_bench.py), for the comparison of issue 8.

Runs in a SEPARATE virtual environment that has trl (it is not a dependency of this project):

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install torch==2.13.0        # CPU wheel
    /tmp/trlvenv/bin/pip install trl==1.12.0
    .venv/bin/python benchmarks/ppo_bench.py setup    # models + prompts in /tmp/instructrl_ppo_bench
    /tmp/trlvenv/bin/python benchmarks/trl_ppo_bench.py --response 32 --iters 6 --warmup 1

Identical models: the policy and ref are loaded from the same directory as ours; the reward and value models are
GPT2ForSequenceClassification(num_labels=1) holding the same backbone weights and the same (bias-free) head as
our ScalarHeadModel reward model (written by `ppo_bench.py setup` to trl_reward/ and trl_value/). Same prompts
(exactly 16 tokens, no padding), 64 per iteration.

TRL options (all others are TRL's defaults): per_device_train_batch_size 64, gradient_accumulation_steps 1,
num_ppo_epochs 4, num_mini_batches 4 (minibatch 16 -> 16 optimizer steps per iteration), response_length 32/96,
temperature 0.7, kl_coef 0.05 (k1), cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, gamma 1, lam 0.95,
learning_rate 1e-5 with lr_scheduler_type "constant", adam_epsilon 1e-5 (ours), stop_token None, missing_eos_penalty
None, bf16 False (TRL's PPOConfig defaults bf16 to True: it must be switched off), gradient_checkpointing False,
use_cpu True, num_sample_generations 0 (no extra sampling of completions), report_to none, save_strategy no,
local_rollout_forward_batch_size 64 (the default; one generation call of 64), seed 0. TRL's default optimizer is
used (adamw_torch_fused on torch >= 2.8; weight decay 0); TRL does not clip the gradient norm in its PPO loop.

Timing: a callback takes the time at each on_step_end (one per PPO iteration, "update"); an iteration is the time
between consecutive step ends (the first one is measured from on_train_begin), in wall time and in this process's
CPU time (time.process_time; the robust number with --threads 1 on a shared machine). Phases: `batch_generation` (the
module-level function PPOTrainer.train calls) is wrapped with a timer = generation; the first gradient-enabled
call of the module-level `forward` marks the start of training; scoring = the rest of the rollout (ref forward,
value and reward `get_reward`, log-softmaxes, GAE). Peak RSS = ru_maxrss of this process (one config per process).
Prints one RESULT json line, like ppo_bench.py run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_bench import cpu_line  # noqa: E402  (this tree's instructrl.machine, loaded by path: TRL's venv lacks it)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("PPO_BENCH_DIR", "/tmp/instructrl_ppo_bench"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="TRL's bf16=True")
    ap.add_argument("--bf16-env", action="store_true",
                    help="bf16=True and ACCELERATE_MIXED_PRECISION=bf16 (what `accelerate launch --mixed_precision "
                         "bf16` sets): PPOTrainer builds its own Accelerator(), which reads mixed precision from this "
                         "variable only, so bf16=True alone leaves it in float32")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="one tiny iteration on a tiny setup (seconds; CI); says so "
                                                         "and exits 0 where TRL is not installed")
    a = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print(f"trl_ppo_bench: TRL is not installed in {sys.executable} (it is not a dependency of instructrl; the "
              f"docstring says how to make its venv): {'smoke skipped' if a.smoke else 'nothing measured'}")
        sys.exit(0 if a.smoke else 2)
    if a.smoke:
        return smoke(a)

    if a.bf16_env:
        a.bf16 = True
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import torch

    torch.set_num_threads(a.threads)
    la0 = loadavg()
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as T

    transformers.logging.set_verbosity_error()
    d = Path(a.dir)
    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(str(d / "policy"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(d / "policy"), dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(d / "trl_reward"), num_labels=1,
                                                                dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(str(d / "trl_value"), num_labels=1,
                                                               dtype=torch.float32)
    ids = json.loads((d / "prompts.json").read_text())["ids"]
    train = Dataset.from_dict({"input_ids": ids})
    n = a.warmup + a.iters

    # --- timers ----------------------------------------------------------------------------------------------
    clock = {"gen": 0.0, "cgen": 0.0, "train_start": None, "ctrain_start": None}
    bg, fwd = T.batch_generation, T.forward

    def timed_batch_generation(*args, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        out = bg(*args, **kw)
        clock["gen"] += time.perf_counter() - t0
        clock["cgen"] += time.process_time() - c0
        clock["shape"] = list(out[0].shape)
        return out

    def marking_forward(model, *args, **kw):
        if torch.is_grad_enabled() and clock["train_start"] is None:
            clock["train_start"], clock["ctrain_start"] = time.perf_counter(), time.process_time()
        return fwd(model, *args, **kw)

    T.batch_generation, T.forward = timed_batch_generation, marking_forward
    recs: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["t"], clock["c"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            t, c = time.perf_counter(), time.process_time()
            t0, ts = clock["t"], clock["train_start"] or t
            c0, cs = clock["c"], clock["ctrain_start"] or c
            rec = {"iter": len(recs), "total": t - t0, "generation": clock["gen"], "scoring": ts - t0 - clock["gen"],
                   "training": t - ts, "rollout": ts - t0, "cpu_total": c - c0, "cpu_generation": clock["cgen"],
                   "cpu_scoring": cs - c0 - clock["cgen"], "cpu_training": c - cs, "shape": clock.get("shape"),
                   "loadavg": loadavg()}
            recs.append(rec)
            if a.verbose:
                print(json.dumps(rec), file=sys.stderr, flush=True)
            clock.update(t=time.perf_counter(), c=time.process_time(), gen=0.0, cgen=0.0, train_start=None,
                         ctrain_start=None)

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, num_ppo_epochs=4,
            num_mini_batches=4, total_episodes=a.batch * n, response_length=a.response, temperature=0.7,
            kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
            learning_rate=1e-5, lr_scheduler_type="constant", adam_epsilon=1e-5, stop_token=None,
            missing_eos_penalty=None, bf16=a.bf16, fp16=False, gradient_checkpointing=False, use_cpu=True,
            num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1, seed=0,
            local_rollout_forward_batch_size=a.batch, disable_tqdm=True, dataloader_num_workers=0,
            whiten_rewards=False)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=train, eval_dataset=None, callbacks=[Clock()])
        t_setup = time.perf_counter()
        trainer.train()
        optim = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer)
        optim_name = f"{optim.__module__}.{optim.__name__} ({args.optim})"
        mixed = str(trainer.accelerator.mixed_precision)
    assert len(recs) == n, (len(recs), n)
    assert recs[-1]["shape"] == [a.batch, 16 + a.response], recs[-1]["shape"]
    meas = recs[a.warmup:]
    med = {k: statistics.median(r[k] for r in meas) for k in ("total", "generation", "scoring", "training", "rollout",
                                                               "cpu_total", "cpu_generation", "cpu_scoring",
                                                               "cpu_training")}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"impl": "trl", "trl": trl.__version__, "transformers": transformers.__version__, "optimizer": optim_name,
           "batch": a.batch, "prompt": 16, "response": a.response, "dtype": "float32", "autocast": mixed == "bf16",
           "bf16": bool(a.bf16), "accelerator_mixed_precision": mixed, "threads": a.threads, "iters": a.iters, "warmup": a.warmup, "median": med,
           "min_total": min(r["total"] for r in meas), "all_total": [round(r["total"], 3) for r in meas],
           "all_cpu": [round(r["cpu_total"], 3) for r in meas],
           "peak_rss_mb": peak, "loadavg_start": la0, "loadavg_end": loadavg(), "wall": time.perf_counter() - t_setup}
    print(cpu_line())
    print("RESULT " + json.dumps(out), flush=True)


def smoke(a) -> None:
    """A tiny setup (ppo_bench.py setup --tiny, in instructrl's interpreter $INSTRUCTRL_PYTHON) and one iteration."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        subprocess.run([os.environ.get("INSTRUCTRL_PYTHON", sys.executable), str(HERE / "ppo_bench.py"), "setup",
                        "--tiny", "--dir", d], check=True)
        subprocess.run([sys.executable, __file__, "--dir", d, "--batch", "4", "--response", "4", "--iters", "1",
                        "--warmup", "0", "--threads", "1"], check=True)


if __name__ == "__main__":
    main()
