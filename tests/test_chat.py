"""Chat templates, token by token: tiny tokenizers with Qwen- (ChatML) and Llama-3-style templates, saved and loaded
with AutoTokenizer; without a template everything encodes exactly as before."""
import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from instructrl.chat import (conversation_ids, encode_demo, end_of_turn_ids, has_chat_template, load_chat_template,
                             render_prompt_ids)
from instructrl.data import DataError, Demo, collate_right, encode_example
from instructrl.models import train_tokenizer
from instructrl.sampling import encode_prompts

# Qwen 2.5's layout (default system prompt included) with its assistant turns marked for the loss
CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif not (loop.first and message.role == 'system') %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
CHATML_UNMARKED = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Meta-Llama-3-8B-Instruct's template, verbatim: no {% generation %}, so masks come from prefix rendering
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
          "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TEXTS = ["Hello there, how are you today?", "The capital of France is Paris.", "I am fine, thank you very much.",
         "User: what is two plus two?\nAssistant: Four.", "Be brief. Sure! Here you go."] * 10


def plain_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def save_and_load(tok, d):
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module", params=["chatml", "chatml_unmarked", "llama3"])
def tok(request, tmp_path_factory):
    t = plain_tokenizer()
    if request.param == "llama3":  # as Llama 3 ships: special tokens flagged in added_tokens_decoder only
        t.add_tokens([AddedToken(s, special=True) for s in
                      ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
        t.bos_token, t.chat_template = "<|begin_of_text|>", LLAMA3
    else:
        t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        t.chat_template = CHATML if request.param == "chatml" else CHATML_UNMARKED
    loaded = save_and_load(t, tmp_path_factory.mktemp(request.param))
    loaded.eot = "<|eot_id|>" if request.param == "llama3" else "<|im_end|>"
    return loaded


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
THREE_TURNS = [SYSTEM, user("Hello there"), assistant("Hello, how are you?"), user("I am fine"),
               assistant("Sure! Thank you."), user("The capital of France?"), assistant("Paris.")]
PROMPTS = ["what is two plus two?", [user("Hello")], [SYSTEM, user("Hello")], THREE_TURNS[:4]]


def test_loaded_with_a_template(tok):
    assert has_chat_template(tok) and not has_chat_template(plain_tokenizer())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_are_apply_chat_template(tok, prompt):
    messages = [user(prompt)] if isinstance(prompt, str) else prompt
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert render_prompt_ids(tok, prompt) == want
    assert encode_prompts(tok, [prompt], 1000) == [want]


def test_end_of_turn(tok):
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(tok.eot)] != [tok.eos_token_id]
    assert end_of_turn_ids(plain_tokenizer()) == [plain_tokenizer().eos_token_id]


def segments(tok, messages):
    """The conversation as (text, in the loss) pieces, written out by hand for each template."""
    if tok.eot == "<|eot_id|>":
        out = [("<|begin_of_text|>", 0)]
        for m in messages:
            out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0))
            out.append((m["content"] + "<|eot_id|>", int(m["role"] == "assistant")))
        return out
    out = []
    for m in messages:
        out.append((f"<|im_start|>{m['role']}\n", 0))
        if m["role"] == "assistant":
            out += [(m["content"] + "<|im_end|>", 1), ("\n", 0)]
        else:
            out.append((m["content"] + "<|im_end|>\n", 0))
    return out


def test_sft_mask_covers_exactly_the_assistant_turns(tok):
    want_ids, want_mask = [], []
    for text, loss in segments(tok, THREE_TURNS):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += piece
        want_mask += [loss] * len(piece)
    end = len(want_mask) - want_mask[::-1].index(1)  # ChatML's final "\n" after <|im_end|> is not kept
    ids, mask = encode_demo(tok, Demo(THREE_TURNS[:2], THREE_TURNS[2:]), 1000, False)
    assert ids == want_ids[:end] and mask == want_mask[:end]
    assert ids == tok.apply_chat_template(THREE_TURNS, return_dict=False)[:end]
    assert sum(mask) == sum(len(tok(m["content"] + tok.eot, add_special_tokens=False)["input_ids"])
                            for m in THREE_TURNS if m["role"] == "assistant")
    assert [tok.decode([i for i, m in zip(ids, mask) if m])] == ["Hello, how are you?" + tok.eot + "Sure! Thank you."
                                                                 + tok.eot + "Paris." + tok.eot]


def test_generation_tags_and_prefix_rendering_agree(tmp_path):
    marked, unmarked = plain_tokenizer(), plain_tokenizer()
    for t, template in ((marked, CHATML), (unmarked, CHATML_UNMARKED)):
        t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        t.chat_template = template
    for conv in (THREE_TURNS, THREE_TURNS[1:], [user("a"), assistant("b")], [user("x"), assistant("\nHello\n")]):
        ids, mask = conversation_ids(marked, conv)
        assert conversation_ids(unmarked, conv) == (ids, mask) and 1 in mask


def test_prompt_completion_trains_on_the_completion_only(tok):
    prompt, completion = THREE_TURNS[:6], [assistant("Paris.")]
    ids, mask = encode_demo(tok, Demo(prompt, completion), 1000, False)
    n = len(render_prompt_ids(tok, prompt))
    assert ids[:n] == render_prompt_ids(tok, prompt) and mask == [0] * n + [1] * (len(ids) - n)
    assert tok.decode(ids[n:]) == "Paris." + tok.eot


def test_reward_model_pair_ends_at_the_end_of_turn(tok):
    """(prompt, response) as the RM sees it: the prompt's ids, then the response, then the end of turn it is read at."""
    ids, mask = encode_demo(tok, Demo("what is two plus two?", " Four."), 1000, False)
    n = len(render_prompt_ids(tok, "what is two plus two?"))
    assert ids[:n] == render_prompt_ids(tok, "what is two plus two?") and ids[-1:] == end_of_turn_ids(tok)
    assert mask == [0] * n + [1] * (len(ids) - n)
    assert encode_demo(tok, Demo("what is two plus two?", [assistant(" Four.")]), 1000, False) == (ids, mask)


def test_truncation(tok):
    demo = Demo(THREE_TURNS[:6], [assistant("Paris.")])
    ids, mask = encode_demo(tok, demo, 1000, False)
    with pytest.raises(ValueError, match="truncate-prompts"):
        encode_demo(tok, demo, len(ids) - 1, False)
    cut_ids, cut_mask = encode_demo(tok, demo, 12, True)
    assert (cut_ids, cut_mask) == (ids[-12:], mask[-12:])
    with pytest.raises(ValueError, match="does not fit"):
        encode_demo(tok, demo, sum(mask), True)


def test_without_a_template_everything_is_as_before():
    tok = plain_tokenizer()
    demos = [("User: what is two plus two?\nAssistant:", " Four."), ("Hello", " there, how are you today?")]
    examples = []
    for p, r in demos:
        ids, n_prompt = encode_example(tok, p, r, 64, False)
        assert render_prompt_ids(tok, p) == tok(p)["input_ids"] == ids[:n_prompt]
        assert encode_demo(tok, Demo(p, r), 64, False) == (ids, [0] * n_prompt + [1] * (len(ids) - n_prompt))
        examples.append((ids, n_prompt))
    assert encode_demo(tok, Demo(*demos[0]), 8, True)[0] == encode_example(tok, *demos[0], 8, True)[0]
    by_count = collate_right(examples, tok.pad_token_id)
    by_mask = collate_right([encode_demo(tok, Demo(p, r), 64, False) for p, r in demos], tok.pad_token_id)
    assert all(a.equal(b) for a, b in zip(by_count, by_mask))
    with pytest.raises(ValueError, match="need a chat template"):
        render_prompt_ids(tok, [user("Hello")])
    with pytest.raises(ValueError, match="need a chat template"):
        encode_demo(tok, Demo("Hello", [assistant("there")]), 64, False)


def test_load_chat_template(tmp_path):
    (tmp_path / "chatml.jinja").write_text(CHATML)
    tok = plain_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert load_chat_template(tok, tmp_path / "chatml.jinja") is tok and tok.chat_template == CHATML
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    plain = plain_tokenizer()
    with pytest.raises(DataError, match=r"bad.jinja:2: not a usable chat template") as e:
        load_chat_template(plain, tmp_path / "bad.jinja")
    assert e.value.line == 2 and not has_chat_template(plain)
    (tmp_path / "silent.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match="ends an assistant turn with nothing"):
        load_chat_template(plain, tmp_path / "silent.jinja")
    with pytest.raises(DataError, match="file not found"):
        load_chat_template(plain, tmp_path / "missing.jinja")


def test_template_that_rewrites_earlier_turns_needs_generation_tags():
    """Like Qwen 3, which drops earlier turns' reasoning: a conversation's start renders unlike the whole."""
    tok = plain_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_UNMARKED.replace("message.content + '<|im_end|>'",
                                                "(message.content if loop.last else '...') + '<|im_end|>'")
    with pytest.raises(ValueError, match="generation"):
        encode_demo(tok, Demo(THREE_TURNS[:2], THREE_TURNS[2:]), 1000, False)


def test_world_template_reproduces_the_world_token_for_token(world_dir, tiny_lm_dir):
    """The embedded world's data in messages form, through its chat template, gives exactly today's plain ids."""
    from instructrl.data import read_demos, read_prompts
    from instructrl.models import load_tokenizer
    from instructrl.world import CHAT_TEMPLATE, format_prompt

    plain = load_tokenizer(tiny_lm_dir)
    chat = load_chat_template(load_tokenizer(tiny_lm_dir), CHAT_TEMPLATE)
    assert end_of_turn_ids(chat) == end_of_turn_ids(plain) == [plain.eos_token_id]

    def as_messages(prompt):
        question = prompt.removeprefix("User: ").removesuffix("\nAssistant:")
        assert format_prompt(question) == prompt
        return [user(question)]

    demos = read_demos(world_dir / "demos.jsonl")
    for p, r in demos:
        ids, n_prompt = encode_example(plain, p, r, 128, False)
        assert encode_demo(chat, Demo(as_messages(p), [assistant(r)]), 128, False) == \
               (ids, [0] * n_prompt + [1] * (len(ids) - n_prompt))
    prompts = read_prompts(world_dir / "prompts_train.jsonl") + read_prompts(world_dir / "prompts_eval.jsonl")
    assert encode_prompts(chat, [as_messages(p) for p in prompts], 128) == encode_prompts(plain, prompts, 128)
    assert len(demos) == 120 and len(prompts) == 240


@pytest.mark.parametrize("template, says", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "more than 0.5 s"),
    ("{% for i in range(100000) %}{% for m in messages %}{{ m.content * 20 }}{% endfor %}{% endfor %}",
     "more than 1,000,000 characters"),
    ("{{ 'x' * 10**10 }}", "repeats a sequence 10000000000 times"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
])
def test_user_template_that_loops_or_explodes_is_refused_in_one_line(template, says, tmp_path, monkeypatch):
    """A --chat-template renders first in a sandbox with limits on time, output and repetitions."""
    import time

    from instructrl import chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    (tmp_path / "t.jinja").write_text(template)
    plain = plain_tokenizer()
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="not a usable chat template") as e:
        load_chat_template(plain, tmp_path / "t.jinja")
    assert says in str(e.value) and "\n" not in str(e.value) and not has_chat_template(plain)
    assert time.perf_counter() - t0 < 3


def test_looping_template_through_the_cli_exits_2(tmp_path, tiny_lm_dir, world_dir, monkeypatch, capsys):
    import sys

    from instructrl import chat, cli

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    (tmp_path / "loop.jinja").write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                         "{% endfor %}")
    monkeypatch.setattr(sys, "argv", ["instructrl", "sft", "--model", str(tiny_lm_dir), "--data",
                                      str(world_dir / "demos.jsonl"), "--out", str(tmp_path / "out"),
                                      "--chat-template", str(tmp_path / "loop.jinja"), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "loop.jinja" in err and "0.5 s" in err, err
    assert not (tmp_path / "out").exists()
