"""Step 3's driver: everything an RL algorithm shares, so an algorithm says only how a batch of rollouts becomes
advantages and updates.

Per iteration [IG, LHP, N+]:
  1. rollout: this rank's share of the prompts (k samples each), sampled and scored (`rollout.make_rollout`)
  2.–3. the algorithm's `update(rollout, beta, step)`: rewards (with the KL where it puts it), advantages, and its
     optimizer steps — skipped, by one policy for every algorithm, when a reward is not finite on any rank
  4. KL control: fixed β, or the adaptive controller [LHP]
  5. with --eval-every: the policy on the held-out --eval-prompts (`HeldOut`; also before the first iteration)
then metrics, periodic checkpoints and the final save, by the run shell.

Adding an algorithm: one file with a config (a subclass of RLConfig, its rules in its `check()`) and a subclass of
`update.PolicyUpdate` (the shared clipped update: optimizer, minibatches, accumulation, KL in the loss, ptx, clip and
step) with `name`, `config` and `advantages(rollout, beta)`, decorated with `@register`; then add the module's name
to `BUILTIN` and its one-line help to `cli.STEPS`.
The CLI command and the pipeline's YAML section follow from the config.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .data import DataError, read_prompts, read_texts
from .losses import KL_ESTIMATORS, KL_PLACES, adaptive_kl_beta
from .metrics import check_tables
from .models import (AdapterDisabled, ScalarHeadModel, apply_lora, bos_prefix, checkpoint_activations,
                     context_length, evaluating, freeze, load_causal_lm, load_tokenizer, save_causal_lm)
from .chat import use_chat_template
from .options import DataOptions, LoraOptions, MemoryOptions, RunOptions, config, group, option
from .rewards import RewardOptions, Rewards, check_sources, load_rewards, model_dirs
from .rollout import make_rollout, rollout_metrics, sequence_metrics, sequence_stats
from .run import Run
from .sampling import PromptTooLong, encode_prompts


@config
class RLConfig:
    """Options every RL algorithm shares (defaults tuned on the embedded world)."""

    policy: str = option("", "the SFT model: initial policy and, unless --ref is given, the frozen reference",
                         wired=True, required=True)
    reward: list[str] = option(factory=list, help="reward source, repeatable, each optionally SPEC@WEIGHT: a reward-model "
                               "directory (Step 2, or a Hugging Face sequence classifier), module:function, an "
                               "http(s) reward server, or gold:WORLD_DIR (see README, Reward sources)",
                               wired=True, required=True)
    prompts: str = option("", "prompts {prompt} (text or messages): JSONL, or a .json/.parquet/.arrow file or "
                              "directory read with `datasets`", wired=True, required=True)
    out: str = option("", "output directory", wired=True, required=True)
    ref: str | None = option(None, "reference model (default: the policy's initial weights)", wired=True)
    value: str | None = option(None, "value-model init (default: the first reward-model directory [IG, N+ D22])",
                               wired=True)
    judge: str | None = option(None, "embedded-world directory: log gold reward beside proxy reward", wired=True)
    eval_prompts: str | None = option(None, "held-out prompts {prompt}, read as --prompts is, to evaluate the "
                                            "policy on with --eval-every", wired=True, learns=False)
    eval_every: int = option(0, "evaluate on --eval-prompts before training, every N iterations and at the end: "
                                "score per reward source, KL, gold, length and a table of completions (0: off)",
                             ge=0, learns=False)
    episodes: int = option(3072, "total sampled responses", ge=1)
    batch_size: int = option(64, "rollouts per iteration (global: under torchrun each process samples 1/N)", ge=1)
    max_new_tokens: int = option(32, "response length limit", ge=1)
    temperature: float = option(0.7, "sampling temperature, also used in every log-prob [LHP]", gt=0)
    lr: float = option(3e-5, "learning rate (Adam)", gt=0)
    beta: float = option(0.05, "KL coefficient β (initial β with the adaptive controller)", ge=0)
    kl_estimator: str = option("k1", "per-token KL estimator: k1 | k3 in the reward; k2 | k3 in the loss [KL, KLG]",
                               choices=tuple(KL_ESTIMATORS))
    kl_in: str = option("reward", "where the KL penalty goes: reward (−β·k_t per token) | loss (β·mean k_t added to "
                                  "the policy loss; k3 with the ratio π_θ/π_old) [KLG]", choices=tuple(KL_PLACES))
    kl_target: float | None = option(None, "set to use the adaptive KL controller with this target [LHP]", gt=0)
    kl_horizon: int = option(10000, "horizon of the adaptive KL controller [LHP]", ge=1)
    missing_eos_penalty: float = option(-1.0, "score of a response that does not end within max_new_tokens [N+ D23]")
    ptx_coef: float = option(0.0, "γ of PPO-ptx: weight of the pretraining log-likelihood (0: none) [IG Eq. 2]", ge=0)
    ptx_data: str | None = option(None, "pretraining text {text} JSONL for ptx", wired=True)
    ptx_batch_size: int = option(16, "pretraining texts per update (global)", ge=1)
    max_grad_norm: float = option(1.0, "gradient-norm clip", gt=0)
    adam_eps: float = option(1e-5, "Adam epsilon [37]", gt=0)
    truncate_prompts: bool = option(False, "cut over-long prompts from the left instead of refusing them")
    rewards: RewardOptions = group(RewardOptions, "reward_")
    run: RunOptions = group(RunOptions)
    lora: LoraOptions = group(LoraOptions, "lora_")
    mem: MemoryOptions = group(MemoryOptions)
    fmt: DataOptions = group(DataOptions)  # of --prompts

    @property
    def iterations(self) -> int:
        """Iterations of the run: one batch of rollouts each."""
        return max(1, self.episodes // self.batch_size)

    def check(self) -> None:
        """The rules between options every algorithm shares (`validate` checks each option's declaration first; an
        algorithm's config adds its own rules after these)."""
        if self.episodes < self.batch_size:
            raise ValueError(f"--episodes ({self.episodes}) must be at least --batch-size ({self.batch_size}): one "
                             "iteration samples a whole batch")
        if self.kl_estimator not in KL_PLACES[self.kl_in]:
            why = {"reward": "k2 is a biased estimate of the KL (use k1, or k2 with --kl-in loss)",
                   "loss": "k1 in the loss has zero expected gradient (use k2 or k3, or k1 with --kl-in reward)"}
            raise ValueError(f"--kl-estimator {self.kl_estimator} with --kl-in {self.kl_in}: {why[self.kl_in]}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("--ptx-coef > 0 needs --ptx-data (pretraining text in the {\"text\": ...} format)")
        if bool(self.eval_every) != bool(self.eval_prompts):
            raise ValueError("--eval-every N and --eval-prompts FILE go together: held-out prompts, and how many "
                             "iterations between their evaluations")


# --- streams ------------------------------------------------------------------------------------------------------
class PromptStream:
    """Prompts in a seeded random order, reshuffled each pass."""

    def __init__(self, prompts: list, ids: list[list[int]], seed: int):
        self.prompts, self.ids, self.rng = prompts, ids, random.Random(seed)
        self.order: list[int] = []  # saved in checkpoints with self.rng

    def next(self, n: int) -> tuple[list, list[list[int]]]:
        while len(self.order) < n:
            fresh = list(range(len(self.prompts)))
            self.rng.shuffle(fresh)
            self.order += fresh
        take, self.order = self.order[:n], self.order[n:]
        return [self.prompts[i] for i in take], [self.ids[i] for i in take]


class TextStream:
    """Pretraining text for PPO-ptx: random batches of EOS-terminated documents, right-padded."""

    def __init__(self, texts: list[str], tokenizer, max_len: int, seed: int):
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos = bos_prefix(tokenizer)  # documents start as the tokenizer starts any text (Llama: <s>)
        self.docs = [(bos + e)[: max_len - 1] + [tokenizer.eos_token_id] for e in enc if e]
        self.pad = tokenizer.pad_token_id
        self.g = torch.Generator().manual_seed(seed)  # saved in checkpoints

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.docs), (n,), generator=self.g).tolist()
        docs = [self.docs[i] for i in idx]
        width = max(len(d) for d in docs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, :len(d)] = torch.tensor(d)
            mask[i, :len(d)] = 1
        return ids, mask


# --- setup -----------------------------------------------------------------------------------------------------
@dataclass
class RLSetup:
    """Everything an RL run loads before its first iteration."""

    cfg: RLConfig
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module
    ref: torch.nn.Module
    reward: Rewards
    value_model: ScalarHeadModel | None
    prompts: PromptStream | None
    ptx: TextStream | None
    judge: object | None
    generator: torch.Generator = field(default=None)
    held_out: "HeldOut | None" = None            # --eval-prompts
    train_policy: torch.nn.Module | None = None  # what training forwards go through: DDP wrappers, or the models
    train_value: torch.nn.Module | None = None
    lockstep: bool = False                       # FSDP: every rank decodes the same number of steps

    def __post_init__(self):
        self.train_policy = self.policy if self.train_policy is None else self.train_policy
        self.train_value = self.value_model if self.train_value is None else self.train_value

    def generators(self) -> dict:
        """Every random stream of the run, for checkpoints."""
        g = {"sampling": self.generator, "prompts": self.prompts.rng}
        if self.ptx is not None:
            g["ptx"] = self.ptx.g
        return g


def value_init(cfg: RLConfig) -> str:
    """Where the value model starts: --value, else the first reward-model directory [IG, N+ D22]."""
    init = cfg.value or next(iter(model_dirs(cfg.reward)), None)
    if init is None:
        raise ValueError("PPO needs a value-model init and no --reward is a model directory: pass --value DIR "
                         "(a reward-model directory)")
    return init


def load_rl_models(cfg: RLConfig, device, dtype, with_value: bool, tokenizer):
    """Policy, reference, rewards and value model, all in `dtype` (heads in float32). With LoRA the policy and the
    value backbone get adapters and the reference is the policy with its adapters off (unless --ref names another
    model): the SFT weights are held once. With FSDP the models are sharded over the ranks."""
    policy = load_causal_lm(cfg.policy, device, dtype)
    if cfg.lora.r:
        policy = apply_lora(policy, cfg.lora)
    if cfg.lora.r and not cfg.ref:
        ref = AdapterDisabled(policy)
    else:
        ref = freeze(load_causal_lm(cfg.ref or cfg.policy, device, dtype))
    rewards = load_rewards(cfg.reward, cfg.rewards, tokenizer, device, dtype)
    value_model = ScalarHeadModel.from_pretrained(value_init(cfg), device, dtype) if with_value else None
    if cfg.lora.r and value_model is not None:
        value_model.backbone = apply_lora(value_model.backbone, cfg.lora, causal_lm=False)
    if cfg.mem.gradient_checkpointing:  # the trained models (the reference and reward model run without grad)
        for m in (policy, value_model):
            if m is not None:
                checkpoint_activations(m)
    if cfg.run.fsdp:
        for m in (policy, ref, value_model, *(getattr(r, "model", None) for r in rewards.sources)):
            if m is not None and not isinstance(m, AdapterDisabled):  # that one is the (sharded) policy
                dist.fsdp_shard(m)
    return policy, ref, rewards, value_model


def per_rank(n: int, what: str) -> int:
    """A global count split evenly over the ranks."""
    if n % dist.world_size():
        raise ValueError(f"{what} ({n}) must be a multiple of the number of processes ({dist.world_size()})")
    return n // dist.world_size()


def setup_rl(cfg: RLConfig, device: torch.device, dtype: torch.dtype, with_value: bool) -> RLSetup:
    from .world.judge import GoldJudge

    lines, eval_lines = [], []
    prompts = read_prompts(cfg.prompts, lines, split=cfg.fmt.split, columns=cfg.fmt.columns())
    eval_prompts = read_prompts(cfg.eval_prompts, eval_lines, split=cfg.fmt.split, columns=cfg.fmt.columns()) \
        if cfg.eval_every else None
    ptx_texts = read_texts(cfg.ptx_data) if cfg.ptx_coef > 0 else None
    per_rank(cfg.batch_size, "batch_size")
    tokenizer = use_chat_template(load_tokenizer(cfg.policy), cfg.fmt.chat_template)
    if with_value:
        value_init(cfg)  # before anything is loaded
    policy, ref, rewards, value_model = load_rl_models(cfg, device, dtype, with_value, tokenizer)
    max_prompt = context_length(policy) - cfg.max_new_tokens
    try:
        ids = encode_prompts(tokenizer, prompts, max_prompt, cfg.truncate_prompts)
    except PromptTooLong as e:
        raise DataError(cfg.prompts, lines[e.index], str(e), "prompt") from None
    held_out = HeldOut(cfg, eval_prompts, eval_lines, tokenizer, max_prompt, policy) if cfg.eval_every else None
    seed = dist.rank_seed(cfg.run.seed)  # each rank its own samples, prompt order and ptx text (rank 0: the seed)
    ptx = TextStream(ptx_texts, tokenizer, context_length(policy), seed + 7) if ptx_texts else None
    judge = GoldJudge.from_world(cfg.judge) if cfg.judge and (Path(cfg.judge) / "judge.json").is_file() else None
    gen = torch.Generator(device=device).manual_seed(seed)
    return RLSetup(cfg, device, tokenizer, policy, ref, rewards, value_model, PromptStream(prompts, ids, seed),
                   ptx, judge, gen, train_policy=dist.wrap(policy, cfg.run.fsdp),
                   train_value=dist.wrap(value_model, cfg.run.fsdp) if value_model is not None else None,
                   lockstep=cfg.run.fsdp and dist.active(), held_out=held_out)


# --- held-out evaluation during training ----------------------------------------------------------------------
EVAL_TABLE_ROWS = 4  # held-out prompts whose completions each evaluation logs as a table


class HeldOut:
    """--eval-prompts, evaluated as the training batches are measured (`rollout.make_rollout`, `sequence_metrics`):
    `eval/score` (the reward, missing-EOS penalty included), `eval/score/NAME` per source, `eval/kl`, `eval/gold`
    with --judge, `eval/length`, `eval/eos_rate`, and the `eval/samples` table of the first few prompts. Sampled at
    the training temperature on its own generator, reseeded with --seed at each evaluation (every evaluation draws
    the same noise), with torch's, Python's and NumPy's global random states put back after it: training's random
    streams are untouched, so the weights are the same with or without it."""

    def __init__(self, cfg: RLConfig, prompts: list, lines: list[int], tokenizer, max_prompt: int, policy):
        if len(prompts) < dist.world_size():
            raise DataError(cfg.eval_prompts, None, f"{len(prompts)} prompt(s) for {dist.world_size()} processes")
        try:
            ids = encode_prompts(tokenizer, prompts, max_prompt, cfg.truncate_prompts)
        except PromptTooLong as e:
            raise DataError(cfg.eval_prompts, lines[e.index], str(e), "prompt") from None
        # this rank's share (every prompt on every rank when FSDP-sharded: each forward is a collective), padded with
        # its first prompt to the largest share: every rank scores as many chunks (a whitened reward is a collective)
        mine, self.gather = dist.eval_share(list(range(len(prompts))), policy)
        self.keep = len(mine)  # the rows after it are padding
        mine += mine[:1] * ((-(-len(prompts) // dist.world_size()) if self.gather else len(mine)) - len(mine))
        self.prompts, self.ids = [prompts[i] for i in mine], [ids[i] for i in mine]
        self.every, self.seed = cfg.eval_every, cfg.run.seed
        self.chunk = cfg.batch_size // dist.world_size()  # a training rollout's size

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def __call__(self, s: RLSetup) -> tuple[dict, dict[str, list[dict]]]:
        """The metrics and the `eval/samples` table of the policy now (every rank calls it)."""
        t0 = time.time()
        g = torch.Generator(device=s.device).manual_seed(self.seed)
        stats: list[tuple] = []
        with own_random_state(s.device), evaluating(s.policy):
            for i in range(0, len(self.ids), self.chunk):
                r = make_rollout(s, self.prompts[i:i + self.chunk], self.ids[i:i + self.chunk], with_values=False,
                                 generator=g)
                stats.append(sequence_stats(r))
                if i == 0:
                    rows = [{"prompt": p if isinstance(p, str) else json.dumps(p, ensure_ascii=False),
                             "completion": r.texts[j], "score": float(r.scores[j]), "kl": float(stats[0][1][j]),
                             **({"gold": r.gold[j]} if r.gold is not None else {})}
                            for j, p in enumerate(r.prompts[:min(EVAL_TABLE_ROWS, self.keep)])]
        keep = self.keep
        scores, kl, lengths, ended = (torch.cat([st[k] for st in stats])[:keep] for k in range(4))
        by_source = {name: torch.cat([st[4][name] for st in stats])[:keep] for name in stats[0][4]}
        gold = None if stats[0][5] is None else [x for st in stats for x in st[5]][:keep]
        m = sequence_metrics(scores, kl, lengths, ended, by_source, gold, gather=self.gather)
        out = {"eval/" + k.split("/", 1)[1].replace("response_length", "length"): v for k, v in m.items()}
        return {**out, "time/eval": time.time() - t0}, {"eval/samples": rows}


@contextlib.contextmanager
def own_random_state(device: torch.device):
    """torch's (CPU and `device`'s), Python's and NumPy's global random states as they were before the block."""
    py, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


# --- the algorithms -----------------------------------------------------------------------------------------------
BUILTIN = ("ppo", "pg", "grpo", "rloo")   # modules under instructrl that register an algorithm
ALGORITHMS: dict[str, type] = {}


def register(cls: type) -> type:
    ALGORITHMS[cls.name] = cls
    return cls


def algorithms() -> dict[str, type]:
    """Every registered algorithm by name (importing the built-in ones)."""
    for module in BUILTIN:
        importlib.import_module(f"{__package__}.{module}")
    return ALGORITHMS


# --- the driver ---------------------------------------------------------------------------------------------------
def train_rl(cfg: RLConfig, algorithm: type) -> dict:
    cfg.validate()
    check_sources(cfg.reward, cfg.rewards)  # every --reward usable (functions, worlds, model dirs) before anything loads
    if cfg.eval_every:
        check_tables(cfg.run.log_with)  # the held-out evaluation logs a table
    run = Run(algorithm.name, cfg, cfg.run, cfg.out)
    s = setup_rl(cfg, run.device, run.dtype, with_value=algorithm.needs_value)
    algo = algorithm(cfg, s, run.nonfinite)
    k = algo.samples_per_prompt
    prompts_per_rank = per_rank(cfg.batch_size // k, "batch_size / samples_per_prompt")
    iterations = cfg.iterations
    st = run.resume(algo.models, algo.optimizer, algo.scheduler, {**s.generators(), **algo.generators}) or {}
    beta, episodes = st.get("beta", cfg.beta), st.get("episodes", 0)
    s.prompts.order = st.get("prompt_order", s.prompts.order)
    held_out = s.held_out
    with run.output() as tmp:
        rec: dict = json.loads(run.previous[-1]) if run.previous else {}
        if held_out is not None and run.start == 0:  # before training (a resumed run has it in its metrics)
            ev, tables = held_out(s)
            run.log({"step": 0, **ev}, tables)
        for step in run.progress(iterations):
            t_it = time.time()
            # 1. rollout: this rank's share of the batch, k samples per prompt
            prompts, ids = s.prompts.next(prompts_per_rank)
            prompts, ids = [p for p in prompts for _ in range(k)], [x for x in ids for _ in range(k)]
            r = make_rollout(s, prompts, ids, with_values=algorithm.needs_value)
            t_rollout = time.time() - t_it
            episodes += cfg.batch_size
            # 2.–3. the algorithm's advantages and updates, unless a reward is not finite on some rank
            update = algo.update(r, beta, step) if run.nonfinite.ok(step, reward=r.scores) else {}
            rec = {"step": step, "train/episodes": episodes, "objective/beta": beta, **rollout_metrics(r), **update,
                   "time/rollout": t_rollout, "time/iteration": time.time() - t_it}
            # 4. KL control
            if cfg.kl_target is not None:
                beta = adaptive_kl_beta(beta, rec["objective/kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
            tables = None
            if held_out is not None and held_out.due(step, step == iterations):  # the policy after this update
                ev, tables = held_out(s)
                rec.update(ev)
            run.log(rec, tables)
            run.maybe_save(step, step == iterations,
                           {"beta": beta, "episodes": episodes, "prompt_order": s.prompts.order})
            run.show(score=rec["objective/score"], kl=rec["objective/kl"],
                     **({"gold": rec["objective/gold"]} if "objective/gold" in rec else {}))
        s.policy.eval()
        full = {name: dist.full_state_dict(m) for name, m in algo.models.items()}  # FSDP: a collective
        if tmp is not None:
            save_causal_lm(s.policy, tmp, full["policy"])
            s.tokenizer.save_pretrained(str(tmp))
            for name, m in algo.models.items():
                if name != "policy":  # e.g. PPO's value model, in OUT/value_model
                    m.save_pretrained(tmp / f"{name}_model", full[name])
        final = ("objective/score", "objective/kl", "objective/gold", "rollout/response_length", "eval/score",
                 "eval/kl", "eval/gold", "eval/length")
        return run.finish({"algorithm": algorithm.name, "iterations": iterations, "episodes": episodes,
                           "final": {key: rec[key] for key in final if key in rec}, "beta": beta})
