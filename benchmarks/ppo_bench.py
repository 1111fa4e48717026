"""Benchmark of our PPO loop (issue 8): seconds per iteration split into generation / scoring / training, the
compute floor of this machine, scaling with response length and batch, and our sampler vs `generate`.

Protocol P (every number below is fixed by the protocol, see `PROTOCOLS`):
  policy      GPT2LMHeadModel, 4 layers x 256 wide x 4 heads, 128 positions, tied lm_head, vocab 2000
              (byte-level BPE trained with `instructrl.models.train_tokenizer` on the embedded world's corpus;
              EOS id 0, PAD id 1, distinct)
  ref         the same weights, frozen
  reward      `ScalarHeadModel` on a GPT2Model backbone of the same config, saved with save_pretrained and
              loaded back with from_pretrained; value model = a copy of the reward model (our default init)
  rollouts    64 per iteration, prompts of exactly 16 real tokens (the first 16 tokens of corpus documents),
              responses of exactly 32 tokens: NO stop token (see "No stop token" below), temperature 0.7
  PPO         4 epochs x 4 minibatches of 16 (16 optimizer steps), Adam lr 1e-5 constant, beta 0.05 (k1),
              clip 0.2, value clip 0.2, c_v 0.1, gamma 1, lambda 0.95, float32, torch.set_num_threads(2)
P-long: the same with 96-token responses.

How it is timed. Each iteration runs OUR code, unchanged: `instructrl.rollout.make_rollout` (sample -> ref
log-prob pass (the policy's too in bf16), value pass -> reward score -> decode) and `instructrl.ppo.PPO.update`
(KL in the reward, GAE, whitening, 4 x 4 clipped updates), exactly as the RL driver (`instructrl.rl.train_rl`, which
`train_ppo` runs) calls them. The phases are timed by wrapping the module-level names make_rollout looks up at call
time (`instructrl.rollout.sample`, `.response_logprobs`, `.response_values`) and the reward sources' `score`
(`RLSetup.reward`) with timers; nothing is reimplemented. The models load through the RL driver's
`rl.load_rl_models`, as `instructrl ppo` loads them.
  generation = time inside `sample`
  scoring    = the rest of make_rollout: ref (+ policy in bf16) log-prob passes, value pass, reward pass, decode
  training   = `PPO.update` (since the rl.py driver it also shapes the per-token rewards, -beta k_t + score, which
               make_rollout did before: a few elementwise ops on [B, R] tensors, so "scoring" lost and
               "training" gained them)
With PPO_BENCH_SRC pointing at a copy of src/ from before the rl.py driver, the same loop runs through that version's
`make_rollout(policy, ref, ..., cfg, beta, ...)` and `ppo_update` instead (`PPOLoop`).

No stop token. make_rollout takes EOS from `tokenizer.eos_token_id`; we hand it a tokenizer proxy whose
eos_token_id is -1, an id that the sampler can never return, so `sample` never stops early and every
iteration generates exactly batch x response tokens (EOS id 0 may be sampled, as an ordinary token, like TRL
with stop_token=None). Side effect: no row "ends", so make_rollout replaces every score with
missing_eos_penalty; the reward model is still run (and timed) exactly as usual, only its output is discarded.
This changes no tensor shape, hence no compute.

CPU time. The machine's 2 cores are shared with other people's jobs; wall time then measures the load as much as
the code. Every phase is also timed in this process's CPU time (time.process_time, all its threads): with
--threads 1 it is the robust number (it excludes the time the thread waited for a core); with 2 threads it also
counts OpenMP spin-waiting, so use wall time there.

Each configuration runs in a fresh subprocess (`run` sub-command), so peak RSS (ru_maxrss) is per configuration.
The load average of the machine (shared with other processes) is recorded at the start and end of every run.

Sub-commands (all take --dir, default $PPO_BENCH_DIR or /tmp/instructrl_ppo_bench):
  setup       build tokenizer, models and prompts into --dir (also the TRL copies of reward/value models)
  run         one configuration in this process, prints a RESULT json line (used by the others)
  suite       P, P-long, floor, scaling table (each config a fresh subprocess)
  floor       matmul rate of this machine and the FLOP formula
  generate    our sampler vs transformers generate (alternating, same process)
  profile     torch.profiler over one iteration (after warm-up), top ops by self CPU time, and the matmul bound
  adam-ab     plain vs fused Adam alternating in one process (training-phase time of each)

    .venv/bin/python benchmarks/ppo_bench.py setup
    .venv/bin/python benchmarks/ppo_bench.py suite               # P, P-long (+floor fractions)
    .venv/bin/python benchmarks/ppo_bench.py suite --scaling     # + response 32/64/96 x batch 32/64/128
    .venv/bin/python benchmarks/ppo_bench.py run --response 32 --iters 6 --patch reuse_sample_logprobs
    .venv/bin/python benchmarks/ppo_bench.py generate
    .venv/bin/python benchmarks/ppo_bench.py profile
    .venv/bin/python benchmarks/ppo_bench.py --smoke              # setup, run, profile, generate, adam-ab: tiny (CI)
Every figure is printed with the CPU it was measured on (model, AVX-512 or not, torch's dispatch level, threads).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
if os.environ.get("PPO_BENCH_SRC"):             # measure a frozen copy of src/ (others edit the working tree)
    sys.path.insert(0, os.environ["PPO_BENCH_SRC"])


def _machine():
    """This tree's instructrl.machine (cpu_info, cpu_line), also when PPO_BENCH_SRC measures an older src/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_instructrl_machine", HERE.parent / "src/instructrl/machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_info, cpu_line = _machine().cpu_info, _machine().cpu_line

DEFAULT_DIR = Path(os.environ.get("PPO_BENCH_DIR", "/tmp/instructrl_ppo_bench"))

PROTOCOLS = {"P": dict(response=32), "P-long": dict(response=96)}
BASE = dict(batch=64, prompt=16, response=32, temperature=0.7, ppo_epochs=4, minibatch=16, lr=1e-5, beta=0.05,
            clip=0.2, value_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, threads=2)
MODEL = dict(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab=2000)
TINY = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab=300)   # --smoke: the same code on tiny shapes


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------ setup
def cmd_setup(a) -> None:
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2Model

    from instructrl.models import ScalarHeadModel, build_tiny_model, tiny_gpt_config, train_tokenizer
    from instructrl.world.generator import WorldConfig, generate_world
    from instructrl.data import read_texts

    d, model = Path(a.dir), TINY if getattr(a, "tiny", False) else MODEL
    if d.exists() and not a.force and (d / "done").is_file():
        print(f"{d} already set up (use --force to rebuild)")
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    n_docs = 300 if model is TINY else 6000
    generate_world(d / "world", WorldConfig(seed=0, n_corpus=n_docs, n_corpus_val=200))
    texts = read_texts(d / "world" / "corpus.jsonl")
    # The world's corpus is too repetitive to fill 2000 BPE merges; add seeded pseudo-words so the vocab is exact.
    import random
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz"[: rng.randint(6, 26)]) for _ in range(rng.randint(2, 7)))
             for _ in range(n_docs)]
    extra = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_docs)]
    tok = train_tokenizer(texts + extra, vocab_size=model["vocab"])
    assert len(tok) == model["vocab"], len(tok)
    assert tok.eos_token_id != tok.pad_token_id
    cfg = tiny_gpt_config(len(tok), tok.eos_token_id, tok.pad_token_id, n_layer=model["n_layer"],
                          n_embd=model["n_embd"], n_head=model["n_head"], n_positions=model["n_positions"])
    cfg.activation_function = "gelu_new"                  # GPT2Config's own default: the protocol's model as is
    policy = build_tiny_model(cfg, seed=0)
    policy.save_pretrained(str(d / "policy"), safe_serialization=True)
    tok.save_pretrained(str(d / "policy"))
    torch.manual_seed(1)
    rm = ScalarHeadModel(GPT2Model(cfg))
    rm.save_pretrained(d / "reward")
    rm.save_pretrained(d / "value")                       # value model initialised from the reward model
    tok.save_pretrained(str(d / "reward"))
    # TRL's reward/value models: AutoModelForSequenceClassification(num_labels=1) with the same weights.
    # GPT2ForSequenceClassification.score has no bias; ours is initialised to 0 (checked below).
    assert float(rm.head.bias.detach().abs().max()) == 0.0
    cfg_cls = tiny_gpt_config(len(tok), tok.eos_token_id, tok.pad_token_id, n_layer=model["n_layer"],
                              n_embd=model["n_embd"], n_head=model["n_head"], n_positions=model["n_positions"])
    cfg_cls.num_labels = 1
    cfg_cls.activation_function = "gelu_new"
    cls = GPT2ForSequenceClassification(cfg_cls)
    sd = {f"transformer.{k}": v for k, v in rm.backbone.state_dict().items()}
    sd["score.weight"] = rm.head.weight.detach().clone()
    missing, unexpected = cls.load_state_dict(sd, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m for m in missing), (missing, unexpected)
    for name in ("trl_reward", "trl_value"):
        cls.save_pretrained(str(d / name), safe_serialization=True)
        tok.save_pretrained(str(d / name))
    # prompts: exactly `prompt` real tokens each
    P = BASE["prompt"]
    ids = [e[:P] for e in tok(texts[:4000] + extra, add_special_tokens=False)["input_ids"] if len(e) >= P]
    (d / "prompts.json").write_text(json.dumps({"prompt_len": P, "ids": ids[:1024]}))
    (d / "done").write_text("ok\n")
    print(f"set up in {d}: vocab {len(tok)} eos {tok.eos_token_id} pad {tok.pad_token_id}, {len(ids[:1024])} prompts "
          f"of {P} tokens, policy params {sum(p.numel() for p in policy.parameters()):,}")


# ------------------------------------------------------------------------------------------------ one run
class Timer:
    """Wall time (perf_counter) and this process's CPU time (process_time, all threads) per named phase."""

    def __init__(self):
        self.t = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - t0
            self.t["cpu_" + name] += time.process_time() - c0

    def take(self) -> dict:
        out, self.t = dict(self.t), defaultdict(float)
        return out


class NoStopTokenizer:
    """The real tokenizer with eos_token_id = -1: make_rollout's sampler then never stops before max_new_tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = -1

    def __getattr__(self, name):
        return getattr(self._tok, name)


SEED = 0


def build(a):
    """Load the four models as the RL driver does (`rl.load_rl_models`: no LoRA, no FSDP, two frozen copies beside
    policy and value), and the PPO config of the protocol. The setup's tokenizer is the NoStopTokenizer, so
    make_rollout never stops early."""
    import torch

    from instructrl.ppo import PPOConfig
    from instructrl.utils import resolve_dtype, set_seed
    try:
        from instructrl.rl import PromptStream, RLSetup, load_rl_models
    except ImportError:                         # PPO_BENCH_SRC: a src/ from before the rl.py driver
        return legacy_build(a)

    d = Path(a.dir)
    dtype = resolve_dtype(a.dtype)
    cfg = ppo_config(PPOConfig, a, reward=[str(d / "reward")])
    set_seed(SEED)
    device = torch.device("cpu")
    tok = load_tokenizer_of(cfg.policy)
    policy, ref, rewards, value_model = load_rl_models(cfg, device, dtype, True, tok)
    texts, ids = bench_prompts(d, tok)
    s = RLSetup(cfg, device, NoStopTokenizer(tok), policy, ref, rewards, value_model, PromptStream(texts, ids, SEED),
                None, None, torch.Generator(device=device).manual_seed(SEED))
    return s, cfg


def ppo_config(PPOConfig, a, reward):
    d = Path(a.dir)
    return PPOConfig(policy=str(d / "policy"), reward=reward, value=str(d / "value"), prompts="", out="",
                     batch_size=a.batch, max_new_tokens=a.response, temperature=BASE["temperature"], lr=BASE["lr"],
                     beta=BASE["beta"], kl_estimator="k1", ppo_epochs=BASE["ppo_epochs"],
                     minibatch_size=min(BASE["minibatch"], a.batch), clip=BASE["clip"], value_clip=BASE["value_clip"],
                     vf_coef=BASE["vf_coef"], gamma=BASE["gamma"], lam=BASE["lam"], dtype=a.dtype, device="cpu",
                     progress=False, seed=SEED)


def load_tokenizer_of(path):
    from instructrl.models import load_tokenizer

    return load_tokenizer(path)


def bench_prompts(d: Path, tok):
    ids = json.loads((d / "prompts.json").read_text())["ids"]
    return [tok.decode(x) for x in ids], ids


def legacy_build(a):
    """build() for a src/ from before the rl.py driver (PPO_BENCH_SRC): RLSetup held one reward model."""
    import torch

    from instructrl.models import ScalarHeadModel, freeze, load_causal_lm
    from instructrl.ppo import PPOConfig
    from instructrl.rollout import PromptStream, RLSetup
    from instructrl.utils import resolve_dtype, set_seed

    d = Path(a.dir)
    dtype = resolve_dtype(a.dtype)
    cfg = ppo_config(PPOConfig, a, reward=str(d / "reward"))
    set_seed(SEED)
    device = torch.device("cpu")
    tok = load_tokenizer_of(cfg.policy)
    policy = load_causal_lm(cfg.policy, device, dtype)
    ref = freeze(load_causal_lm(cfg.policy, device, dtype))
    reward_model = freeze(ScalarHeadModel.from_pretrained(cfg.reward, device, dtype))
    value_model = ScalarHeadModel.from_pretrained(cfg.value, device, dtype)
    texts, ids = bench_prompts(d, tok)
    s = RLSetup(cfg, device, NoStopTokenizer(tok), policy, ref, reward_model, value_model,
                PromptStream(texts, ids, SEED), None, None, torch.Generator(device=device).manual_seed(SEED))
    return s, cfg


def reward_models(s) -> list:
    """The reward models a setup scores with (the rl.py driver: the model sources of `s.reward`)."""
    if hasattr(s, "reward_model"):
        return [s.reward_model]
    return [src.model for src in s.reward.sources if hasattr(src, "model")]


def install_timers(s, timer: Timer):
    """Wrap the names make_rollout calls with timers (module globals are looked up at call time)."""
    import instructrl.rollout as R

    sample, rlp, rv = R.sample, R.response_logprobs, R.response_values

    def t_sample(*args, **kw):
        with timer("generation"):
            return sample(*args, **kw)

    def t_rlp(model, *args, **kw):
        with timer("score_policy" if model is s.policy else "score_ref"):
            return rlp(model, *args, **kw)

    def t_rv(*args, **kw):
        with timer("score_value"):
            return rv(*args, **kw)

    R.sample, R.response_logprobs, R.response_values = t_sample, t_rlp, t_rv
    scorer = s.reward_model if hasattr(s, "reward_model") else s.reward   # the rl.py driver: all reward sources
    score = scorer.score

    def t_score(*args, **kw):
        with timer("score_reward"):
            return score(*args, **kw)

    scorer.score = t_score


class PPOLoop:
    """One PPO iteration's two halves, called as the trainer calls them in the src under test:
      rl.py driver (now)   rollout = make_rollout(s, prompts, ids, with_values=True); update = PPO(cfg, s, NonFinite)
                           .update(r, beta, step), with the algorithm's own optimizer (optim.adam) and shuffle stream
      before rl.py         rollout = make_rollout(policy, ref, reward, value, tokenizer, ..., cfg, beta, generator,
                           judge); update = ppo_update(s, r, cfg, optimizer, params, shuffle[, guard, it])
    `params` are what the optimizer updates; `optimizer` may be replaced (patches, adam-ab)."""

    def __init__(self, s, cfg):
        import torch

        import instructrl.ppo as P

        self.s, self.cfg = s, cfg
        self.algo = None
        if hasattr(P, "PPO"):
            from instructrl.optim import NonFinite

            self.algo = P.PPO(cfg, s, NonFinite("ppo", cfg.run.max_nonfinite))   # also sets train() on both models
            self.params, self._optimizer = self.algo.params, self.algo.optimizer
        else:
            s.policy.train()
            s.value_model.train()
            self.params = list(s.policy.parameters()) + list(s.value_model.parameters())
            self._optimizer = legacy_optimizer(self.params, cfg)
            self.shuffle = torch.Generator().manual_seed(SEED + 1)

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, opt) -> None:
        self._optimizer = opt
        if self.algo is not None:
            self.algo.optimizer = opt

    def rollout(self, prompts: list[str], ids: list[list[int]]):
        import instructrl.rollout as R

        s, cfg = self.s, self.cfg
        if self.algo is not None:
            return R.make_rollout(s, prompts, ids, with_values=True)
        return R.make_rollout(s.policy, s.ref, s.reward_model, s.value_model, s.tokenizer, prompts, ids, cfg, cfg.beta,
                              s.generator, s.judge)

    def update(self, r, step: int = 1) -> dict:
        if self.algo is not None:
            return self.algo.update(r, self.cfg.beta, step)
        return legacy_ppo_update(self.s, r, self.cfg, self._optimizer, self.params, self.shuffle, step)


def first_ratio(update: dict) -> float:
    """The first minibatch's mean ratio (1 when log pi_old is right) under its name now or before."""
    return update.get("policy/first_ratio", update.get("first_ratio", float("nan")))


def legacy_ppo_update(s, r, cfg, optimizer, params, shuffle, it: int = 1) -> dict:
    """ppo_update as train_ppo called it before the rl.py driver (later versions took a NonFiniteGuard and the
    iteration)."""
    import inspect

    import instructrl.ppo as PPO

    if "guard" in inspect.signature(PPO.ppo_update).parameters:
        from instructrl.checkpoint import NonFiniteGuard

        if not hasattr(s, "_bench_guard"):
            s._bench_guard = NonFiniteGuard("ppo", getattr(cfg, "max_nonfinite", 3))
        return PPO.ppo_update(s, r, cfg, optimizer, params, shuffle, s._bench_guard, it)
    return PPO.ppo_update(s, r, cfg, optimizer, params, shuffle)


def legacy_optimizer(params, cfg):
    """The optimizer train_ppo built before the rl.py driver (utils.adam; older versions: plain torch Adam)."""
    import torch
    try:
        from instructrl.utils import adam
    except ImportError:
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    return adam(params, lr=cfg.lr, eps=cfg.adam_eps)


def autocast_forwards(s) -> None:
    """bf16 autocast around each model's forward only (float32 weights, Adam states and all PPO math stay float32;
    token_logprobs and ScalarHeadModel return float32). The backward of an autocast forward runs in the dtypes
    autocast chose."""
    import functools

    import torch

    for m in (s.policy, s.ref, *reward_models(s), s.value_model):
        fwd = m.forward

        @functools.wraps(fwd)
        def wrapped(*args, _fwd=fwd, **kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _fwd(*args, **kw)

        m.forward = wrapped


def cmd_run(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    la0 = loadavg()
    s, cfg = build(a)
    patches = [p for p in (a.patch or "").split(",") if p]
    if patches:
        sys.path.insert(0, str(HERE))
        import ppo_patches
        ppo_patches.apply(patches, s, cfg)

    import instructrl.rollout as R
    from instructrl.utils import peak_rss_mb

    timer = Timer()
    install_timers(s, timer)
    loop = PPOLoop(s, cfg)
    if patches:
        loop.optimizer = ppo_patches.make_optimizer(patches, loop.params, cfg) or loop.optimizer
    import contextlib

    import instructrl.models as M

    stack = contextlib.ExitStack()
    if a.autocast and hasattr(M, "bf16_autocast"):  # the product's --autocast bf16: the loop inside it, as Run does
        stack.enter_context(M.bf16_autocast(torch.device("cpu")))
    elif a.autocast:  # a src without --autocast (PPO_BENCH_SRC): the earlier prototype
        autocast_forwards(s)
    recs = []
    t_setup = time.perf_counter()
    for it in range(a.warmup + a.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        prompts, ids = s.prompts.next(cfg.batch_size)
        r = loop.rollout(prompts, ids)
        t1, c1 = time.perf_counter(), time.process_time()
        upd = loop.update(r, it + 1)
        R.rollout_metrics(r)
        t2, c2 = time.perf_counter(), time.process_time()
        ph = timer.take()
        assert r.batch.response_ids.shape == (cfg.batch_size, cfg.max_new_tokens), r.batch.response_ids.shape
        score = sum(v for k, v in ph.items() if k.startswith("score_"))
        rec = {"iter": it, "total": t2 - t0, "rollout": t1 - t0, "generation": ph.get("generation", 0.0),
               "scoring": (t1 - t0) - ph.get("generation", 0.0), "training": t2 - t1,
               "cpu_total": c2 - c0, "cpu_generation": ph.get("cpu_generation", 0.0),
               "cpu_scoring": (c1 - c0) - ph.get("cpu_generation", 0.0), "cpu_training": c2 - c1,
               **{k: v for k, v in ph.items() if k.startswith("score_")},
               "score_other": (t1 - t0) - ph.get("generation", 0.0) - score,
               "first_ratio": first_ratio(upd), "loadavg": loadavg()}
        recs.append(rec)
        if a.verbose:
            print(json.dumps(rec), file=sys.stderr, flush=True)
    stack.close()
    meas = recs[a.warmup:]
    med = {k: statistics.median(r[k] for r in meas) for k in meas[0] if isinstance(meas[0][k], float)}
    out = {"batch": cfg.batch_size, "prompt": BASE["prompt"], "response": cfg.max_new_tokens, "dtype": a.dtype,
           "autocast": bool(a.autocast), "patches": patches, "loop": "rl" if loop.algo is not None else "legacy",
           "threads": a.threads, "iters": a.iters,
           "warmup": a.warmup, "median": med, "min_total": min(r["total"] for r in meas),
           "all_total": [round(r["total"], 3) for r in meas], "all_cpu": [round(r["cpu_total"], 3) for r in meas], "peak_rss_mb": peak_rss_mb(),
           "loadavg_start": la0, "loadavg_end": loadavg(), "wall": time.perf_counter() - t_setup,
           "cpu": cpu_info()}
    print(cpu_line(out["cpu"]))
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ floor
def matmul_rate(dtype_name="float32", n=2048, reps=8, threads=2) -> float:
    """Best-of-`reps` rate of one n x n x n matmul, FLOP/s."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype_name)
    x, y = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    torch.matmul(x, y)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(x, y)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def model_sizes() -> dict:
    d, L, V = MODEL["n_embd"], MODEL["n_layer"], MODEL["vocab"]
    body = L * 12 * d * d          # c_attn 3d^2 + attn c_proj d^2 + c_fc 4d^2 + mlp c_proj 4d^2 per layer (weights)
    return {"d": d, "L": L, "V": V, "N_body": body, "N_lm_head": V * d, "N_policy": body + V * d, "N_value": body + d}


def iteration_flops(B: int, P: int, R: int, epochs: int = 4) -> dict:
    """Minimum FLOPs of one iteration, per phase (matmul FLOPs; embeddings lookups, norms, softmax not counted).

    N_body = 12 d^2 per layer x L (non-embedding matmul weights, biases/LN ignored); lm_head = V x d (tied with the
    embedding, but it is a matmul: counted); the value/reward head d x 1. Attention scores+mix: 4 d L per
    (query, key) pair, causal (a query at position i attends i+1 keys).
      generation  KV cache: B (P + R - 1) tokens go through the body (the last sampled token is never fed back);
                  lm_head only at the B R positions whose next token is sampled.
                  2 N_body B (P+R-1) + 2 V d B R + attention(prefill P, then R-1 single steps)
      scoring     the three passes the protocol needs: ref log-probs, values, reward, each over the full
                  prompt+response sequence (P+R tokens); ref's lm_head only at the R response positions.
                  ref 2 N_body B (P+R) + 2 V d B R ; value 2 (N_body + d) B (P+R) ; reward 2 N_body B (P+R)
                  (+ attention, causal, per pass). The policy's log-probs are not in the floor: the sampler already
                  had them (before issue 8 our loop recomputed them: one more ref-sized pass, `score_policy`).
      training    per epoch, forward + backward = 3 x forward, for policy (body + lm_head at R positions) and value
                  over B (P+R) tokens: 6 N_body B (P+R) + 6 V d B R + 6 (N_body+d) B (P+R) (+ 3 x attention).
    """
    m = model_sizes()
    d, L, V, Nb = m["d"], m["L"], m["V"], m["N_body"]

    def attn_full(S):                          # causal pairs over a sequence of S tokens
        return 4 * d * L * S * (S + 1) / 2

    gen_attn = B * (attn_full(P) + sum(4 * d * L * (P + t + 1) for t in range(R - 1)))
    gen = 2 * Nb * B * (P + R - 1) + 2 * V * d * B * R + gen_attn
    S = P + R
    ref = 2 * Nb * B * S + 2 * V * d * B * R + B * attn_full(S)
    val = 2 * (Nb + d) * B * S + B * attn_full(S)
    rew = 2 * Nb * B * S + B * attn_full(S)
    train = epochs * 3 * (ref + val)
    return {"generation": gen, "scoring": ref + val + rew, "training": train, "total": gen + ref + val + rew + train,
            "score_policy_extra": ref}


def cmd_floor(a) -> None:
    rates = {}
    for dt in ("float32", "bfloat16"):
        rates[dt] = matmul_rate(dt, reps=a.reps, threads=a.threads)
    # small matmuls of the sizes the loop actually does (per-op overhead + cache effects)
    import torch
    shapes = {"train mb [768x256]@[256x1024]": (768, 256, 1024), "decode [64x256]@[256x768]": (64, 256, 768),
              "lm_head mb [512x256]@[256x2000]": (512, 256, 2000)}
    small = {}
    for name, (m, k, n) in shapes.items():
        x, y = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            x @ y
        reps = 200
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                x @ y
            best = min(best, (time.perf_counter() - t0) / reps)
        small[name] = 2 * m * k * n / best
    out = {"matmul_2048_flops": rates, "small_matmul_flops": small, "loadavg": loadavg(), "sizes": model_sizes(),
           "cpu": cpu_info()}
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ suite
def run_sub(args: list[str], timeout=900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def fmt_run(name: str, r: dict, rates: dict | None) -> str:
    """One table row. Times: CPU time with 1 thread (robust on a shared machine), wall time otherwise."""
    m = r["median"]
    pre = "cpu_" if r["threads"] == 1 else ""
    B, P, R = r["batch"], r["prompt"], r["response"]
    t = {k: m[pre + k] for k in ("total", "generation", "scoring", "training")}
    line = (f"{name:<20} {t['total']:7.2f} {t['generation']:6.2f} {t['scoring']:6.2f} {t['training']:6.2f} "
            f"{m['total']:7.2f} {B * R / t['total']:7.0f} {B * R / t['generation']:8.0f} {r['peak_rss_mb']:7.0f}  "
            f"{r['loadavg_start']}->{r['loadavg_end']}")
    if rates:
        f = iteration_flops(B, P, R)
        peak = rates["float32"] if r["dtype"] == "float32" and not r["autocast"] else rates["bfloat16"]
        fr = [f[k] / t[k] / peak for k in ("generation", "scoring", "training", "total")]
        line += "  " + " ".join(f"{100 * x:5.1f}" for x in fr)
    return line


HEADER = (f"{'config':<20} {'s/iter':>7} {'gen':>6} {'score':>6} {'train':>6} {'wall':>7} {'tok/s':>7} {'gentok/s':>8} "
          f"{'rss MB':>7}  {'loadavg start->end':<29}  floor%: gen score train total")


def cmd_suite(a) -> None:
    common = ["--dir", a.dir, "--threads", str(a.threads)]
    floor = run_sub(["floor"] + common)
    rates = floor["matmul_2048_flops"]
    print(cpu_line(floor["cpu"]))
    print(f"matmul 2048^3, {a.threads} threads, best of 8: float32 {rates['float32'] / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {rates['bfloat16'] / 1e9:.1f} GFLOP/s (loadavg {floor['loadavg']})")
    for k, v in floor["small_matmul_flops"].items():
        print(f"   small matmul {k}: {v / 1e9:.1f} GFLOP/s")
    results = {}
    configs = [("P", 64, 32, []), ("P-long", 64, 96, [])]
    if a.bf16:
        configs += [("P bf16 (dtype)", 64, 32, ["--dtype", "bfloat16"]), ("P bf16 (autocast)", 64, 32, ["--autocast"])]
    if a.scaling:       # response 32/64/96 at batch 64, batch 32/64/128 at response 32 (--grid: all 9)
        pairs = [(b, r) for b in (32, 64, 128) for r in (32, 64, 96)] if a.grid else [(64, 64), (32, 32), (128, 32)]
        configs += [(f"B{b} R{r}", b, r, []) for b, r in pairs if (b, r) not in ((64, 32), (64, 96))]
    print("times: process CPU time with --threads 1 (wall time in column 'wall'), wall time otherwise; tok/s = "
          "batch x response / s per iteration; gentok/s = the same over the generation phase; floor% = minimum "
          "FLOPs of the phase / its time / the matmul rate above (float32, or bfloat16 for bf16 rows)")
    print(HEADER)
    for name, b, r, extra in configs:
        iters = a.iters if b * r <= 64 * 96 else max(5, a.iters - 1)
        res = run_sub(["run", *common, "--batch", str(b), "--response", str(r), "--iters", str(iters),
                       "--warmup", str(a.warmup), *extra, *(["--patch", a.patch] if a.patch else [])])
        results[name] = res
        print(fmt_run(name, res, rates), flush=True)
    for name in ("P", "P-long"):
        r = results[name]
        f = iteration_flops(r["batch"], r["prompt"], r["response"])
        m = r["median"]
        tot = m["cpu_total"] if r["threads"] == 1 else m["total"]
        print(f"\n{name}: minimum GFLOP per iteration: gen {f['generation'] / 1e9:.1f}, scoring {f['scoring'] / 1e9:.1f} "
              f"(a policy pass, if the code under test makes one: +{f['score_policy_extra'] / 1e9:.1f}), "
              f"training {f['training'] / 1e9:.1f}, "
              f"total {f['total'] / 1e9:.1f}; floor time at {rates['float32'] / 1e9:.0f} GFLOP/s = "
              f"{f['total'] / rates['float32']:.2f} s vs measured {tot:.2f} s")
        print("   scoring split (s): " + ", ".join(f"{k[6:]} {m[k]:.3f}" for k in m if k.startswith("score_")))
    if a.json:
        from instructrl.utils import atomic_write_text

        atomic_write_text(a.json, json.dumps({"floor": floor, "runs": results}, indent=1), overwrite=False)


# ------------------------------------------------------------------------------------------------ generate
def cmd_generate(a) -> None:
    import torch

    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.sampling import left_pad, sample

    torch.set_num_threads(a.threads)
    d = Path(a.dir)
    tok = load_tokenizer(d / "policy")
    model = load_causal_lm(d / "policy")
    model.eval()
    ids = json.loads((d / "prompts.json").read_text())["ids"][: a.batch]
    R = a.response
    g = torch.Generator().manual_seed(0)
    x, m = left_pad(ids, tok.pad_token_id)

    def ours():
        b = sample(model, ids, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=R, temperature=0.7, generator=g)
        assert b.response_ids.shape == (len(ids), R)

    def hf(**extra):
        def f():
            with torch.inference_mode():
                o = model.generate(input_ids=x, attention_mask=m, do_sample=True, top_k=0, top_p=1.0,
                                   temperature=0.7, max_new_tokens=R, min_new_tokens=R, pad_token_id=tok.pad_token_id,
                                   **extra)
            seq = o.sequences if hasattr(o, "sequences") else o
            assert seq.shape == (len(ids), x.shape[1] + R), seq.shape
        return f

    fns = {"ours (sample)": ours, "hf generate": hf(),
           "hf generate +scores (TRL's call)": hf(output_scores=True, return_dict_in_generate=True)}
    times, cpu = defaultdict(list), defaultdict(list)
    for f in fns.values():
        f()
    la0 = loadavg()
    for _ in range(a.reps):
        for name, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(cpu_line())
    print(f"sampling B={len(ids)} P={x.shape[1]} R={R}, threads {a.threads}, median of {a.reps} (alternating), "
          f"loadavg {la0} -> {loadavg()}")
    base, cbase = statistics.median(times["ours (sample)"]), statistics.median(cpu["ours (sample)"])
    for name, t in times.items():
        med, cmed = statistics.median(t), statistics.median(cpu[name])
        print(f"  {name:<34} wall {med * 1000:7.1f} ms {len(ids) * R / med:7.0f} tok/s ({base / med:.2f}x ours)   "
              f"cpu {cmed * 1000:7.1f} ms {len(ids) * R / cmed:7.0f} tok/s ({cbase / cmed:.2f}x ours)")


# ------------------------------------------------------------------------------------------------ profile
def cmd_profile(a) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(a.threads)
    s, cfg = build(a)
    patches = [p for p in (a.patch or "").split(",") if p]
    if patches:
        sys.path.insert(0, str(HERE))
        import ppo_patches
        ppo_patches.apply(patches, s, cfg)
    if a.autocast:
        autocast_forwards(s)
    loop = PPOLoop(s, cfg)
    if patches:
        loop.optimizer = ppo_patches.make_optimizer(patches, loop.params, cfg) or loop.optimizer
    step = 0

    def one():
        nonlocal step
        step += 1
        prompts, ids = s.prompts.next(cfg.batch_size)
        with record_function("## make_rollout"):
            r = loop.rollout(prompts, ids)
        with record_function("## update"):
            loop.update(r, step)

    one()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
        one()
    kw = {"group_by_input_shape": True} if a.shapes else {}
    averages = prof.key_averages(**kw)
    print(cpu_line())
    print(averages.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=50))
    # The matmul bound: matrix multiplies run near this machine's peak rate, so the time they take is what an
    # iteration would still take if every other op (attention kernels, GELU, norms, Adam, copies, Python) were free.
    matmul_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    self_us = {e.key: e.self_cpu_time_total for e in averages}
    total, mm = sum(self_us.values()) / 1e6, sum(self_us.get(k, 0.0) for k in matmul_ops) / 1e6
    print(f"matmul ops ({', '.join(matmul_ops)}): {mm:.2f} s of {total:.2f} s profiled ({100 * mm / total:.0f} %); "
          f"with every other op free the iteration would take {mm:.2f} s, {total / mm:.2f}x faster than profiled")
    if a.trace:
        prof.export_chrome_trace(a.trace)


def cmd_adam_ab(a) -> None:
    """Plain vs fused Adam in ONE process, alternating per iteration (A B B A ...): the robust comparison on a
    shared machine, where separate processes of the same binary differ by up to ~8 %. Both optimizers hold their
    own state over the same parameters; each iteration's rollout comes from the current policy, as in training."""
    import torch

    torch.set_num_threads(a.threads)
    s, cfg = build(a)
    loop = PPOLoop(s, cfg)
    params = loop.params
    opts = {"plain": torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps),
            "fused": torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, fused=True)}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for it in range(a.warmup + a.iters):
        name = ("plain", "fused", "fused", "plain")[it % 4]
        prompts, ids = s.prompts.next(cfg.batch_size)
        r = loop.rollout(prompts, ids)
        loop.optimizer = opts[name]
        t0 = time.perf_counter()
        loop.update(r, it + 1)
        if it >= a.warmup:
            times[name].append(time.perf_counter() - t0)
    print(cpu_line())
    for name, ts in times.items():
        print(f"{name:6s} Adam: training phase median {statistics.median(ts):.3f} s over {len(ts)} iterations "
              f"{[round(x, 2) for x in ts]}")


def cmd_smoke(a) -> None:
    """Every sub-command's code path on tiny shapes, in seconds (CI: tests/test_benchmarks.py)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ns = argparse.Namespace(dir=tmp, force=True, tiny=True, threads=1)
        cmd_setup(ns)
        res = run_sub(["run", "--dir", tmp, "--batch", "4", "--response", "4", "--iters", "1", "--warmup", "1",
                       "--threads", "1"], timeout=300)
        assert res["loop"] == "rl" and res["median"]["total"] > 0 and res["cpu"]["cores"] >= 1, res
        print(fmt_run("smoke run", res, None))
        tiny = dict(dir=tmp, threads=1, batch=4, response=4, dtype="float32", autocast=True, patch="fused_adam",
                    verbose=False, iters=1, warmup=0, rows=5, shapes=False, trace=None, reps=1)
        cmd_profile(argparse.Namespace(**tiny))
        cmd_generate(argparse.Namespace(**tiny))
        cmd_adam_ab(argparse.Namespace(**{**tiny, "iters": 2}))
        print(f"floor formula at P: {iteration_flops(64, 16, 32)['total'] / 1e9:.1f} GFLOP per iteration")
    print("smoke ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="setup, run, profile, generate and adam-ab on tiny shapes "
                                                         "in a temporary directory (seconds; CI)")
    sub = ap.add_subparsers(dest="cmd")

    def common(p):
        p.add_argument("--dir", default=str(DEFAULT_DIR))
        p.add_argument("--threads", type=int, default=BASE["threads"])
        return p

    p = common(sub.add_parser("setup"))
    p.add_argument("--force", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny models and world (the smoke tests' setup)")
    for name in ("run", "profile", "adam-ab"):
        p = common(sub.add_parser(name))
        p.add_argument("--batch", type=int, default=BASE["batch"])
        p.add_argument("--response", type=int, default=BASE["response"])
        p.add_argument("--iters", type=int, default=6)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--dtype", default="float32")
        p.add_argument("--autocast", action="store_true", help="float32 weights, forward passes in bf16 autocast: the product's "
                       "--autocast bf16 (the loop inside models.bf16_autocast); with a PPO_BENCH_SRC that lacks it, "
                       "autocast around every model forward")
        p.add_argument("--patch", default="", help="comma-separated prototype speedups from ppo_patches.py")
        p.add_argument("--verbose", action="store_true")
        if name == "profile":
            p.add_argument("--rows", type=int, default=40)
            p.add_argument("--shapes", action="store_true")
            p.add_argument("--trace", default=None)
    p = common(sub.add_parser("suite"))
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--grid", action="store_true", help="with --scaling: the full 3 x 3 grid of batch x response")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--patch", default="")
    p.add_argument("--json", default=None)
    p = common(sub.add_parser("floor"))
    p.add_argument("--reps", type=int, default=8)
    p = common(sub.add_parser("generate"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--response", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    if getattr(a, "json", None):  # the output policy of every command: never over an existing file, checked first
        from instructrl.outputs import check_file_output

        check_file_output(a.json, [], "--json")
    if a.smoke:
        return cmd_smoke(a)
    if a.cmd is None:
        ap.error("a sub-command is required (or --smoke)")
    {"setup": cmd_setup, "run": cmd_run, "suite": cmd_suite, "floor": cmd_floor, "generate": cmd_generate,
     "adam-ab": cmd_adam_ab,
     "profile": cmd_profile}[a.cmd](a)


if __name__ == "__main__":
    main()
