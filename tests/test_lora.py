"""LoRA (peft): the reference is the policy with its adapters off, only adapters train, outputs are merged HF
directories, checkpoints hold only what trains and resume exactly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from instructrl.models import ScalarHeadModel, load_causal_lm, load_tokenizer
from instructrl.ppo import PPOConfig, train_ppo
from instructrl.rl import load_rl_models
from instructrl.sampling import response_logprobs
from instructrl.sampling import encode_prompts, sample

LORA = dict(lora_r=4, lora_alpha=8.0)


@pytest.fixture
def ppo_kw(tiny_sft_dir, tiny_rm_dir, world_dir):
    return dict(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                episodes=32, batch_size=16, minibatch_size=8, max_new_tokens=12, progress=False, device="cpu", **LORA)


def lora_models(ppo_kw, tmp_path):
    cfg = PPOConfig(out=str(tmp_path / "x"), **ppo_kw)
    return load_rl_models(cfg, torch.device("cpu"), torch.float32, True, load_tokenizer(cfg.policy))


def test_reference_is_the_base_model_with_adapters_off(ppo_kw, tiny_sft_dir, world_dir, tmp_path):
    from instructrl.data import read_prompts

    policy, ref, _, _ = lora_models(ppo_kw, tmp_path)
    with torch.no_grad():  # make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    tok = load_tokenizer(tiny_sft_dir)
    ids = encode_prompts(tok, read_prompts(world_dir / "prompts_train.jsonl")[:8], 100)
    batch = sample(policy, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=10,
                   generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref_lp = response_logprobs(ref, batch, 0.7)
        base_lp = response_logprobs(load_causal_lm(tiny_sft_dir), batch, 0.7)
        policy_lp = response_logprobs(policy, batch, 0.7)
    assert torch.equal(ref_lp, base_lp)
    assert not torch.allclose(policy_lp, base_lp)  # the adapters are back on outside the reference's calls


def test_only_lora_parameters_get_gradients(ppo_kw, tmp_path):
    policy, _, _, value = lora_models(ppo_kw, tmp_path)
    ids = torch.randint(0, policy.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    (policy(input_ids=ids, attention_mask=mask).logits.sum() + value(ids, mask).sum()).backward()
    for model in (policy, value):
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert with_grad == trainable and with_grad
        assert all("lora_" in n or n.startswith("head.") for n in with_grad), with_grad


def test_ppo_with_lora_trains_and_saves_merged(ppo_kw, tiny_sft_dir, world_dir, tmp_path):
    train_ppo(PPOConfig(out=str(tmp_path / "ppo"), ptx_coef=0.5, ptx_data=str(world_dir / "corpus.jsonl"), **ppo_kw))
    recs = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert abs(recs[0]["objective/kl"]) < 1e-4 and recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert recs[1]["objective/kl"] != 0.0  # the adapters moved the policy away from the reference
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")  # merged: a plain HF directory
    assert (tmp_path / "ppo" / "lora_adapter" / "adapter_config.json").is_file()
    before, after = load_file(tiny_sft_dir / "model.safetensors"), load_file(tmp_path / "ppo" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn.c_attn." in k for k in changed)  # peft's default target for GPT-2
    assert type(out).__name__ == "GPT2LMHeadModel"
    ScalarHeadModel.from_pretrained(tmp_path / "ppo" / "value_model")


def test_lora_checkpoint_holds_adapters_and_resumes_exactly(ppo_kw, tmp_path):
    kw = {**ppo_kw, "episodes": 48}
    train_ppo(PPOConfig(out=str(tmp_path / "a"), save_every=1, **kw))
    saved = load_file(tmp_path / "a-checkpoints" / "step-00000001" / "model.policy.safetensors")
    assert saved and all("lora_" in k for k in saved)
    value = load_file(tmp_path / "a-checkpoints" / "step-00000001" / "model.value.safetensors")
    assert all("lora_" in k or k.startswith("head.") for k in value)
    shutil.copytree(tmp_path / "a-checkpoints", tmp_path / "b-checkpoints")
    shutil.rmtree(tmp_path / "b-checkpoints" / "step-00000002")  # resume from iteration 1
    train_ppo(PPOConfig(out=str(tmp_path / "b"), resume=True, **kw))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_and_reward_model_with_lora(tiny_lm_dir, tiny_rm_dir, world_dir, tmp_path):
    from instructrl.reward import RewardConfig, train_reward_model
    from instructrl.sft import SFTConfig, sft

    sft(SFTConfig(model=str(tiny_lm_dir), data=str(world_dir / "demos.jsonl"), out=str(tmp_path / "sft"), epochs=1,
                  lr=1e-3, progress=False, device="cpu", **LORA))
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    rankings = tiny_rm_dir.parent / "rankings.jsonl"
    train_reward_model(RewardConfig(model=str(tmp_path / "sft"), data=str(rankings), out=str(tmp_path / "rm"),
                                    progress=False, device="cpu", **LORA))
    rm = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    assert not hasattr(rm.backbone, "peft_config")  # a plain backbone: the adapters were merged
    head = load_file(tmp_path / "rm" / "scalar_head.safetensors")
    assert {k for k in head if not k.startswith("backbone.")} == {"weight", "bias"}  # + exact ln_f.bias
