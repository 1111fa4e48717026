"""--autocast: forward passes in bfloat16 autocast with float32 weights (the pipeline's default where the hardware
multiplies bf16 natively). bf16 runs on any CPU (emulated where it is not native), so these tests run everywhere."""
import json

import pytest
import torch

from instructrl import utils
from instructrl.models import ScalarHeadModel, _float32_sdpa, bf16_autocast, load_causal_lm

CPU = torch.device("cpu")


def test_resolve_autocast(monkeypatch):
    assert utils.resolve_autocast("off", CPU) == "off"
    assert utils.resolve_autocast("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        utils.resolve_autocast("bf16", CPU, "bfloat16")
    with pytest.raises(ValueError, match="choose one of off, bf16, auto"):
        utils.resolve_autocast("fp8", CPU)
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)
    assert utils.resolve_autocast("auto", CPU) == "bf16"
    assert utils.resolve_autocast("auto", CPU, "bfloat16") == "off"  # bf16 weights: nothing left to autocast
    monkeypatch.setattr(utils, "native_bf16", lambda device: False)
    assert utils.resolve_autocast("auto", CPU) == "off"


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX512", {"avx512f", "avx512_bf16"}, True),
    ("AVX512", {"avx512f", "amx_bf16"}, True),
    ("AVX512", {"avx512f"}, False),            # AVX-512 without BF16: bf16 products are emulated
    ("AVX2", {"avx512f", "avx512_bf16"}, False),  # the avx2 float path stands for a CPU without AVX-512
    ("DEFAULT", {"avx512f", "avx512_bf16"}, False),
])
def test_native_bf16_reads_the_dispatch_level_and_the_cpu_flags(monkeypatch, capability, flags, native):
    import instructrl.machine as machine

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    assert utils.native_bf16(CPU) is native


def test_bf16_autocast_runs_sdpa_in_float32_and_restores_it():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    with bf16_autocast(CPU):
        assert torch.is_autocast_enabled("cpu")
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is _float32_sdpa
        assert torch.nn.functional.linear(q, k[0, 0]).dtype == torch.bfloat16  # autocast is on
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before and not torch.is_autocast_enabled("cpu")
    ref, _ = sdpa_attention_forward(module, q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), None)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_scalar_head_stays_float32_under_autocast(tiny_rm_dir):
    rm = ScalarHeadModel.from_pretrained(tiny_rm_dir)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), bf16_autocast(CPU):
        raw = rm(ids, mask)
        h = rm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.nn.functional.linear(h.float(), rm.head.weight, rm.head.bias).squeeze(-1)
    assert raw.dtype == torch.float32 and torch.equal(raw, expected)  # not rounded to bf16's 8 bits


def test_pretrain_learns_the_same_under_autocast(world_dir, tmp_path):
    from instructrl.pretrain import PretrainConfig, pretrain

    common = dict(corpus=str(world_dir / "corpus.jsonl"), vocab_size=600, n_layer=2, n_embd=64, n_head=2, steps=40,
                  batch_size=16, eval_every=40, progress=False, device="cpu")
    fp32 = pretrain(PretrainConfig(out=str(tmp_path / "fp32"), **common))
    bf16 = pretrain(PretrainConfig(out=str(tmp_path / "bf16"), autocast="bf16", **common))
    assert (fp32["autocast"], bf16["autocast"]) == ("off", "bf16")
    # the learning curve stays the same: the held-out loss within 1% of float32's, and far below the start
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.01)
    first = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert bf16["val_loss"] < 0.7 * first["train/loss"]
    model = load_causal_lm(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # float32 weights saved


def test_ppo_under_autocast_starts_at_ratio_one(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    """The rollout's log π_old is recomputed by a full forward pass under the same autocast as the update (the
    sampler's KV-cache pass rounds otherwise), so the first minibatch's ratio is 1."""
    from instructrl.ppo import PPOConfig, train_ppo

    s = train_ppo(PPOConfig(policy=str(tiny_sft_dir), reward=str(tiny_rm_dir), out=str(tmp_path / "ppo"),
                            prompts=str(world_dir / "prompts_train.jsonl"), episodes=32, batch_size=16,
                            minibatch_size=8, max_new_tokens=16, ptx_coef=0.5, ptx_data=str(world_dir / "corpus.jsonl"),
                            progress=False, device="cpu", autocast="bf16"))
    rec = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert s["autocast"] == "bf16"
    assert rec["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rec["policy/first_approx_kl"] < 1e-10
    assert {p.dtype for p in load_causal_lm(tmp_path / "ppo").parameters()} == {torch.float32}


def test_pipeline_resolves_autocast_into_its_stages(monkeypatch, tmp_path):
    from instructrl.config import PipelineConfig
    from instructrl.pipeline import plan, stage_fingerprint

    for native, expected in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(utils, "native_bf16", lambda device, native=native: native)
        p = plan(PipelineConfig(device="cpu"), tmp_path)
        for name in ("pretrained", "sft", "reward", "ppo_ptx"):
            assert p[name].run.autocast == expected, name
        # a stage made with the other one is not reused; "off" is left out, so runs from before --autocast still are
        options = stage_fingerprint(p["sft"], contents=False)["options"]
        assert options.get("autocast") == (expected if native else None)
    p = plan(PipelineConfig(device="cpu", autocast="off"), tmp_path)
    assert p["ppo_ptx"].run.autocast == "off"
