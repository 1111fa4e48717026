"""A GPU check, ready to run: SFT → RM → PPO in bf16 with LoRA and activation checkpointing on a random Qwen2-style
model of about 0.5 B parameters (built from a config, tokenizer trained on the fly: no downloads), then generation
tokens/s, seconds per PPO iteration, peak CUDA memory and model FLOPs utilisation.

    python benchmarks/gpu_check.py                          # one CUDA device
    torchrun --nproc_per_node 1 benchmarks/gpu_check.py --fsdp
    python benchmarks/gpu_check.py --smoke                  # = --tiny --device cpu: CI (tests/test_gpu_check.py)

--fsdp shards the models with FSDP (torch's fully_shard), LoRA as without it. MFU counts model FLOPs only (6·N
per trained token, 2·N per scored or generated token; checkpointing's recomputation is not counted) against the
device's dense bf16 peak (--peak-tflops where it is not known).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from instructrl import distributed as dist  # noqa: E402
from instructrl.data import read_demos, read_prompts, read_texts, write_jsonl  # noqa: E402
from instructrl.models import count_parameters, load_causal_lm, load_tokenizer, train_tokenizer  # noqa: E402
from instructrl.machine import cpu_info, cpu_line  # noqa: E402
from instructrl.ppo import PPO, PPOConfig  # noqa: E402
from instructrl.rl import train_rl  # noqa: E402
from instructrl.reward import RewardConfig, train_reward_model  # noqa: E402
from instructrl.sampling import encode_prompts, sample  # noqa: E402
from instructrl.sft import SFTConfig, sft  # noqa: E402
from instructrl.world import WorldConfig, generate_world  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def qwen2_config(vocab: int, tok, tiny: bool):
    from transformers import Qwen2Config

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if tiny else \
        dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=12,
             num_key_value_heads=2)  # ≈ 0.49 B parameters with an 8k vocabulary
    return Qwen2Config(vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       **size)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and batch (CI: well under a minute on CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP (torch's fully_shard)")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--iterations", type=int, default=3, help="PPO iterations (seconds per iteration: without "
                                                               "the first, unless it is the only one)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    ap.add_argument("--smoke", action="store_true", help="--tiny --device cpu (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.device = True, "cpu"
    tiny, device = args.tiny, torch.device(args.device)
    dtype = "float32" if device.type == "cpu" else "bfloat16"  # CPU bf16 matmuls are slow and prove nothing here
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    world, base = work / "world", work / "base"
    if dist.is_main() and not (base / "config.json").is_file():
        generate_world(world, WorldConfig(seed=0, n_corpus=300 if tiny else 5000, n_demos=24 if tiny else 512,
                                          n_prompts_train=24 if tiny else 512, n_prompts_eval=8))
        tok = train_tokenizer(read_texts(world / "corpus.jsonl"), 500 if tiny else 8000)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(qwen2_config(len(tok), tok, tiny))
        model.save_pretrained(base)
        tok.save_pretrained(base)
        demos = read_demos(world / "demos.jsonl")  # K = 2 rankings: a prompt's own demonstration beats another's

        def other(i: int, r: str) -> str:  # the next demonstration with a different text (equal texts can't rank)
            return next(x for j in range(1, len(demos)) if (x := demos[(i + j) % len(demos)][1]) != r)
        write_jsonl(work / "rankings.jsonl", [{"prompt": p, "responses": [r, other(i, r)], "ranking": [0, 1]}
                                              for i, (p, r) in enumerate(demos)])
    if os.environ.get("WORLD_SIZE"):
        dist.init(device)
        dist.barrier()
    fsdp = args.fsdp
    run = dict(device=args.device, dtype=dtype, progress=False, fsdp=fsdp, gradient_checkpointing=True,
               lora_r=16, lora_target_modules="all-linear", overwrite=True)
    batch = 8 if tiny else 64
    iterations = 2 if tiny else args.iterations
    t = {}
    t0 = time.time()
    sft(SFTConfig(model=str(base), data=str(world / "demos.jsonl"), out=str(work / "sft"), epochs=1,
                  batch_size=batch, micro_batch_size=batch // 2, lr=2e-4, **run))
    t["sft"] = time.time() - t0
    t0 = time.time()
    train_reward_model(RewardConfig(model=str(work / "sft"), data=str(work / "rankings.jsonl"), out=str(work / "rm"),
                                    demos=str(world / "demos.jsonl"), batch_size=batch // 2,
                                    micro_batch_size=batch // 4, **run))
    t["rm"] = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    new_tokens = 8 if tiny else 128
    summary = train_rl(PPOConfig(policy=str(work / "sft"), reward=[str(work / "rm")], out=str(work / "ppo"),
                                 prompts=str(world / "prompts_train.jsonl"), episodes=batch * iterations,
                                 batch_size=batch, minibatch_size=batch // 2, micro_batch_size=batch // 4,
                                 ppo_epochs=2, max_new_tokens=new_tokens, **run), PPO)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    recs = [json.loads(x) for x in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steady = recs[1:] or recs
    sec_it = sum(r["time/iteration"] for r in steady) / len(steady)

    # generation alone: one batch of prompts through the sampler (KV cache), timed after a warm-up
    tok = load_tokenizer(work / "ppo")
    policy = load_causal_lm(work / "ppo", device, getattr(torch, dtype))
    ids = encode_prompts(tok, read_prompts(world / "prompts_train.jsonl")[:batch], 512 - new_tokens, True)
    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=new_tokens, temperature=1.0, generator=gen)
    with torch.inference_mode():  # eos_id -1: never stops early, so every row generates max_new_tokens
        sample(policy, ids, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.time()
        out = sample(policy, ids, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    gen_tps = float(out.response_mask.sum()) / (time.time() - t0)

    # model FLOPs of one PPO iteration: policy and value trained on every token ppo_epochs times (6N), policy (bf16:
    # old log-probs), reference, reward and value scored once (2N each), and the generated tokens (2N)
    n = count_parameters(policy)
    length = sum(r["rollout/response_length"] for r in steady) / len(steady)
    prompt_len = sum(len(x) for x in ids) / len(ids)
    tokens = batch * (prompt_len + length)
    flops = 6 * 2 * n * tokens * 2 + 2 * 4 * n * tokens + 2 * n * batch * length
    peak = peak_flops(device, args.peak_tflops)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world_size": dist.world_size(), "fsdp": fsdp, "lora_r": run["lora_r"], "dtype": dtype,
              "parameters": n, "seconds_sft": round(t["sft"], 2), "seconds_rm": round(t["rm"], 2),
              "ppo_iterations": summary["iterations"], "ppo_seconds_per_iteration": round(sec_it, 3),
              "generation_tokens_per_s": round(gen_tps, 1),
              "peak_cuda_memory_gib": round(peak_mem / 2 ** 30, 2) if peak_mem is not None else None,
              "mfu": round(flops / sec_it / peak, 4) if peak else None, "cpu": cpu_info()}
    if dist.is_main():
        print(cpu_line(report["cpu"]))
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
