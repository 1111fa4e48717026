"""Models in and out: tokenizers, causal LMs, the scalar-head (reward/value) model, and log-prob helpers.

Every model that enters or leaves a step is a directory that `from_pretrained` reads. Our tiny default model is
just one such directory, built here from a `transformers` config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

transformers.logging.set_verbosity_error()

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


# --- tokenizer ------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer with distinct PAD and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer from a directory. A tokenizer without PAD gets EOS as pad id: every mask here is explicit,
    so pads are never found by comparing ids, and PAD == EOS cannot hide a real EOS."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token; responses need one to end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# --- causal LMs -----------------------------------------------------------------------------------------
def tiny_gpt_config(vocab_size: int, eos_id: int, pad_id: int, n_layer: int = 4, n_embd: int = 192,
                    n_head: int = 4, n_positions: int = 128) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
                      pad_token_id=pad_id, tie_word_embeddings=True)


def build_tiny_model(cfg: GPT2Config, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in every stage: log-probs must be reproducible and the first PPO ratio exactly 1 [N+ D7]."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for k, v in list(vars(cfg).items()):
            if isinstance(v, float) and ("dropout" in k or "pdrop" in k):
                setattr(cfg, k, 0.0)
    return model


def load_causal_lm(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> nn.Module:
    """Any local Hugging Face causal LM directory, dropout off."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    return disable_dropout(model).to(device)


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return 2048


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, for absolute-position models [pitfall 2]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log π(x_t | x_<t) for t = 1..L-1, in float32 whatever the weights' dtype [pitfall 5].

    Logits are divided by the sampling temperature in every log-prob computation [LHP].
    Returns logprobs [B, L-1] (and the entropy [B, L-1] if asked).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    lp = torch.gather(logits, -1, input_ids[:, 1:, None]).squeeze(-1) - logz
    if not with_entropy:
        return lp
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return lp, entropy


# --- scalar-head model: reward model and value model ----------------------------------------------------
HEAD_FILE, HEAD_CONFIG = "scalar_head.safetensors", "scalar_head.json"


class ScalarHeadModel(nn.Module):
    """A transformer backbone with its unembedding replaced by a scalar head [N+ D11, D12].

    forward() gives a value per token (the value model); score() reads the reward at a given token (EOS),
    then applies the stored normalisation: reward = gain · head + bias.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, bias: float = 0.0, gain: float = 1.0):
        super().__init__()
        self.backbone = backbone
        d = backbone.config.get_text_config().hidden_size
        if head is None:
            head = nn.Linear(d, 1)
            nn.init.normal_(head.weight, std=1.0 / (d + 1) ** 0.5)  # [N+ D11]
            nn.init.zeros_(head.bias)
        self.head = head.to(next(backbone.parameters()).device)
        self.norm_bias, self.norm_gain = float(bias), float(gain)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw head output for every position, float32 [B, L]."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """Normalised reward read at `last_index` (the EOS / last real token) of each row [B]."""
        raw = self(input_ids, attention_mask)
        picked = raw.gather(1, last_index[:, None]).squeeze(1)
        return self.norm_gain * picked + self.norm_bias

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.backbone.save_pretrained(str(path), safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(path / HEAD_FILE))
        (path / HEAD_CONFIG).write_text(json.dumps({"bias": self.norm_bias, "gain": self.norm_gain}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32) -> "ScalarHeadModel":
        """From a saved scalar-head directory, or from any causal-LM directory with a fresh head."""
        path = Path(path)
        backbone = disable_dropout(AutoModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True)).to(device)
        if not (path / HEAD_FILE).is_file():
            return cls(backbone)
        state = load_file(str(path / HEAD_FILE))
        head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        cfg = json.loads((path / HEAD_CONFIG).read_text()) if (path / HEAD_CONFIG).is_file() else {}
        bias, gain = cfg.get("bias", 0.0), cfg.get("gain", 1.0)
        if not all(isinstance(x, (int, float)) for x in (bias, gain)):
            raise ValueError(f"{path / HEAD_CONFIG}: 'bias' and 'gain' must be numbers")
        return cls(backbone, head, bias, gain)


def is_scalar_head_dir(path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def nll_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the masked tokens."""
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def config_of(path) -> dict:
    return AutoConfig.from_pretrained(str(path)).to_dict()


__all__ = ["train_tokenizer", "load_tokenizer", "tiny_gpt_config", "build_tiny_model", "load_causal_lm",
           "token_logprobs", "ScalarHeadModel", "disable_dropout", "position_ids_from_mask", "freeze", "F"]
