"""Prompts, responses and conversations to token ids, through the tokenizer's chat template when it has one.

With a chat template (the tokenizer's own, or one given by `load_chat_template`), `apply_chat_template` renders
everything: a string prompt is one user message, a string response one assistant message, and a response ends
with the template's end of turn. Without one, text is encoded exactly as before (prompt ids, response ids, EOS),
and messages are refused: they need a template to become text.

SFT's loss mask covers every assistant turn of the completion, its end of turn included, and nothing else. It
comes from `apply_chat_template(..., return_assistant_tokens_mask=True)` where the template marks assistant turns
with {% generation %}; most published templates (Llama 3, Qwen 2.5) do not, so otherwise each assistant turn's
span is found by rendering the conversation up to it: the text after `messages[:i]` + generation prompt and up
to the turn's end of turn in the rendering of `messages[:i + 1]`. That needs a template that renders a
conversation's beginning the same whether or not more follows; one that does not (e.g. one that drops earlier
turns' reasoning) is refused with a hint to add {% generation %}.

A template is code. transformers renders it in Jinja's ImmutableSandboxedEnvironment (no escape to Python); a
user's --chat-template is first rendered here in the same kind of sandbox with limits on its output
(RENDER_CHARS, repetitions `'x' * n` included) and time (RENDER_SECONDS), and every rendering is bounded by the
same time, so a template that loops or explodes is refused in one line instead of hanging or exhausting memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .data import DataError, Demo, Message, Prompt, Response, encode_example, left_cut

_PROBE = "xyzzy"  # an assistant message's content, found again in the rendering to see what follows it
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
RENDER_CHARS = 1_000_000  # a probe conversation's rendering, and any repetition inside it
RENDER_SECONDS = 5.0      # one rendering


class TemplateLimit(ValueError):
    """A chat template went past RENDER_CHARS or RENDER_SECONDS."""


@contextlib.contextmanager
def render_time_limit():
    """Stop a rendering that takes longer than RENDER_SECONDS (SIGALRM: in the main thread; elsewhere unbounded)."""
    seconds = RENDER_SECONDS
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield  # not the main thread, or a timer of someone else's is running: leave it alone
        return

    def stop(signum, frame):
        raise TemplateLimit(f"the chat template takes more than {seconds:g} s to render one conversation")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %} ... {% endgeneration %} (marks assistant tokens); here it only renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox and globals, with `*` and `**` bounded (`'x' * 10**10` is refused, not allocated)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit(f"the chat template raises to the power {right} (at most 64)")
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)) \
                or isinstance(left, int) and isinstance(right, (str, list, tuple)):
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if len(seq) * n > RENDER_CHARS:
                raise TemplateLimit(f"the chat template repeats a sequence {n} times (more than {RENDER_CHARS:,} "
                                    f"items)")
        return super().call_binop(context, operator, left, right)


def check_template_limits(text: str) -> None:
    """Render a user and an assistant turn (with and without the generation prompt) in the limited sandbox:
    TemplateLimit past RENDER_CHARS characters or RENDER_SECONDS, jinja2.TemplateError for a broken template."""
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "", namespace=jinja2.utils.Namespace)
    template = env.from_string(text)
    messages = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}]
    with render_time_limit():
        for kwargs in ({"messages": messages}, {"messages": messages[:1], "add_generation_prompt": True}):
            size = 0
            for chunk in template.generate(bos_token="", eos_token="", **kwargs):
                size += len(chunk)
                if size > RENDER_CHARS:
                    raise TemplateLimit(f"the chat template writes more than {RENDER_CHARS:,} characters for a "
                                        f"two-message conversation")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def load_chat_template(tokenizer, path: str | os.PathLike):
    """Give `tokenizer` the Jinja chat template in the file `path` (for tokenizers without one) and return it.
    The template is checked by rendering a user and an assistant turn; a bad one raises DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    text = path.read_text(encoding="utf-8")
    try:
        check_template_limits(text)
    except (jinja2.TemplateError, ValueError) as e:
        raise DataError(path, getattr(e, "lineno", None), f"not a usable chat template: {e}") from None
    before, tokenizer.chat_template = tokenizer.chat_template, text
    try:
        end_of_turn_ids(tokenizer)
    except (jinja2.TemplateError, ValueError) as e:
        tokenizer.chat_template = before
        raise DataError(path, getattr(e, "lineno", None), f"not a usable chat template: {e}") from None
    return tokenizer


def use_chat_template(tokenizer, path: str | os.PathLike | None):
    """The trainers' --chat-template: give a tokenizer without a template the one in `path` (None: nothing to do).
    A tokenizer with a different template is refused (it was trained on its own; replace it in the model's
    tokenizer_config.json if that is really wanted); the same template again is a no-op, so a pipeline may name
    the file at every step although SFT's saved tokenizer already carries it."""
    if path is None:
        return tokenizer
    if has_chat_template(tokenizer):
        if not Path(path).is_file():
            raise DataError(path, None, "file not found")
        if Path(path).read_text(encoding="utf-8") != tokenizer.chat_template:
            raise DataError(path, None, "the tokenizer already has a different chat template (a model is used with "
                                        "the template it was trained on); leave out --chat-template", "chat_template")
        return tokenizer
    return load_chat_template(tokenizer, path)


def stop_token_id(tokenizer) -> int:
    """The token sampling stops at: the last of the end of turn (EOS without a chat template)."""
    return end_of_turn_ids(tokenizer)[-1]


def _messages(x: Prompt | Response, role: str) -> list[Message]:
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)


def _text(x: Prompt | Response) -> str:
    if not isinstance(x, str):
        raise ValueError("messages need a chat template and this tokenizer has none (load one with "
                         "chat.load_chat_template)")
    return x


def _apply(tokenizer, messages: list[Message], **kwargs):
    """tokenizer.apply_chat_template (transformers' sandbox), within RENDER_SECONDS."""
    with render_time_limit():
        return tokenizer.apply_chat_template(messages, **kwargs)


def _render(tokenizer, messages: list[Message], **kwargs) -> str:
    return _apply(tokenizer, messages, tokenize=False, **kwargs)


def _special_tokens(tokenizer) -> list[str]:
    """Special tokens, longest first (some templates' end-of-turn tokens are only flagged in added_tokens_decoder)."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted({t for t in added | set(tokenizer.all_special_tokens) if t}, key=len, reverse=True)


def end_of_turn_text(tokenizer) -> str:
    """What the template writes after an assistant message's content, up to and including the first special token:
    '<|im_end|>' of '<|im_end|>\\n' (what follows it only separates turns; the model stops at the special token)."""
    text = _render(tokenizer, [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}])
    if _PROBE not in text:
        raise ValueError("the chat template does not write the assistant's message")
    tail = text[text.rindex(_PROBE) + len(_PROBE):]
    specials = "|".join(map(re.escape, _special_tokens(tokenizer)))
    special = re.search(specials, tail) if specials else None
    tail = tail[:special.end()] if special else tail
    if not tail:
        raise ValueError("the chat template ends an assistant turn with nothing, so a model cannot learn to stop")
    return tail


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end every response: the template's end of turn, or [EOS] without a template. The last one
    is the token sampling stops at."""
    if not has_chat_template(tokenizer):
        return [tokenizer.eos_token_id]
    return tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]


def render_prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """A prompt's token ids: the template's rendering with the generation prompt, else the text's own ids."""
    if not has_chat_template(tokenizer):
        return tokenizer(_text(prompt))["input_ids"]
    return _apply(tokenizer, _messages(prompt, "user"), add_generation_prompt=True, return_dict=False)


def _mask_by_prefixes(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    text, eot = _render(tokenizer, messages), end_of_turn_text(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1])
        if not (turn.startswith(head) and text.startswith(turn)):
            raise ValueError("the chat template renders the start of a conversation differently from the whole; "
                             "mark assistant turns with {% generation %} ... {% endgeneration %} to train on it")
        end = turn.rfind(eot, len(head))
        spans.append((len(head), end + len(eot) if end >= 0 else len(turn)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < b and a < end for start, end in spans)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def conversation_ids(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """A conversation's token ids (as `apply_chat_template` gives them) and a mask: 1 on every assistant turn's
    tokens, its end of turn included; 0 elsewhere."""
    if _GENERATION_TAG.search(tokenizer.get_chat_template()):
        out = _apply(tokenizer, messages, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    return _mask_by_prefixes(tokenizer, messages)


def encode_demo(tokenizer, demo: Demo, max_len: int, truncate: bool) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion, and the loss mask: 1 on the completion's assistant tokens (end of turn
    included). The ids end with the last end of turn, the token the reward model reads. Longer than max_len:
    the prompt is cut from the left if `truncate`, else ValueError (as `encode_example`). The reward model encodes
    (prompt, response) as encode_demo(tokenizer, Demo(prompt, response), ...)."""
    if not has_chat_template(tokenizer):
        ids, n_prompt = encode_example(tokenizer, _text(demo.prompt), _text(demo.completion), max_len, truncate)
        return ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)
    prompt_ids = render_prompt_ids(tokenizer, demo.prompt)
    ids, mask = conversation_ids(tokenizer, _messages(demo.prompt, "user") + _messages(demo.completion, "assistant"))
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently when a response follows it")
    mask = [0] * len(prompt_ids) + mask[len(prompt_ids):]  # a multi-turn prompt's assistant turns are context
    if 1 not in mask:
        raise ValueError("the chat template marks no token of the response as the assistant's")
    end = len(mask) - mask[::-1].index(1)  # what follows the last end of turn separates turns: not trained on
    ids, mask = ids[:end], mask[:end]
    cut = left_cut(mask.index(1), end, max_len, truncate)
    return ids[cut:], mask[cut:]
