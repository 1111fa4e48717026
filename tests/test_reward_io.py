"""Reward models in and out (issue 17): our reward directories load in transformers with the same scores, Hugging
Face sequence classifiers (TRL, OpenRLHF, NeMo-RL) load here with their own trained head, and anything else is
refused with a message naming what was found, never given a silent random head."""
import json
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForSequenceClassification, BertConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, Qwen2Config)

from instructrl import cli
from instructrl.models import HEAD_FILE, ScalarHeadModel, fuse_activations, write_model_card

VOCAB, EOS, PAD = 64, 2, 1
TOL = 1e-5
TINY = dict(vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)
ARCHS = {
    "gpt2": lambda **kw: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **{**TINY, **kw}),
    "llama": lambda **kw: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64, **{**TINY, **kw}),
    "qwen2": lambda **kw: Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64, **{**TINY, **kw}),
}


def texts(n=5, seed=0) -> list[list[int]]:
    """Token ids of different lengths, each ending with EOS, no PAD or EOS inside."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() + [EOS]
            for k in torch.randint(3, 12, (n,), generator=g)]


def padded(seqs, side: str, pad_id=PAD):
    """ids, mask and the index of each row's last real token (its EOS)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    last = torch.tensor([len(s) - 1 for s in seqs]) if side == "right" else torch.full((len(seqs),), width - 1)
    return ids, mask, last


@torch.no_grad()
def hf_logits(model, seqs) -> torch.Tensor:
    """The classifier's reward of each text alone: no padding, so no position or pad-id convention is involved."""
    return torch.cat([model(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])


@torch.no_grad()
def ours(rm, seqs, side) -> torch.Tensor:
    return rm.score(*padded(seqs, side))


def our_rm(arch: str, head_bias=0.3, gain=1.7, bias=-0.4) -> ScalarHeadModel:
    """Our reward model on a random backbone (its activations fused, as our loaders do), with a non-trivial head and
    normalisation."""
    torch.manual_seed(0)
    rm = ScalarHeadModel(fuse_activations(AutoModel.from_config(ARCHS[arch]())), gain=gain, bias=bias).eval()
    nn.init.normal_(rm.head.weight)
    nn.init.constant_(rm.head.bias, head_bias)
    return rm


def hf_classifier(arch: str, path, **config) -> nn.Module:
    """A Hugging Face sequence classifier (one label unless told) with a trained-looking (random, std 1) `score`,
    saved to PATH."""
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(ARCHS[arch](**{"num_labels": 1, **config})).eval()
    nn.init.normal_(model.score.weight)
    model.save_pretrained(path)
    return model


def load_hf(path) -> nn.Module:
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # every weight read from the directory, none initialised
    return model.eval()


# --- our directory → transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch, offset", [("gpt2", True), ("gpt2", False), ("llama", False), ("qwen2", False)])
def test_our_reward_dir_loads_in_transformers_with_the_same_scores(arch, offset, tmp_path):
    rm = our_rm(arch, *((0.3, 1.7, -0.4) if offset else (0.0, 1.7, 0.0)))
    seqs = texts()
    want = ours(rm, seqs, "right")
    rm.save_pretrained(tmp_path / "rm")
    hf = load_hf(tmp_path / "rm")
    assert (hf_logits(hf, seqs) - want).abs().max() < TOL
    ids, mask, _ = padded(seqs, "right")  # transformers' own rule: the last token that is not pad_token_id
    assert (hf(input_ids=ids, attention_mask=mask).logits[:, 0] - want).abs().max() < TOL
    again = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    assert torch.equal(ours(again, seqs, "right"), want)  # our own loader: exactly as before saving
    assert torch.equal(again(*padded(seqs, "left")[:2]), rm(*padded(seqs, "left")[:2]))  # the value model too


def test_gpt2_offset_goes_through_ln_f_and_our_loader_keeps_the_original(tmp_path):
    rm = our_rm("gpt2")
    rm.save_pretrained(tmp_path / "rm")
    hf = load_hf(tmp_path / "rm")
    assert not torch.equal(hf.transformer.ln_f.bias, rm.backbone.ln_f.bias)
    again = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    for (name, a), b in zip(rm.backbone.state_dict().items(), again.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(load_file(tmp_path / "rm" / HEAD_FILE)) == {"weight", "bias", "backbone.ln_f.bias"}
    card = (tmp_path / "rm" / "README.md").read_text()
    assert "ln_f.bias" in card and "reward = 1.7 · head + -0.4" in card


def test_export_from_a_full_state_dict_equals_the_live_one(tmp_path):
    """The FSDP path (a gathered state dict, the model itself not runnable alone) writes the same directory."""
    rm = our_rm("gpt2")
    rm.save_pretrained(tmp_path / "live")
    rm.save_pretrained(tmp_path / "full", {k: v.clone() for k, v in rm.state_dict().items()})
    for name in ("model.safetensors", HEAD_FILE):
        a, b = load_file(tmp_path / "live" / name), load_file(tmp_path / "full" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_export_from_a_full_state_dict_equals_the_merged_live_one(tmp_path):
    """FSDP + LoRA: the gathered state dict (adapters unmerged) is merged from its tensors; the reward model and a
    policy directory (save_causal_lm: tied lm_head written once) equal what merging the live model writes."""
    import copy

    from instructrl.models import apply_lora, save_causal_lm
    from instructrl.options import LoraOptions

    def adapted(model, causal_lm):
        model = apply_lora(model, LoraOptions(r=4), causal_lm=causal_lm)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p)  # B starts at 0: a trained-looking adapter
        return model

    rm = our_rm("gpt2")
    rm.backbone = adapted(rm.backbone, False)
    full = {k: v.clone() for k, v in rm.state_dict().items()}
    copy.deepcopy(rm).save_pretrained(tmp_path / "full", full)
    rm.save_pretrained(tmp_path / "live")
    torch.manual_seed(0)
    lm = adapted(GPT2LMHeadModel(ARCHS["gpt2"]()), True)
    save_causal_lm(copy.deepcopy(lm), tmp_path / "lm-full", {k: v.clone() for k, v in lm.state_dict().items()})
    save_causal_lm(lm, tmp_path / "lm-live")
    for name in ("full/model.safetensors", f"full/{HEAD_FILE}", "full/lora_adapter/adapter_model.safetensors",
                 "lm-full/model.safetensors", "lm-full/lora_adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / name.replace("full", "live")), load_file(tmp_path / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rmsnorm_offset_cannot_be_folded_and_says_so(arch, tmp_path):
    """RMSNorm's output is scale-invariant, so no linear head on it gives a constant: transformers reads
    reward − c. The export still folds the gain; the warning and the model card name c."""
    rm = our_rm(arch)
    seqs = texts()
    want = ours(rm, seqs, "right")
    c = 1.7 * 0.3 - 0.4
    with pytest.warns(UserWarning, match="reads reward − 0.11"):
        rm.save_pretrained(tmp_path / "rm")
    assert (hf_logits(load_hf(tmp_path / "rm"), seqs) - (want - c)).abs().max() < TOL
    assert "reads reward − 0.11" in (tmp_path / "rm" / "README.md").read_text()
    assert torch.equal(ours(ScalarHeadModel.from_pretrained(tmp_path / "rm"), seqs, "right"), want)


# --- transformers' sequence classifier → ours ---------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_hf_sequence_classifier_loads_with_its_own_head(arch, side, tmp_path):
    hf = hf_classifier(arch, tmp_path / "trl")
    seqs = texts()
    want = hf_logits(hf, seqs)
    rm = ScalarHeadModel.from_pretrained(tmp_path / "trl")
    assert torch.equal(rm.head.weight, hf.score.weight) and rm.head.bias is None
    assert (ours(rm, seqs, side) - want).abs().max() < TOL
    if side == "right":  # transformers on the same padded batch, by its pad_token_id rule
        ids, mask, _ = padded(seqs, side)
        assert (hf(input_ids=ids, attention_mask=mask).logits[:, 0] - want).abs().max() < TOL
    with torch.no_grad():  # the value model initialised from it: the head on every position
        h = hf.base_model(input_ids=torch.tensor([seqs[0]])).last_hidden_state
        assert (rm(torch.tensor([seqs[0]]), torch.ones(1, len(seqs[0]), dtype=torch.long))
                - hf.score(h)[..., 0]).abs().max() < TOL


def test_hf_classifier_with_pad_equal_to_eos_is_read_where_transformers_reads(tmp_path):
    """TRL-style models often pad with EOS: transformers then reads the token before a final EOS, and so do we."""
    hf = hf_classifier("gpt2", tmp_path / "trl", pad_token_id=EOS)
    seqs = texts()
    ids, mask, last = padded(seqs, "right", pad_id=EOS)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        rm = ScalarHeadModel.from_pretrained(tmp_path / "trl")
        assert (rm.score(ids, mask, last) - want).abs().max() < TOL
        assert (rm(ids, mask).gather(1, last[:, None])[:, 0] - want).abs().max() > 1e-3  # the EOS itself differs
    rm.save_pretrained(tmp_path / "ours")  # saved again by us (a value model): still read the same way
    assert (ScalarHeadModel.from_pretrained(tmp_path / "ours").score(ids, mask, last) - want).abs().max() < TOL


# --- refused --------------------------------------------------------------------------------------------------
def causal_lm(path):
    GPT2LMHeadModel(ARCHS["gpt2"]()).save_pretrained(path)


def multi_label(path):
    hf_classifier("llama", path, num_labels=3)


def config_only(path):
    ARCHS["gpt2"](num_labels=1, architectures=["GPT2ForSequenceClassification"]).save_pretrained(path)


def pickles_only(path):
    config_only(path)
    torch.save({}, path / "pytorch_model.bin")


def head_missing(path):
    """A classifier's config over a plain backbone's weights: transformers alone would make up the head."""
    AutoModel.from_config(ARCHS["qwen2"]()).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2ForSequenceClassification"],
                                                  "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}))


def encoder(path):
    """BERT's one-label classifier reads a pooled first token, not the last: its logits are not ours to read."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=PAD, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)


REFUSED = {  # kind: (make the directory (None: nothing there), words the message must contain)
    "causal_lm": (causal_lm, ["found GPT2LMHeadModel", "no trained reward head", "expected a reward model",
                              "instructrl rm --model"]),
    "multi_label": (multi_label, ["found LlamaForSequenceClassification with num_labels=3", "expected num_labels=1"]),
    "config_only": (config_only, ["found no weights", "expected model.safetensors"]),
    "pickles_only": (pickles_only, ["found only pickled weights (pytorch_model.bin)", "expected model.safetensors"]),
    "head_missing": (head_missing, ["found Qwen2ForSequenceClassification whose weights lack", "score.weight",
                                    "expected trained weights"]),
    "encoder": (encoder, ["found BertForSequenceClassification whose logits are not its head on the last token",
                          "expected a decoder's classifier"]),
    "missing_path": (None, ["no such directory", "expected a local model directory", "nothing is downloaded"]),
}


def refused_dir(kind, tmp_path):
    make, _ = REFUSED[kind]
    if make is None:
        return tmp_path / "openai-community" / "gpt2"  # also a Hub id: must not be fetched
    (tmp_path / kind).mkdir()
    make(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_anything_else_is_refused_naming_what_was_found(kind, tmp_path):
    path = refused_dir(kind, tmp_path)
    with pytest.raises(ValueError) as e:
        ScalarHeadModel.from_pretrained(path)
    for words in REFUSED[kind][1]:
        assert words in str(e.value), str(e.value)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_from_backbone_puts_a_fresh_head_on_a_causal_lm(tmp_path):
    """Reward-model training starts from the SFT causal LM: a new head, asked for by name."""
    causal_lm(tmp_path / "lm")
    rm = ScalarHeadModel.from_backbone(tmp_path / "lm")
    assert rm.head.weight.shape == (1, 32) and not rm.head.bias.any()


@pytest.mark.parametrize("kind", ["causal_lm", "missing_path"])
def test_cli_eval_with_a_bad_reward_exits_2_with_one_line(kind, tmp_path, monkeypatch, capsys, tiny_sft_dir,
                                                         world_dir):
    path = refused_dir(kind, tmp_path)
    args = ["eval", "--model", tiny_sft_dir, "--prompts", world_dir / "prompts_eval.jsonl", "--reward", path,
            "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and REFUSED[kind][1][0] in err, err


# --- model card -------------------------------------------------------------------------------------------------
def test_model_card_has_one_section_per_step(tmp_path):
    our_rm("gpt2").save_pretrained(tmp_path)
    write_model_card(tmp_path, "rm", {"held-out pairwise accuracy": 0.5})
    write_model_card(tmp_path, "rm", {"held-out pairwise accuracy": 0.75})
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert card.count("## reward / value model") == 1 and card.count("## rm") == 1
    assert "accuracy**: 0.75" in card and "0.5" not in card.split("## rm")[1]


def test_export_warns_where_transformers_would_read_before_the_eos(tmp_path):
    """PAD == EOS: transformers takes the final EOS for padding and reads the token before it; we read the EOS."""
    rm = our_rm("gpt2", 0.0, 1.0, 0.0)
    rm.backbone.config.pad_token_id = EOS
    with pytest.warns(UserWarning, match="pad_token_id 2 is an EOS id"):
        rm.save_pretrained(tmp_path)
