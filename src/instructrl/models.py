"""Models in and out: tokenizers, causal LMs, the scalar-head (reward/value) model, and log-prob helpers.

Every model that enters or leaves a step is a directory that `from_pretrained` reads. Our tiny default model is
just one such directory, built here from a `transformers` config.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast)

from . import hub
from .cards import write_model_card
from .losses import entropy_from_logits

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
    p = Path(hub.local(path))
    if not p.is_dir():  # checked before transformers sees the path: never a Hub download
        raise ValueError(f"{path}: {'not a directory' if p.exists() else 'no such directory'}; expected a local "
                         "model directory (nothing is downloaded)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no tokenizer could be read ({str(e).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token; responses need one to end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer starts every text with it (Llama-style), else []: text encoded without special
    tokens can then start the way the model saw documents start."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


# --- causal LMs -----------------------------------------------------------------------------------------
def tiny_gpt_config(vocab_size: int, eos_id: int, pad_id: int, n_layer: int = 4, n_embd: int = 192,
                    n_head: int = 4, n_positions: int = 128) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
                      pad_token_id=pad_id, tie_word_embeddings=True,
                      activation_function="gelu_pytorch_tanh")  # GPT-2's GELU as one fused kernel


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


def fuse_activations(model: nn.Module) -> nn.Module:
    """Swap transformers' "gelu_new" (GPT-2's GELU written as 7 elementwise Python ops, each with its own autograd
    node) for torch's fused kernel of the same tanh formula: ~6% of a PPO iteration on CPU (benchmarks/ppo_bench.py).
    In float32 the outputs agree to rounding (~1e-7); in bf16 to about one bf16 ulp."""
    from transformers.activations import NewGELUActivation

    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def load_causal_lm(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> nn.Module:
    """Any local Hugging Face causal LM directory, dropout off."""
    path = model_dir(path)
    check_causal_lm(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True, local_files_only=True)
    return fuse_activations(disable_dropout(model)).to(device)


def check_causal_lm(path: Path) -> None:
    """Refuse a reward or classifier directory where a policy (language model) is expected: AutoModelForCausalLM
    would load its backbone under a fresh or tied LM head and train or sample from that without a word."""
    if (path / HEAD_FILE).is_file():
        raise ValueError(f"{path}: a reward model (it has {HEAD_FILE}), not a language model; expected a causal-LM "
                         "directory such as the SFT output")
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"{path / 'config.json'}: not a readable JSON model config") from None
    if any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs):
        raise ValueError(f"{path}: a {', '.join(archs)} (a classifier, not a language model); expected a causal-LM "
                         "directory such as the SFT output")


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return 2048


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, for absolute-position models [pitfall 2]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def base_model(model) -> nn.Module:
    """The Hugging Face model under any wrappers: DDP (`.module`), a LoRA adapter or the adapter-disabled view
    (`get_base_model()`). Its class says which forward arguments exist."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    """Whether cls.forward names the argument (`**kwargs` alone does not count)."""
    return name in inspect.signature(cls.forward).parameters


def position_kwargs(model, attention_mask: torch.Tensor) -> dict:
    """`position_ids` from the mask, for models whose forward names that argument. Others (e.g. ALiBi models,
    whose forward rejects unknown keywords) compute positions themselves; `**kwargs` alone does not count."""
    if _forward_accepts(type(base_model(model)), "position_ids"):
        return {"position_ids": position_ids_from_mask(attention_mask)}
    return {}


def cache_argument(model) -> str:
    """The name of forward's KV-cache argument (and output field): recent transformers (5.24 here) call it `cache`
    and drop the old `past_key_values` in 5.40; older versions and models not yet renamed know only the old name."""
    return "cache" if _forward_accepts(type(base_model(model)), "cache") else "past_key_values"


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False, last: int | None = None,
                   entropy_grad: bool = False):
    """log π(x_t | x_<t) for t = 1..L-1 (or only the `last` t), in float32 whatever the weights' dtype [pitfall 5].

    Logits are divided by the sampling temperature in every log-prob computation [LHP].
    `last`: only the final `last` tokens are scored; the model then skips its final token (whose logits predict
    nothing) and, where it can, runs the unembedding on those positions only (`logits_to_keep`).
    Returns logprobs [B, L-1 or last] (and the entropy if asked: without gradient unless `entropy_grad`).
    """
    kwargs = {}
    if last is not None:
        input_ids, attention_mask, targets = input_ids[:, :-1], attention_mask[:, :-1], input_ids[:, -last:]
        if _forward_accepts(type(base_model(model)), "logits_to_keep"):
            kwargs["logits_to_keep"] = last
    else:
        targets = input_ids[:, 1:]
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                **position_kwargs(model, attention_mask), **kwargs)
    logits = out.logits[:, -last:] if last is not None else out.logits[:, :-1]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    lp = torch.gather(logits, -1, targets[..., None]).squeeze(-1) - logz
    if not with_entropy:
        return lp
    if entropy_grad:  # the entropy bonus [PPO Eq. 9] differentiates it
        return lp, entropy_from_logits(logits, logz)
    with torch.no_grad():  # otherwise logged only
        return lp, entropy_from_logits(logits.detach(), logz.detach())


# --- scalar-head model: reward model and value model ----------------------------------------------------
HEAD_FILE, HEAD_CONFIG = "scalar_head.safetensors", "scalar_head.json"
KEPT = "backbone."  # HEAD_FILE keys under this prefix: exact backbone tensors that the directory's HF export shifts
REWARD_DIR = (f"a reward model: an instructrl reward directory ({HEAD_FILE} beside the backbone) or a Hugging Face "
              "sequence classifier with num_labels=1 (as TRL, OpenRLHF and NeMo-RL save)")


class ScalarHeadModel(nn.Module):
    """A transformer backbone with its unembedding replaced by a scalar head [N+ D11, D12].

    forward() gives a value per token (the value model); score() reads the reward at a given token (EOS),
    then applies the stored normalisation: reward = gain · head + bias.
    `skip_id` (Hugging Face sequence classifiers only): score() reads, as they do, the last token up to
    `last_index` whose id is not their pad_token_id; that differs from `last_index` only where the id ends a
    text (PAD == EOS).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, bias: float = 0.0, gain: float = 1.0,
                 skip_id: int | None = None):
        super().__init__()
        self.backbone = backbone
        d = head_width(backbone.config)
        if head is None:
            head = nn.Linear(d, 1)
            nn.init.normal_(head.weight, std=1.0 / (d + 1) ** 0.5)  # [N+ D11]
            nn.init.zeros_(head.bias)
        self.head = head.to(next(backbone.parameters()).device)
        self.norm_bias, self.norm_gain = float(bias), float(gain)
        self.skip_id = skip_id

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw head output for every position, float32 [B, L]."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          **position_kwargs(self.backbone, attention_mask)).last_hidden_state
        with torch.autocast(h.device.type, enabled=False):  # the scalar in the head's own dtype, not autocast's bf16
            return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """Normalised reward read at `last_index` (the EOS / last real token) of each row [B]."""
        raw = self(input_ids, attention_mask)
        if self.skip_id is not None:
            last_index = last_token_other_than(input_ids, attention_mask, last_index, self.skip_id)
        picked = raw.gather(1, last_index[:, None]).squeeze(1)
        return self.norm_gain * picked + self.norm_bias

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """A directory both loaders read: a Hugging Face `AutoModelForSequenceClassification` checkpoint
        (num_labels=1, the normalisation folded into its head: see `hf_export`), our exact head and normalisation
        (HEAD_FILE, HEAD_CONFIG), which `from_pretrained` prefers, and a model card. LoRA adapters are merged in
        place: call at the end of a run.

        `state_dict` (keys `backbone.*`, `head.*`) replaces the module's own, e.g. a full one gathered from FSDP.
        """
        path = Path(path)
        backbone = self.backbone
        if state_dict is None and is_lora(self.backbone):
            self.backbone = backbone = merge_lora(self.backbone, path)
        elif is_lora(self.backbone):  # a gathered state dict: merged from its tensors (the model stays as it is)
            save_lora_adapter(self.backbone, path, {k[len("backbone."):]: v for k, v in state_dict.items()
                                                    if k.startswith("backbone.")})
            state_dict, backbone = merged_lora_state(self, state_dict), base_model(self.backbone)
        sd = state_dict or self.state_dict()
        part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        head = {k: v.detach().cpu().contiguous() for k, v in part("head.").items()}
        live = self.backbone if state_dict is None else None  # FSDP shards cannot run alone
        export = hf_export(self.config, part("backbone."), head, self.norm_gain, self.norm_bias, live)
        if export.model is None:
            backbone.save_pretrained(str(path), safe_serialization=True,
                                     **({"state_dict": part("backbone.")} if state_dict else {}))
        else:
            export.model.save_pretrained(str(path), state_dict=export.state)
        kept = {KEPT + k: v.detach().cpu().contiguous() for k, v in export.kept.items()}
        save_file({**head, **kept}, str(path / HEAD_FILE))
        extra = {"skip_id": self.skip_id} if self.skip_id is not None else {}
        (path / HEAD_CONFIG).write_text(json.dumps({"bias": self.norm_bias, "gain": self.norm_gain, **extra},
                                                   indent=2))
        reads = hf_reading(self.config, self.skip_id)
        for warning in (export.warning, reads[1]):
            if warning:
                warnings.warn(f"{path}: {warning}")
        write_model_card(path, "reward / value model", {
            "backbone": self.config.model_type,
            "normalisation": f"reward = {self.norm_gain:.6g} · head + {self.norm_bias:.6g} [IG]",
            "instructrl": f"`ScalarHeadModel.from_pretrained(DIR)` reads the exact head from {HEAD_FILE}",
            "transformers": export.note, "reward token": reads[0]})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32) -> "ScalarHeadModel":
        """A reward (or value) model: our own directory, or a Hugging Face sequence classifier with one label and
        its own trained head. Anything else is a ValueError naming what was found: a reward model never gets a
        fresh random head (`from_backbone` makes one, on purpose)."""
        path = model_dir(path)
        if (path / HEAD_FILE).is_file():
            return cls._from_own_dir(path, device, dtype)
        return cls._from_sequence_classifier(path, device, dtype)

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32) -> "ScalarHeadModel":
        """The backbone of any local model directory (usually the SFT causal LM) with a fresh scalar head
        [N+ D11]: where reward-model training starts."""
        return cls(load_backbone(model_dir(path), device, dtype))

    @classmethod
    def _from_own_dir(cls, path: Path, device, dtype) -> "ScalarHeadModel":
        backbone = load_backbone(path, device, dtype)
        state = {k: v for k, v in load_file(str(path / HEAD_FILE)).items() if not k.startswith(KEPT)}
        head = nn.Linear(state["weight"].shape[1], 1, bias="bias" in state)
        head.load_state_dict(state)
        cfg = json.loads((path / HEAD_CONFIG).read_text()) if (path / HEAD_CONFIG).is_file() else {}
        bias, gain, skip_id = cfg.get("bias", 0.0), cfg.get("gain", 1.0), cfg.get("skip_id")
        if not all(isinstance(x, (int, float)) for x in (bias, gain)) or not isinstance(skip_id, (int, type(None))):
            raise ValueError(f"{path / HEAD_CONFIG}: 'bias' and 'gain' must be numbers, 'skip_id' an integer")
        return cls(backbone, head, bias, gain, skip_id)

    @classmethod
    def _from_sequence_classifier(cls, path: Path, device, dtype) -> "ScalarHeadModel":
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        archs = config.architectures or []
        found = ", ".join(archs) or f"a {config.model_type} config naming no architecture"
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"{path}: found {found} and no {HEAD_FILE}, so no trained reward head; expected "
                             f"{REWARD_DIR}. To train a reward head on this model: instructrl rm --model {path}")
        if config.num_labels != 1:
            raise ValueError(f"{path}: found {found} with num_labels={config.num_labels}; expected num_labels=1 "
                             "(one scalar reward)")
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, local_files_only=True, output_loading_info=True)
        absent = sorted(info["missing_keys"]) + sorted(k if isinstance(k, str) else k[0]
                                                       for k in info["mismatched_keys"])
        if absent:
            raise ValueError(f"{path}: found {found} whose weights lack or misshape {', '.join(absent[:4])}"
                             f"{' …' if len(absent) > 4 else ''}; expected trained weights for every parameter "
                             "(transformers would initialise them at random)")
        named = classifier_head(model)
        if named is None:
            raise ValueError(f"{path}: found {found} whose head is not one linear layer to one output; expected "
                             "a single linear head (num_labels=1)")
        if not reads_last_token(model, named[1]):
            raise ValueError(f"{path}: found {found} whose logits are not its head on the last token's hidden state "
                             "(a pooled or first-token head, as encoders have); expected a decoder's classifier")
        backbone = fuse_activations(disable_dropout(model.base_model)).to(device)
        return cls(backbone, named[1].float(), skip_id=config.get_text_config().pad_token_id)


def model_dir(path: str | os.PathLike) -> Path:
    """PATH as a local model directory with safetensors weights, else a ValueError saying what is there. Checked
    here, before transformers sees the path: a missing directory must never turn into a Hub download."""
    p = Path(hub.local(path))  # a Hub id: its snapshot in the Hugging Face cache
    if not p.is_dir():
        raise ValueError(f"{path}: {'not a directory' if p.exists() else 'no such directory'}; expected a local "
                         "model directory (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{path}: found no config.json; expected a Hugging Face model directory")
    if not any((p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
        found = f"only pickled weights ({', '.join(pickles)}), never loaded" if pickles else "no weights"
        raise ValueError(f"{path}: found {found}; expected model.safetensors (or model.safetensors.index.json)")
    return p


def load_backbone(path: Path, device, dtype) -> nn.Module:
    """The transformer under any head (AutoModel drops the head's weights), dropout off, with the exact tensors
    our own HEAD_FILE keeps for the ones the Hugging Face export shifted."""
    backbone = AutoModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True, local_files_only=True)
    backbone = fuse_activations(disable_dropout(backbone)).to(device)
    if (path / HEAD_FILE).is_file():
        kept = {k[len(KEPT):]: v for k, v in load_file(str(path / HEAD_FILE)).items() if k.startswith(KEPT)}
        if backbone.load_state_dict(kept, strict=False).unexpected_keys:
            raise ValueError(f"{path / HEAD_FILE}: found backbone tensors {sorted(kept)} the backbone does not have")
    return backbone


def head_width(config) -> int:
    """Width of the backbone's last hidden state: OPT-350m-style models project it to word_embed_proj_dim."""
    cfg = config.get_text_config()
    return int(getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size)


def last_token_other_than(input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor,
                          token_id: int) -> torch.Tensor:
    """Per row, the last real position up to `last_index` whose id is not `token_id` (else `last_index`): where a
    Hugging Face sequence classifier reads the unpadded text, finding padding by comparing ids with pad_token_id."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    keep = (input_ids != token_id) & attention_mask.bool() & (pos <= last_index[:, None])
    return torch.where(keep.any(1), (pos * keep).argmax(1), last_index)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, module) of a Hugging Face sequence classifier's head: its one child with weights beside the backbone,
    if that is a linear layer to one output (GPT-2, Llama, Qwen2, … call it `score`)."""
    heads = [(n, m) for n, m in model.named_children()
             if n != model.base_model_prefix and next(m.parameters(), None) is not None]
    if len(heads) == 1 and isinstance(heads[0][1], nn.Linear) and heads[0][1].out_features == 1:
        return heads[0]
    return None


@torch.no_grad()
def reads_last_token(model: nn.Module, head: nn.Linear) -> bool:
    """Whether a classifier's logits are `head` on the last position's hidden state, as decoder classifiers compute
    them and score() reads them (encoders pool a first token instead): checked on one short text."""
    pad = model.config.get_text_config().pad_token_id
    ids = torch.tensor([[i for i in range(4) if i != pad][:3]])
    logits = model(input_ids=ids).logits[:, 0]
    return torch.allclose(logits, head(model.base_model(input_ids=ids).last_hidden_state[:, -1])[:, 0],
                          rtol=1e-3, atol=1e-5)


@dataclass
class HFExport:
    model: nn.Module | None  # the classifier, on the meta device (its class and config); None: no such class
    state: dict              # its weights: the backbone under its prefix, the head with the normalisation folded in
    kept: dict               # exact backbone tensors that `state` shifts, for our own loader
    note: str                # how transformers reads the directory, for the model card
    warning: str = ""        # set where transformers' score differs from ours


def hf_export(config, backbone: dict, head: dict, gain: float, bias: float, live: nn.Module | None) -> HFExport:
    """Our reward = gain·(w·h + b) + bias as a Hugging Face classifier: score.weight = gain·w, and the offset
    c = gain·b + bias goes where the architecture has room for a constant:

    - the head's own bias, where its classifier head has one (decoder LMs' `score` heads have none);
    - else the bias β of the LayerNorm that gives the last hidden state h (GPT-2's ln_f; found by running the
      `live` backbone, or one rebuilt from `backbone`):
      β + c·w'/|w'|² moves w'·h by exactly c. That shifts a backbone tensor, so the original is kept for our loader;
    - else nowhere: RMSNorm (Llama, Qwen2, Mistral …) makes h scale-invariant, so no linear function of h is a
      nonzero constant (OPT-350m-style projections after the LayerNorm are not handled). transformers then reads
      reward − c, and the model card and a warning say so.
    """
    cfg = copy.deepcopy(config)
    cfg.num_labels = 1
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError:  # transformers has no sequence classifier for this model type
        model = None
    named = classifier_head(model) if model is not None else None
    if named is None:
        return HFExport(None, {}, {}, f"not loadable with AutoModelForSequenceClassification (no one-label linear "
                                      f"head for model_type {config.model_type})")
    name, module = named
    w = gain * head["weight"].float()
    c = gain * float(head["bias"]) + bias if "bias" in head else bias
    state = {f"{model.base_model_prefix}.{k}": v for k, v in backbone.items()} | {f"{name}.weight": w}
    same = f"`AutoModelForSequenceClassification.from_pretrained(DIR)` gives the same reward: {name}.weight = gain·w"
    if c == 0:
        return HFExport(model, state, {}, f"{same}, no offset")
    if module.bias is not None:
        return HFExport(model, state | {f"{name}.bias": torch.tensor([c])}, {}, f"{same}, offset in {name}.bias")
    norm = final_layer_norm(live if live is not None else rebuilt(config, backbone))
    if norm is not None and float(w.norm()) > 0:
        key = f"{norm}.bias"
        beta = backbone[key]
        delta = c * w[0].double() / w[0].double().pow(2).sum()  # w'·δ = c
        state[f"{model.base_model_prefix}.{key}"] = (beta.double() + delta.to(beta.device)).to(beta.dtype)
        return HFExport(model, state, {key: beta}, f"{same}, offset {c:.6g} added through {key} (shifted by "
                                                   f"c·w/|w|²; instructrl keeps the original in {HEAD_FILE})")
    why = (f"AutoModelForSequenceClassification reads reward − {c:.6g}: {type(model).__name__}'s head has no bias "
           "and its last hidden state comes from no LayerNorm with a bias to carry the offset (after an RMSNorm, no "
           "linear function of it is constant)")
    return HFExport(model, state, {}, why, why)


@torch.no_grad()
def final_layer_norm(backbone: nn.Module | None) -> str | None:
    """Name of the nn.LayerNorm with a bias whose output is the backbone's last hidden state, or None: found by
    running one token and comparing outputs, so no per-architecture names."""
    norms = {n: m for n, m in (backbone.named_modules() if backbone is not None else [])
             if isinstance(m, nn.LayerNorm) and m.bias is not None}
    if not norms:
        return None
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: outputs.update({n: out}))
             for n, m in norms.items()]
    try:
        ids = torch.zeros(1, 1, dtype=torch.long, device=next(backbone.parameters()).device)
        last = backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return next((n for n, out in outputs.items() if out.shape == last.shape and torch.equal(out, last)), None)


def hf_reading(config, skip_id: int | None) -> tuple[str, str]:
    """Where transformers reads the reward (the card's line) and, if that is not where we read it, a warning."""
    cfg = config.get_text_config()
    pad, eos = cfg.pad_token_id, cfg.eos_token_id
    if skip_id is not None:
        return f"both read the last token whose id is not pad_token_id ({skip_id})", ""
    note = ("instructrl reads the EOS ending the response; transformers " +
            (f"the last token whose id is not pad_token_id ({pad}): the same token where that id only pads"
             if pad is not None else "the last position, and refuses padded batches (no pad_token_id)"))
    if pad is not None and pad in (eos if isinstance(eos, list) else [eos]):
        return note, (f"pad_token_id {pad} is an EOS id, so AutoModelForSequenceClassification reads the token "
                      "before a final EOS, where instructrl reads the EOS")
    return note, ""


def rebuilt(config, state: dict) -> nn.Module | None:
    """The backbone from its full state dict (e.g. gathered from FSDP shards), sharing its tensors, to probe; None
    where the state dict lacks tensors the model needs (non-persistent buffers such as rotary frequencies)."""
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    model.load_state_dict(state, strict=False, assign=True)
    return None if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())) else model


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Activation checkpointing: each transformer block's activations are recomputed in backward instead of stored
    (HF's, in training mode only). Non-reentrant, so gradients are exact, reach LoRA adapters and a scalar head
    whatever needs grad at the input (no `enable_input_require_grads`), and the RNG replay keeps dropout alike."""
    hf = base_model(model.backbone if isinstance(model, ScalarHeadModel) else model)
    if hasattr(hf, "activation_checkpointing_enable"):  # newer transformers (the old name is deprecated)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _float32_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """Hugging Face's sdpa attention in float32, outside autocast. On the CPU, bf16 attention costs more than it
    saves: its fused backward ran 4× slower than in float32 (a 4-layer GPT, 2 cores with AVX-512 BF16)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                      *args, **kwargs)


@contextlib.contextmanager
def bf16_autocast(device: torch.device):
    """Forward passes in bfloat16 autocast inside the block; weights, gradients and the optimizer stay float32.
    The cast cache is off: one block spans whole training loops, and a cached bf16 copy of a weight would outlive
    the optimizer step that changed it. On the CPU, sdpa attention runs in float32 (`_float32_sdpa`)."""
    try:  # transformers ≥ 4.48 dispatches attention through this mapping; older ones keep sdpa in autocast's bf16
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        ALL_ATTENTION_FUNCTIONS = None
    swap = (device.type == "cpu" and ALL_ATTENTION_FUNCTIONS is not None
            and "sdpa" not in getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {"sdpa": None}))
    if swap:  # this module's own mapping: models read it at every forward, and it is restored below
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _float32_sdpa
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield
    finally:
        if swap:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode inside the block: HF drops the KV cache of a checkpointed model in training mode, and
    sampling needs it (dropout is off either way, so nothing else changes)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer updates: every weight, or only the adapters (and heads) when the base is frozen."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of the state dict a run changes: all of it, or without the frozen base weights under LoRA, so
    checkpoints and best-weight copies hold only what training can change (the base is re-read from its directory).
    """
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


# --- LoRA (peft) ----------------------------------------------------------------------------------------------
def _lora_targets(model: nn.Module, spec: str | None):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if spec and spec != "all-linear":
        return [m.strip() for m in spec.split(",") if m.strip()]
    return spec or DEFAULTS.get(base_model(model).config.model_type, "all-linear")


def apply_lora(model: nn.Module, opts, causal_lm: bool = True) -> nn.Module:
    """Freeze the model and add LoRA adapters (peft). B starts at 0, so the adapted model equals the base until
    the first update; adapter weights stay float32 whatever the base dtype. `opts`: options.LoraOptions."""
    from peft import LoraConfig, TaskType, get_peft_model

    if opts.dropout:
        warnings.warn("LoRA dropout > 0: log-probs are no longer reproducible in training mode, so the first PPO "
                      "ratio is not exactly 1")
    cfg = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                     target_modules=_lora_targets(model, opts.target_modules),
                     task_type=TaskType.CAUSAL_LM if causal_lm else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft sets it itself
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def merge_lora(model, path: str | os.PathLike | None = None) -> nn.Module:
    """Save the adapters alone under PATH/lora_adapter (if a path is given), then merge them into the base weights
    in place and return the plain HF model, which `from_pretrained` loads like any other."""
    if path is not None:
        model.save_pretrained(str(Path(path) / "lora_adapter"), safe_serialization=True)
    return model.merge_and_unload()


class AdapterDisabled:
    """The frozen reference under a LoRA policy: the policy itself with its adapters switched off, so the SFT
    weights are held once. Every call runs inside peft's `disable_adapter()`, which gives exactly the base model.
    Not an nn.Module: freezing or moving it must never touch the policy."""

    def __init__(self, peft_model):
        self.peft = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.peft(*args, **kwargs)

    @property
    def config(self):
        return self.peft.config

    def parameters(self):
        return self.peft.parameters()

    def get_base_model(self):
        return self.peft.get_base_model()


def save_causal_lm(model, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """`save_pretrained` of a policy: a LoRA model is saved merged (plus its adapters in PATH/lora_adapter), so the
    directory stays loadable by AutoModelForCausalLM. Merging is in place: call at the end of a run. `state_dict`
    (e.g. gathered from FSDP shards) replaces the model's own; under LoRA it is merged the same way."""
    if state_dict is not None:
        state_dict = untied(model, state_dict)
    if state_dict is not None and is_lora(model):
        save_lora_adapter(model, path, state_dict)
        model, state_dict = base_model(model), merged_lora_state(model, state_dict)
    elif is_lora(model):
        model = merge_lora(model, path)
    model.save_pretrained(str(path), safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))


def untied(model: nn.Module, state_dict: dict) -> dict:
    """`state_dict` without the second name of a tied weight (one tensor under two names in `model`, e.g. GPT-2's
    lm_head and wte), as `save_pretrained` writes the live model; loading re-ties it."""
    seen: set[int] = set()
    sd = dict(state_dict)
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            sd.pop(k, None)
        seen.add(id(v))
    return sd


def save_lora_adapter(peft_model, path: str | os.PathLike, state_dict: dict) -> None:
    """PATH/lora_adapter as `merge_lora` writes it, from the PEFT model's full state dict (e.g. gathered)."""
    peft_model.save_pretrained(str(Path(path) / "lora_adapter"), safe_serialization=True, state_dict=state_dict)


def merged_lora_state(model: nn.Module, state_dict: dict) -> dict:
    """A full state dict of `model` (or of a module holding a PEFT model, e.g. a ScalarHeadModel's backbone) with its
    LoRA adapters merged, W + scale · (B A) as peft merges them, under the keys of the model without adapters: what
    `merge_and_unload` then `state_dict()` give, computed from tensors alone (FSDP shards cannot merge in place).
    Adapters on linear layers only (`distributed._check_lora` refuses the others before training)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    sd = dict(state_dict)
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        key = f"{name}.base_layer.weight"
        w = sd[key]
        for a in m.active_adapters:
            if a in m.lora_A:
                delta = transpose(sd[f"{name}.lora_B.{a}.weight"] @ sd[f"{name}.lora_A.{a}.weight"],
                                  m.fan_in_fan_out) * m.scaling[a]
                w = w + delta.to(w.dtype)
        sd[key] = w
    sd = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    for name, m in model.named_modules():  # the PEFT wrappers' own prefixes
        if is_lora(m):
            outer = f"{name}." if name else ""
            inner = f"{outer}base_model.model."
            sd = {outer + k[len(inner):] if k.startswith(inner) else k: v for k, v in sd.items()}
    return sd
