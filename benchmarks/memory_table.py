"""Memory of PPO's four models from parameter counts: the table in README "Running at scale", reproducibly.

    python benchmarks/memory_table.py [--lora-r 16] [--markdown]

Counts come from the architectures' shapes (Llama-3.2-1B and Llama-2-7B), not from downloads. Per parameter:
weights in the chosen dtype; a trainable parameter adds its gradient and Adam's two moments, all in the parameter's
dtype (torch.optim.Adam keeps its state in the parameter's dtype; instructrl trains in the weights' dtype, no fp32
master copy). Policy and value model train; reference and reward model are frozen (weights only). With LoRA the
bases are frozen, the adapters are float32 (peft's default) and train, and the reference is the policy with its
adapters off: its row is 0. Not counted: activations, the KV cache while sampling, the CUDA context (~0.5–1 GiB),
allocator fragmentation. Per GPU under DDP every process holds all of it; FSDP divides it by the number of GPUs.
"""
from __future__ import annotations

import argparse

GIB = 2 ** 30
MODELS = {  # name: hidden, layers, intermediate, vocab, attention heads, kv heads, tied embeddings
    "1B (Llama-3.2-1B shape)": (2048, 16, 8192, 128256, 32, 8, True),
    "7B (Llama-2-7B shape)": (4096, 32, 11008, 32000, 32, 32, False),
}


def counts(hidden, layers, inter, vocab, heads, kv_heads, tied, lora_r):
    """(causal LM params, backbone + scalar head params, LoRA params on q_proj/v_proj — peft's Llama default)."""
    kv = hidden * kv_heads // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    backbone = vocab * hidden + layers * per_layer + hidden
    lm = backbone + (0 if tied else vocab * hidden)
    lora = layers * lora_r * ((hidden + hidden) + (hidden + kv))
    return lm, backbone + hidden + 1, lora


def rows(lora_r: int):
    for name, shape in MODELS.items():
        lm, scalar, lora = counts(*shape, lora_r)
        for setting, w, lora_on in (("full, float32", 4, False), ("full, bfloat16", 2, False),
                                    (f"LoRA r={lora_r}, bfloat16", 2, True)):
            if lora_on:  # frozen base (weights only) + float32 adapters with gradient and Adam (4 + 4 + 8 bytes)
                policy, value = lm * w + lora * 16, scalar * w + lora * 16  # (+ a float32 head: negligible)
                reference = 0
            else:  # weights + gradients + Adam m and v, all in the weights' dtype
                policy, value = lm * w * 4, scalar * w * 4
                reference = lm * w
            reward = scalar * w
            yield name, setting, lm, lora if lora_on else lm, policy, value, reference, reward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (as in the README)")
    ap.add_argument("--smoke", action="store_true", help="the table as usual (it is arithmetic: already instant; CI)")
    a = ap.parse_args()
    if not a.markdown:  # the README's table is this output to the letter (tests/test_readme.py)
        print("(from parameter counts: the same on every CPU)")
    head = ["model", "setting", "policy trainable", "policy", "value", "reference", "reward", "total GiB"]
    lines = []
    for name, setting, lm, trainable, policy, value, ref, reward in rows(a.lora_r):
        total = policy + value + ref + reward
        lines.append([name, setting, f"{trainable / 1e6:,.1f} M", *(f"{x / GIB:.1f}" for x in
                                                                   (policy, value, ref, reward, total))])
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    for r in [head, *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


if __name__ == "__main__":
    main()
