"""Reward sources: what scores a batch of sampled responses in `ppo`, `pg` and `eval` (`--reward`, repeatable).

A spec names one source, optionally weighted as `SPEC@WEIGHT` (or by `--reward-weights`, one per `--reward`):
  - DIR: a reward-model directory (ours, or a Hugging Face sequence classifier with one label). With the policy's
    tokenizer (same vocabulary and chat template) it reads the sampled token ids as before; with another tokenizer
    it re-tokenises the prompt and response text its own way (its chat template, its end of turn).
  - module:function: a Python callable f(prompts, responses) -> floats. Prompts are text or messages; where a
    prompt is messages its response is [{"role": "assistant", "content": text}], else the text.
  - http(s)://host:port/path: a reward server with OpenRLHF's remote-RM contract [ORLHF]: POST JSON
    {"query": [prompt + response text], "prompts": [prompt text], "labels": null} → JSON {"rewards": [floats]}.
    The texts are the policy tokenizer's decoding of the real tokens, special tokens kept (as OpenRLHF sends them).
  - gold:WORLD_DIR: the embedded world's hidden judge (an upper line for experiments: a perfect reward model).
Several sources: total = Σ w_i · r_i, or with --reward-normalize Σ w_i · whiten(r_i), each whitened over the
batch (all ranks): batch statistics need no state in checkpoints and put sources of any scale on one footing.
"""
from __future__ import annotations

import contextlib
import http.client
import importlib
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from . import distributed as dist
from .losses import masked_whiten
from .options import option

CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
BACKOFF_S = 0.5  # the first wait before a retry; it doubles with each one
MAX_ANSWER_BYTES = 64 << 20  # a reward server's answer larger than this is refused (B numbers are far less)
TOKEN_ENV = "INSTRUCTRL_RM_TOKEN"  # a bearer token sent to reward servers (and serve-rm's default --token)


class RewardError(ValueError):
    """A reward source failed (a server down or answering nonsense, a callable returning the wrong thing): the run
    stops; its last checkpoint stays, and no output is written."""


@dataclass
class RewardOptions:
    """How the --reward sources combine, and how a reward server is called."""

    weights: list[float] = option(factory=list, help="one weight per --reward (instead of SPEC@WEIGHT; default 1)")
    normalize: bool = option(False, "whiten each reward over the batch before the weighted sum")
    timeout: float = option(60.0, "seconds a reward server may take for a whole answer (a wall-clock deadline per "
                                  "attempt)", gt=0, learns=False)
    retries: int = option(3, f"retries of a failed reward-server call (waits {BACKOFF_S} s, doubling)", ge=0, le=10,
                          learns=False)


class RewardSource(Protocol):
    name: str

    def score(self, prompts: list, responses: list[str], batch) -> torch.Tensor:
        """Rewards [B] (float32, on the batch's device) of the responses to the prompts; `batch` is the
        sampling.SampleBatch they were sampled as."""


def rewards_tensor(values, n: int, what: str, device) -> torch.Tensor:
    """`values` as a float32 [n] tensor, else a RewardError naming the source."""
    try:
        t = torch.as_tensor(values if torch.is_tensor(values) else list(values), dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise RewardError(f"{what}: expected {n} numbers, got {str(values)[:80]!r} ({e})") from None
    if t.shape != (n,):
        raise RewardError(f"{what}: expected {n} rewards, got shape {tuple(t.shape)}")
    return t.to(device)


@dataclass
class ModelReward:
    """A reward model; `tokenizer` None means it reads the policy's token ids (same tokenizer)."""

    name: str
    model: object
    tokenizer: object | None = None

    def score(self, prompts, responses, batch) -> torch.Tensor:
        if self.tokenizer is None:
            return self.model.score(batch.input_ids, batch.attention_mask, batch.last_index)
        from .reward import score_texts

        return score_texts(self.model, self.tokenizer, prompts, responses).to(batch.input_ids.device)


@dataclass
class FunctionReward:
    name: str
    fn: Callable
    spec: str = ""  # module:function, as given

    def score(self, prompts, responses, batch) -> torch.Tensor:
        shaped = [r if isinstance(p, str) else [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        what = f"reward function {self.spec or self.name}"
        try:
            values = self.fn(list(prompts), shaped)
        except Exception as e:  # the user's code: its error in one line, not a traceback through ours
            raise RewardError(f"{what} raised {type(e).__name__}: {one_line(str(e))}"[:500]) from None
        return rewards_tensor(values, len(prompts), what, batch.input_ids.device)


@dataclass
class GoldReward:
    """The embedded world's judge: the reward the simulated labelers rank by."""

    name: str
    judge: object

    def score(self, prompts, responses, batch) -> torch.Tensor:
        return torch.tensor(self.judge.score_batch(prompts, responses), dtype=torch.float32,
                            device=batch.input_ids.device)


def _post_once(url: str, data: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
    """One POST; (status, body). A timer shuts the socket down `timeout` s after the start, whatever the server is
    doing: socket timeouts bound each read only, so a server dripping a byte at a time would hold the call for ever."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def expire():
        expired.set()
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read at once

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if expired.is_set():  # the deadline passed while connecting (before there was a socket to shut)
            raise TimeoutError
        conn.request("POST", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")), data, headers)
        answer = conn.getresponse()
        if (answer.length or 0) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer of {answer.length} bytes (more than {MAX_ANSWER_BYTES})")
        # with a Content-Length, read() raises IncompleteRead on a cut answer; chunked ones are read up to the cap
        body = answer.read() if answer.length is not None else answer.read(MAX_ANSWER_BYTES + 1)
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer over {MAX_ANSWER_BYTES} bytes")
        if expired.is_set():
            raise TimeoutError
        return answer.status, body
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
        conn.close()


def post_json(url: str, body: dict, timeout: float, retries: int, read: Callable = lambda out: out):
    """POST `body` as JSON and return `read(answer)`, retrying with exponential backoff what may pass: no
    connection, no whole answer within `timeout` s (a wall-clock deadline per attempt), a truncated or invalid
    answer (`read` raising ValueError), HTTP 5xx, 408 or 429. Another 4xx (the request itself is refused) and the
    last failure raise a one-line RewardError naming the server. $INSTRUCTRL_RM_TOKEN, if set, is sent as a
    bearer token (`serve-rm --token`)."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            status, raw = _post_once(url, data, headers, timeout)
        except TimeoutError:  # ours (the deadline) or the connect's
            error = f"no whole answer within --reward-timeout {timeout:g} s"
            continue
        except http.client.IncompleteRead as e:
            error = f"the answer was cut off after {len(e.partial)} bytes"
            continue
        except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, closed, not HTTP
            error = one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            continue
        if status // 100 != 2:
            error = f"HTTP {status}" + (f" ({one_line(raw[:200].decode(errors='replace'))})" if raw else "")
            if status // 100 == 4 and status not in (408, 429):
                raise RewardError(f"reward server {url}: {error}; the server refuses the request itself, so it "
                                  f"is not retried")
            continue
        try:
            out = json.loads(raw)
            if not isinstance(out, dict):
                raise ValueError(f"expected a JSON object, got {type(out).__name__}")
            return read(out)
        except ValueError as e:  # JSONDecodeError and RewardError are ValueErrors
            error = one_line(str(e)) if not isinstance(e, json.JSONDecodeError) else f"malformed JSON ({e})"
    raise RewardError(f"reward server {url}: {error} (after {retries + 1} attempts); expected JSON "
                      "{\"rewards\": [one number per query]}")


def one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class HTTPReward:
    name: str
    url: str
    tokenizer: object  # the policy's: decodes the sampled tokens into the texts the server reads
    timeout: float
    retries: int

    def score(self, prompts, responses, batch) -> torch.Tensor:
        def texts(ids, mask):
            return [self.tokenizer.decode([t for t, m in zip(row, keep) if m], skip_special_tokens=False)
                    for row, keep in zip(ids.tolist(), mask.tolist())]

        def read(out: dict) -> torch.Tensor:  # an answer without B numbers is invalid: retried like a cut one
            if "rewards" not in out:
                raise RewardError(f"the answer has no 'rewards' (keys: {sorted(out)[:5]})")
            return rewards_tensor(out["rewards"], len(prompts), "the answer", batch.input_ids.device)

        body = {"query": texts(batch.input_ids, batch.attention_mask),
                "prompts": texts(batch.prompt_ids, batch.prompt_mask), "labels": None}
        return post_json(self.url, body, self.timeout, self.retries, read)


@dataclass
class Rewards:
    """Several sources as one: the weighted sum (of whitened rewards with `normalize`), and each part."""

    sources: list
    weights: list[float]
    normalize: bool = False

    def score(self, prompts, responses, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {s.name: s.score(prompts, responses, batch).float() for s in self.sources}
        total = torch.zeros_like(next(iter(parts.values())))
        for w, r in zip(self.weights, parts.values()):
            total = total + w * (whiten(r) if self.normalize else r)
        return total, parts


def whiten(r: torch.Tensor) -> torch.Tensor:
    """(r − mean) / std over the batch of every rank."""
    ones = torch.ones_like(r)
    mean, var = dist.masked_moments(r, ones)
    return masked_whiten(r, ones, mean=mean, var=var)


# --- specs -----------------------------------------------------------------------------------------------------
def split_weight(spec: str) -> tuple[str, float | None]:
    """'SPEC@0.5' → ('SPEC', 0.5); no number after the last '@': (spec, None)."""
    head, at, tail = spec.rpartition("@")
    if at:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, None


def kind(spec: str) -> str:
    """'http', 'gold', 'function' or 'model' (a directory)."""
    if spec.startswith(("http://", "https://")):
        return "http"
    if spec.startswith("gold:"):
        return "gold"
    if CALLABLE.match(spec) and not Path(spec).exists():
        return "function"
    return "model"


def parse(specs, weights: list[float]) -> list[tuple[str, str, float]]:
    """(kind, spec, weight) per --reward; a str is one spec (the Python API's single reward)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs or not all(specs):
        raise ValueError("--reward is required: a reward-model directory, module:function, an http(s) URL or "
                         "gold:WORLD_DIR")
    if weights and len(weights) != len(specs):
        raise ValueError(f"--reward-weights: {len(weights)} weights for {len(specs)} --reward sources")
    out = []
    for i, spec in enumerate(specs):
        spec, w = split_weight(spec)
        if w is not None and weights:
            raise ValueError(f"--reward {spec}@{w}: give weights either with @ or with --reward-weights, not both")
        w = weights[i] if weights else (1.0 if w is None else w)
        if not math.isfinite(w):
            raise ValueError(f"--reward {spec}: the weight must be a finite number, not {w}")
        out.append((kind(spec), spec, float(w)))
    return out


def model_dirs(specs) -> list[str]:
    """The reward-model directories among the specs (the value model starts from the first [IG, N+ D22])."""
    return [spec for k, spec, _ in parse(specs, []) if k == "model"] if specs else []


def _name(k: str, spec: str) -> str:
    if k == "model":
        return Path(spec).name or "rm"
    if k == "function":
        return spec.rsplit(":", 1)[1]
    if k == "gold":
        return "gold"
    return re.sub(r"\W+", "_", spec.split("://", 1)[1]).strip("_")


def load_function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward {spec}: cannot import {name} from {module} ({e})") from None
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {name} is not callable")
    return fn


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)


def _check_gold(spec: str) -> str:
    world = spec[len("gold:"):]
    if not (Path(world) / "judge.json").is_file():
        raise ValueError(f"--reward {spec}: {world} has no judge.json; expected an embedded-world directory")
    return world


def check_sources(specs, opts: RewardOptions) -> None:
    """Every --reward usable, checked before any model loads: the specs and weights, functions importable, gold
    worlds and model directories present. (A server is first asked with the first batch.)"""
    from .models import model_dir

    for k, spec, _ in parse(specs, opts.weights):
        if k == "function":
            load_function(spec)
        elif k == "gold":
            _check_gold(spec)
        elif k == "model":
            try:
                model_dir(spec)
            except ValueError as e:
                raise ValueError(f"--reward {e}") from None


def load_source(k: str, spec: str, name: str, opts: RewardOptions, policy_tokenizer, device, dtype):
    from . import hub
    from .models import ScalarHeadModel, freeze, load_tokenizer

    if k == "model":
        model = freeze(ScalarHeadModel.from_pretrained(spec, device, dtype))
        has_tok = any((Path(hub.local(spec)) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = load_tokenizer(spec) if has_tok else None
        return ModelReward(name, model, None if tok is None or same_tokenizer(tok, policy_tokenizer) else tok)
    if k == "function":
        return FunctionReward(name, load_function(spec), spec)
    if k == "gold":
        from .world.judge import GoldJudge

        return GoldReward(name, GoldJudge.from_world(_check_gold(spec)))
    return HTTPReward(name, spec, policy_tokenizer, opts.timeout, opts.retries)


def load_rewards(specs, opts: RewardOptions, policy_tokenizer, device, dtype=torch.float32) -> Rewards:
    parsed = parse(specs, opts.weights)
    names: list[str] = []
    for k, spec, _ in parsed:  # one metric per source: a repeated name gets its position appended
        n = _name(k, spec)
        names.append(n if n not in names else f"{n}_{len(names) + 1}")
    sources = [load_source(k, spec, n, opts, policy_tokenizer, device, dtype) for (k, spec, _), n in zip(parsed, names)]
    return Rewards(sources, [w for *_, w in parsed], opts.normalize)
