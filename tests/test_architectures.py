"""Any local HF causal LM: tiny random GPT-2, Llama and OPT built from configs, saved, through SFT → RM → PPO.

Each exercises a different edge: GPT-2 (absolute positions, distinct PAD), Llama (rotary, a tokenizer that adds BOS
and has no PAD, untied head), OPT (learned positions offset by 2, BOS = EOS prepended to every text, hidden state
projected to word_embed_proj_dim ≠ hidden_size). Also: PPO with bfloat16 weights on CPU.
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

from instructrl.data import read_demos, read_texts, write_jsonl
from instructrl.models import ScalarHeadModel, load_tokenizer, train_tokenizer
from instructrl.ppo import PPOConfig, train_ppo
from instructrl.reward import RewardConfig, train_reward_model
from instructrl.sft import SFTConfig, sft

CTX = 128


def bpe_tokenizer(texts, specials: list[str], prefix: str | None, **tokens) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose post-processor puts `prefix` before every text (as Llama's and OPT's tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if prefix:
        tok.post_processor = processors.TemplateProcessing(single=f"{prefix} $A", pair=f"{prefix} $A $B",
                                                           special_tokens=[(prefix, tok.token_to_id(prefix))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **tokens)


def gpt2(texts):
    tok = train_tokenizer(texts, 400)
    return tok, GPT2Config(vocab_size=len(tok), n_positions=CTX, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def llama(texts):
    tok = bpe_tokenizer(texts, ["<unk>", "<s>", "</s>"], "<s>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok, LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CTX,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)


def opt(texts):
    tok = bpe_tokenizer(texts, ["<pad>", "</s>"], "</s>", bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    return tok, OPTConfig(vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=CTX, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, layerdrop=0.0, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def rankings(world_dir, tmp_path_factory):
    """K = 2 rankings from the demonstrations: a prompt's own demonstration beats another prompt's."""
    demos = read_demos(world_dir / "demos.jsonl")[:48]
    path = tmp_path_factory.mktemp("arch") / "rankings.jsonl"
    write_jsonl(path, [{"prompt": p, "responses": [r, demos[(i + 1) % len(demos)][1]], "ranking": [0, 1]}
                       for i, (p, r) in enumerate(demos)])
    return path


def finite_metric(path, key) -> bool:
    values = [json.loads(x)[key] for x in path.read_text().splitlines() if key in json.loads(x)]
    return bool(values) and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("build", [gpt2, llama, opt], ids=["gpt2", "llama", "opt"])
def test_sft_rm_ppo_on_architecture(build, world_dir, rankings, tmp_path):
    texts = read_texts(world_dir / "corpus.jsonl")[:1500]
    tok, config = build(texts)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    loaded = load_tokenizer(base)
    assert loaded.pad_token_id is not None
    if build is llama:  # no PAD: EOS stands in; every text starts with BOS
        assert loaded.pad_token_id == loaded.eos_token_id and loaded("a")["input_ids"][0] == loaded.bos_token_id

    run = dict(progress=False, device="cpu")
    sft(SFTConfig(model=str(base), data=str(world_dir / "demos.jsonl"), out=str(tmp_path / "sft"), epochs=1,
                  batch_size=32, lr=1e-3, **run))
    assert finite_metric(tmp_path / "sft" / "metrics.jsonl", "train/loss")
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")

    train_reward_model(RewardConfig(model=str(tmp_path / "sft"), data=str(rankings), out=str(tmp_path / "rm"),
                                    demos=str(world_dir / "demos.jsonl"), batch_size=8, **run))
    assert finite_metric(tmp_path / "rm" / "metrics.jsonl", "train/loss")
    rm = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    assert math.isfinite(rm.norm_gain) and math.isfinite(rm.norm_bias)

    train_ppo(PPOConfig(policy=str(tmp_path / "sft"), reward=str(tmp_path / "rm"), out=str(tmp_path / "ppo"),
                        prompts=str(world_dir / "prompts_train.jsonl"), episodes=16, batch_size=8, minibatch_size=4,
                        ppo_epochs=2, max_new_tokens=8, **run))
    recs = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and abs(recs[0]["objective/kl"]) < 1e-4
    assert recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    for key in ("policy/loss", "value/loss", "objective/score"):
        assert all(math.isfinite(r[key]) for r in recs), key
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    ScalarHeadModel.from_pretrained(tmp_path / "ppo" / "value_model")


def test_ppo_in_bfloat16_on_cpu(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    """bf16 weights in all four models (heads float32), log-probs and losses in float32: finite losses and a first
    ratio of 1 within bf16 resolution (the minibatch pass pads differently from the rollout pass)."""
    from instructrl.rl import load_rl_models

    cfg = PPOConfig(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                    out=str(tmp_path / "ppo"), episodes=32, batch_size=16, minibatch_size=8, max_new_tokens=12,
                    dtype="bfloat16", progress=False, device="cpu")
    policy, ref, rewards, value_model = load_rl_models(cfg, torch.device("cpu"), torch.bfloat16, True,
                                                       load_tokenizer(tiny_sft_dir))
    reward_model = rewards.sources[0].model
    for m in (policy, ref, reward_model.backbone, value_model.backbone):
        assert next(m.parameters()).dtype == torch.bfloat16
    assert reward_model.head.weight.dtype == value_model.head.weight.dtype == torch.float32

    train_ppo(cfg)
    recs = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for key in ("policy/loss", "value/loss", "policy/entropy", "objective/score", "objective/kl"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=2e-2)
    assert recs[0]["policy/first_approx_kl"] < 1e-3
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ppo").dtype == torch.bfloat16


def test_position_ids_only_for_models_whose_forward_names_them():
    """Models that compute positions themselves (e.g. ALiBi ones, whose forward rejects unknown keywords) get none;
    `**kwargs` alone does not count as taking them."""
    from types import SimpleNamespace

    from instructrl.models import position_kwargs, token_logprobs

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
            assert "position_ids" not in kwargs
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5))

    ids, mask = torch.tensor([[0, 3, 4]]), torch.tensor([[0, 1, 1]])
    assert token_logprobs(NoPositions(), ids, mask).shape == (1, 2)
    with_positions = AutoModelForCausalLM.from_config(gpt2(["a b c"] * 20)[1])
    assert position_kwargs(with_positions, mask)["position_ids"].tolist() == [[0, 0, 1]]
