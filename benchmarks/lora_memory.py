"""Peak memory of PPO with LoRA (reference = the policy with adapters off) vs a full reference model; with
--memory, of activation checkpointing and gradient accumulation at the same global minibatch instead.

    python benchmarks/lora_memory.py [--n-layer 4 --n-embd 256 --vocab 2000 --iterations 3] [--dir DIR] [--memory]

Builds a small embedded world and a random GPT-2 of the given size (saved to disk; the reward and value models
start from it with a fresh head), then runs each variant in a fresh Python process and reads its peak RSS
(`ru_maxrss`, as every run's summary.json reports it). Every process imports the same modules (peft included), and
a baseline process that only imports and loads the tokenizer gives the fixed cost. This script itself imports no
torch and builds the model in a child too: Linux hands a parent's peak RSS on to the `ru_maxrss` of a child it
spawns, so a heavy parent would raise every measurement to its own peak.

  full           full fine-tuning, reference = a second frozen copy (the default without LoRA)
  lora+full-ref  LoRA on policy and value, reference = a separate frozen copy (--ref pointing at the policy)
  lora           LoRA on policy and value, reference = the policy with its adapters off (no second copy)

--memory (full fine-tuning, minibatch = the whole batch of rollouts, --max-new-tokens 64):
  plain          one forward/backward per minibatch
  accum4         --micro-batch-size minibatch/4 (4 micro-batches, the same step)
  ckpt           --gradient-checkpointing
  ckpt+accum4    both
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, torch, peft
torch.set_num_threads(1)
from instructrl.ppo import PPO, PPOConfig
from instructrl.rl import train_rl
from instructrl.models import load_tokenizer
from instructrl.utils import peak_rss_mb
kw = json.loads(sys.argv[1])
if kw.pop("baseline", False):
    load_tokenizer(kw["policy"])
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
else:
    s = train_rl(PPOConfig(**kw), PPO)
    recs = [json.loads(x) for x in open(kw["out"] + "/metrics.jsonl")][1:]  # without the first iteration
    print(json.dumps({"peak_rss_mb": s["peak_rss_mb"], "seconds": s["seconds"],
                      "per_iteration": sum(r["time/iteration"] for r in recs) / max(1, len(recs))}))
"""


def build(d: Path, a) -> None:
    """World + tokenizer + random GPT-2 of the asked size, saved as an HF directory (run in a child process)."""
    from instructrl.data import read_texts
    from instructrl.models import build_tiny_model, count_parameters, tiny_gpt_config, train_tokenizer
    from instructrl.world import WorldConfig, generate_world

    generate_world(d / "world", WorldConfig(seed=0, n_corpus=300 if a.smoke else 3000, n_corpus_val=100, n_demos=50,
                                            n_prompts_train=200, n_prompts_eval=10))
    tok = train_tokenizer(read_texts(d / "world" / "corpus.jsonl"), a.vocab)
    model = build_tiny_model(tiny_gpt_config(len(tok), tok.eos_token_id, tok.pad_token_id, n_layer=a.n_layer,
                                             n_embd=a.n_embd, n_head=max(1, a.n_embd // 64)))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    print(f"model: {a.n_layer} layers, width {a.n_embd}, vocab {len(tok)}: {count_parameters(model) / 1e6:.2f} M "
          f"parameters ({count_parameters(model) * 4 / 2**20:.1f} MiB in float32)")


def run(kw: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--memory", action="store_true", help="checkpointing and accumulation variants instead")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp directory)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the child that builds
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one iteration, variants full and lora (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.n_layer, a.n_embd, a.vocab, a.iterations, a.batch_size = 1, 32, 300, 1, 4
    return a


def main() -> None:
    a = parse_args()
    if a.build_only:
        return build(a.dir, a)
    from instructrl.machine import child_cpu_info, cpu_line

    print(cpu_line(child_cpu_info(1)), flush=True)  # what the children that are measured run on
    d = a.dir or Path(tempfile.mkdtemp(prefix="lora_memory_"))
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--dir", str(d), "--build-only"], check=True)
    model = d / "model"
    reward = d / "reward"  # a reward directory (a fresh head on the model): a plain LM is refused as a reward
    if not reward.is_dir():
        from instructrl.models import ScalarHeadModel
        ScalarHeadModel.from_backbone(model).save_pretrained(reward)
    common = dict(policy=str(model), reward=[str(reward)], prompts=str(d / "world" / "prompts_train.jsonl"),
                  episodes=a.iterations * a.batch_size, batch_size=a.batch_size, minibatch_size=a.batch_size // 2,
                  max_new_tokens=16, progress=False, device="cpu")
    variants = {"full": {}, "lora+full-ref": {"lora_r": a.lora_r, "ref": str(model)}, "lora": {"lora_r": a.lora_r}}
    if a.memory:
        common.update(minibatch_size=a.batch_size, max_new_tokens=64, ppo_epochs=1)
        accum = {"micro_batch_size": a.batch_size // 4}
        ckpt = {"gradient_checkpointing": True}
        variants = {"plain": {}, "accum4": accum, "ckpt": ckpt, "ckpt+accum4": {**ckpt, **accum}}
    if a.smoke:  # the same code path, fewer processes
        variants = {k: v for k, v in variants.items() if k in ("full", "lora", "plain", "ckpt+accum4")}
    base = run({**common, "baseline": True})["peak_rss_mb"]
    print(f"baseline (imports + tokenizer): {base:.0f} MiB")
    print(f"{'variant':<15}{'peak RSS MiB':>14}{'over baseline':>15}{'seconds':>10}{'s/iteration':>13}")
    for name, extra in variants.items():
        r = run({**common, **extra, "out": str(d / f"out-{name}")})
        print(f"{name:<15}{r['peak_rss_mb']:>14.0f}{r['peak_rss_mb'] - base:>15.0f}{r['seconds']:>10.1f}"
              f"{r['per_iteration']:>13.2f}")
    if a.smoke and not a.dir:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
