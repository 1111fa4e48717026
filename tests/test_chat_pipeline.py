"""Conversational data end to end: a tiny Llama-style model whose tokenizer has a Llama-3 chat template (turns ended
by <|eot_id|>, not EOS), parquet files of multi-turn demonstrations, HH-style transcript pairs, K-way rankings and
message-list prompts, through SFT → RM → PPO → eval on the command line. And token by token: the RL sampler stops at the
end of turn, and the reward is read there."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from instructrl.chat import end_of_turn_ids, stop_token_id, use_chat_template
from instructrl.data import DataError
from instructrl.models import load_causal_lm, load_tokenizer, train_tokenizer
from instructrl.reward import encode_pair, last_token_index
from instructrl.rewards import ModelReward, Rewards
from instructrl.rollout import make_rollout
from instructrl.sampling import decode_responses, encode_prompts

SRC = Path(__file__).resolve().parent.parent / "src"
# Meta-Llama-3-8B-Instruct's template, verbatim (as in tests/test_chat.py)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
          "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TEXTS = ["Hello there, how are you today?", "The capital of France is Paris.", "I am fine, thank you very much.",
         "What is two plus two? Four. Be brief. Sure! Here you go.", "Tell me a joke. No. Why not? Fine."] * 10


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


def chat_model(d: Path) -> Path:
    """A tiny random Llama whose tokenizer has the Llama-3 template (special tokens flagged in added_tokens_decoder
    only, as Llama 3 ships), saved to `d`."""
    tok = train_tokenizer(TEXTS, vocab_size=400)
    tok.add_tokens([AddedToken(s, special=True) for s in
                    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
    tok.bos_token, tok.chat_template = "<|begin_of_text|>", LLAMA3
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_parquet(path: Path, rows: list[dict]) -> Path:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows of two kinds share one schema: absent is null
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def conversations(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        conv = [SYSTEM] if i % 2 else []
        conv += [user(f"Hello there {i}"), assistant("I am fine, thank you."), user("The capital of France?"),
                 assistant("Paris." if i % 3 else "It is Paris.")]
        out.append(conv)
    return out


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "instructrl.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"instructrl {args[0]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finite(records: list[dict]) -> bool:
    return all(math.isfinite(v) for rec in records for k, v in rec.items()
               if isinstance(v, float) and not k.startswith("eval/"))


@pytest.mark.slow
def test_sft_rm_ppo_on_conversational_parquet(tmp_path):
    base = chat_model(tmp_path / "base")
    convs = conversations(8)
    # demonstrations as whole conversations, under a mapped column name
    demos = write_parquet(tmp_path / "demos.parquet", [{"conversation": c} for c in convs])
    # preference data: HH-style transcript pairs (implicit prompt) and conversational K-way rankings, in one table
    pairs = [{"chosen": c, "rejected": c[:-1] + [assistant("No.")]} for c in convs[:4]]
    rankings = [{"prompt": c[:-1], "responses": [[assistant("Paris.")], [assistant("Rome, I think.")],
                                                 [assistant("No.")]], "ranking": [0, 1, 2]} for c in convs[4:]]
    prefs = write_parquet(tmp_path / "prefs.parquet", pairs + rankings)
    prompts = write_parquet(tmp_path / "prompts.parquet",
                            [{"prompt": c[:-1]} for c in convs] + [{"prompt": [user("Tell me a joke.")]}] * 4)

    sft_out, rm_out, ppo_out = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    cli("sft", "--model", str(base), "--data", str(demos), "--messages-key", "conversation", "--split", "train",
        "--out", str(sft_out), "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress")
    cli("rm", "--model", str(sft_out), "--data", str(prefs), "--out", str(rm_out), "--batch-size", "4",
        "--device", "cpu", "--no-progress")
    cli("ppo", "--policy", str(sft_out), "--reward", str(rm_out), "--prompts", str(prompts), "--out", str(ppo_out),
        "--episodes", "8", "--batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "8",
        "--device", "cpu", "--no-progress")

    for out in (sft_out, rm_out, ppo_out):
        assert finite(metrics(out)), out
    assert math.isfinite(metrics(sft_out)[-1]["train/loss"])
    rm_summary = json.loads((rm_out / "summary.json").read_text())
    assert math.isfinite(rm_summary["norm_gain"]) and math.isfinite(rm_summary["norm_bias"])
    assert rm_summary["train_prompts"] + rm_summary["held_out_prompts"] == 8
    ppo = metrics(ppo_out)[-1]
    assert math.isfinite(ppo["objective/score"]) and math.isfinite(ppo["objective/kl"])
    cli("eval", "--model", str(ppo_out), "--prompts", str(prompts), "--reference", str(sft_out), "--reward",
        str(rm_out), "--max-new-tokens", "8", "--out", str(tmp_path / "eval.json"), "--device", "cpu")
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["n_samples"] == 12 and all(math.isfinite(ev[k]) for k in ("rm_reward", "kl_to_reference"))
    assert isinstance(ev["examples"][0]["prompt"], list) and all("<|eot_id|>" not in e["response"]
                                                                  for e in ev["examples"])
    # outputs load, with the template carried along
    policy_tok = load_tokenizer(ppo_out)
    assert policy_tok.chat_template == LLAMA3
    load_causal_lm(ppo_out, "cpu")
    from instructrl.models import ScalarHeadModel
    ScalarHeadModel.from_pretrained(rm_out)


class ForceTokens:
    """A forward hook that makes the policy emit chosen tokens at chosen steps: {step: {row: token}}."""

    def __init__(self, plan: dict):
        self.plan, self.step = plan, 0

    def __call__(self, module, args, kwargs, out):
        for row, token in self.plan.get(self.step, {}).items():
            out.logits[row, -1] = -1e4
            out.logits[row, -1, token] = 1e4
        self.step += 1
        return out


def test_sampler_stops_at_the_end_of_turn_and_the_reward_is_read_there(tmp_path):
    d = chat_model(tmp_path / "m")
    tok, policy = load_tokenizer(d), load_causal_lm(d, "cpu")
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    assert stop_token_id(tok) == end_of_turn_ids(tok)[-1] == eot != eos
    prompts = [[SYSTEM, user("Hello there")], [user("The capital of France?")], [user("Tell me a joke.")]]
    ids = encode_prompts(tok, prompts, 200)
    # row 0: EOS at step 1 (not a stop), end of turn at step 3; row 1: end of turn at step 0; row 2: never ends
    hook = ForceTokens({0: {1: eot}, 1: {0: eos}, 3: {0: eot}})
    policy.register_forward_hook(hook, with_kwargs=True)

    class ReadToken:  # a reward model that scores each row with the id of the token it reads the reward at
        def score(self, input_ids, attention_mask, last_index):
            return input_ids.gather(1, last_index[:, None]).squeeze(1).float()

    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, missing_eos_penalty=-1.0)
    s = SimpleNamespace(cfg=cfg, policy=policy, ref=policy, value_model=None, reward=Rewards([ModelReward("read", ReadToken())], [1.0]),
                        tokenizer=tok,
                        generator=torch.Generator().manual_seed(0), lockstep=False, judge=None)
    r = make_rollout(s, prompts, ids, with_values=False)
    b = r.batch
    assert b.ended.tolist() == [True, True, False]
    assert b.response_mask.sum(1).tolist() == [4, 1, 6]
    assert b.response_ids[0, 1] == eos and b.response_ids[0, 3] == eot and b.response_ids[1, 0] == eot
    assert b.input_ids[0, b.last_index[0]] == eot and b.input_ids[1, b.last_index[1]] == eot
    assert r.scores[:2].tolist() == [eot, eot] and r.scores[2] == -1.0  # row 2: the missing-EOS penalty
    texts = decode_responses(tok, b)
    assert texts[1] == "" and "<|eot_id|>" not in texts[0] and texts[0].count("<|endoftext|>") == 1
    # the reward model's training pairs end with the same token, read at the same place
    pair_ids, _ = encode_pair(tok, prompts[0], "Hello", 200, False)
    assert pair_ids[:len(ids[0])] == ids[0] and pair_ids[-1] == eot
    assert last_token_index(torch.ones(1, len(pair_ids))).item() == len(pair_ids) - 1


def test_chat_template_option(tmp_path):
    """--chat-template gives a tokenizer without a template one; the same one again is a no-op; a different one
    is refused."""
    (tmp_path / "llama3.jinja").write_text(LLAMA3)
    (tmp_path / "other.jinja").write_text(LLAMA3.replace("<|eot_id|>", "<|eot_id|>\n"))
    d = chat_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = None
    assert use_chat_template(tok, None) is tok and tok.chat_template is None
    assert use_chat_template(tok, tmp_path / "llama3.jinja").chat_template == LLAMA3
    assert use_chat_template(load_tokenizer(d), tmp_path / "llama3.jinja").chat_template == LLAMA3
    with pytest.raises(DataError, match="already has a different chat template"):
        use_chat_template(load_tokenizer(d), tmp_path / "other.jinja")
    with pytest.raises(DataError, match="file not found"):
        use_chat_template(load_tokenizer(d), tmp_path / "missing.jinja")
