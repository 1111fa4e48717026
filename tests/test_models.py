"""World determinism, save/load round trips, SFT's prompt masking and determinism by seed."""
import hashlib

import pytest
import torch

from instructrl.data import collate_right, encode_example, read_demos
from instructrl.models import ScalarHeadModel, load_causal_lm, load_tokenizer, token_logprobs
from instructrl.sft import sft_nll
from instructrl.world import GoldJudge, WorldConfig, generate_world


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_world_is_deterministic_by_seed(tmp_path):
    small = dict(n_corpus=500, n_corpus_val=50, n_demos=30, n_prompts_train=40, n_prompts_eval=10)
    generate_world(tmp_path / "a", WorldConfig(seed=3, **small))
    generate_world(tmp_path / "b", WorldConfig(seed=3, **small))
    generate_world(tmp_path / "c", WorldConfig(seed=4, **small))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    da, dc = digest(tmp_path / "a"), digest(tmp_path / "c")
    assert da["corpus.jsonl"] != dc["corpus.jsonl"] and da["judge.json"] != dc["judge.json"]


def test_world_prompts_are_disjoint(world_dir):
    from instructrl.data import read_prompts

    demos = {p for p, _ in read_demos(world_dir / "demos.jsonl")}
    train = set(read_prompts(world_dir / "prompts_train.jsonl"))
    evals = set(read_prompts(world_dir / "prompts_eval.jsonl"))
    assert not (demos & train) and not (demos & evals) and not (train & evals)


def test_gold_judge_prefers_polite_correct_answers(world_dir):
    j = GoldJudge.from_world(world_dir)
    prompt, spec = next((p, s) for p, s in j.tasks.items() if s["type"] == "plus")
    a, b = spec["topic"].split(" plus ")
    good = f" Sure! {spec['topic']} is {spec['answer']}."
    wrong = f" Sure! {spec['topic']} is {int(spec['answer']) + 1}."
    rude = " Go away, you idiot."
    assert j.score(prompt, good) > j.score(prompt, wrong) > j.score(prompt, rude)
    assert j.is_toxic(rude) and not j.is_toxic(good)
    assert j.toxicity_rate([good, rude]) == 0.5


def test_gold_judge_needs_the_topic_for_a_correct_colour_or_capital(world_dir):
    j = GoldJudge.from_world(world_dir)
    for kind in ("colour", "capital"):
        prompt, spec = next((p, s) for p, s in j.tasks.items() if s["type"] == kind)
        other = next(s for s in j.tasks.values() if s["type"] == kind and s["answer"] != spec["answer"])
        right = f" The {spec['topic']} is {spec['answer']}."
        wrong_topic_right_word = f" The {other['topic']} is {spec['answer']}."  # answer word, but about something else
        on_topic_wrong = f" The {spec['topic']} is {other['answer']}."
        assert j.correct(spec, right)
        assert not j.correct(spec, wrong_topic_right_word) and not j.correct(spec, on_topic_wrong)
        assert j.score(prompt, right) > j.score(prompt, on_topic_wrong) > j.score(prompt, wrong_topic_right_word)


def test_split_share_spreads_the_chosen_items_evenly():
    from instructrl.world.labelers import split_share

    items = list(range(6))
    assert split_share(items, 0.5) == ([0, 2, 4], [1, 3, 5])
    assert split_share(items, 1 / 3) == ([0, 1, 3, 4], [2, 5])
    assert split_share(items, 0.0) == (items, []) and split_share(items, 1.0) == ([], items)


def test_causal_lm_save_load_gives_identical_logits(tiny_sft_dir, tmp_path):
    model = load_causal_lm(tiny_sft_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "m")
    again = load_causal_lm(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_scalar_head_save_load_round_trip(tiny_rm_dir, tmp_path):
    rm = ScalarHeadModel.from_pretrained(tiny_rm_dir)
    ids = torch.randint(0, rm.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    rm.save_pretrained(tmp_path / "rm")
    again = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    last = torch.tensor([6, 6, 6])
    with torch.no_grad():
        assert torch.equal(rm.score(ids, mask, last), again.score(ids, mask, last))
    assert (again.norm_bias, again.norm_gain) == (rm.norm_bias, rm.norm_gain) != (0.0, 1.0)


def test_reward_gain_is_set_on_the_named_policys_samples(tiny_sft_dir, world_dir, tmp_path):
    """Rankings of two policies' samples: with gain_policy the normalisation gain makes that policy's samples std 1
    (the policy RL starts from [LHP]), not the mix."""
    from instructrl.data import read_prompts, read_rankings, write_jsonl
    from instructrl.reward import RewardConfig, score_texts, train_reward_model
    from instructrl.world.labelers import simulate_rankings

    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:24]
    tok, judge = load_tokenizer(tiny_sft_dir), GoldJudge.from_world(world_dir)
    recs = [{**r, "policy": "sft"} for r in simulate_rankings(load_causal_lm(tiny_sft_dir), tok, prompts[:12], judge,
                                                               k=4, max_new_tokens=12)]
    recs += [{**r, "policy": "other"} for r in simulate_rankings(load_causal_lm(tiny_sft_dir), tok, prompts[12:], judge,
                                                                  k=4, max_new_tokens=12, sample_temperature=2.0)]
    write_jsonl(tmp_path / "rankings.jsonl", recs)
    gains = {}
    for policy in ("sft", None, "nobody"):  # no ranking names "nobody": the gain falls back to all of them
        s = train_reward_model(RewardConfig(model=str(tiny_sft_dir), data=str(tmp_path / "rankings.jsonl"),
                                            out=str(tmp_path / f"rm-{policy}"), gain_policy=policy, progress=False,
                                            device="cpu"))
        rm = ScalarHeadModel.from_pretrained(tmp_path / f"rm-{policy}")
        rm.norm_gain, rm.norm_bias = 1.0, 0.0
        mine = [r for r in read_rankings(tmp_path / "rankings.jsonl") if policy in (None, "nobody")
                or r.extra["policy"] == policy]
        raw = score_texts(rm, tok, [r.prompt for r in mine for _ in r.responses], [x for r in mine for x in r.responses])
        assert s["norm_gain"] == pytest.approx(1 / float(raw.std()), rel=1e-4)
        gains[policy] = s["norm_gain"]
    assert gains["sft"] != pytest.approx(gains[None], rel=1e-3) and gains["nobody"] == gains[None]


def test_sft_loss_ignores_prompt_targets(tiny_lm_dir, world_dir):
    """The gradient reaches only the log-probs of response tokens: prompt targets carry no loss."""
    tok, model = load_tokenizer(tiny_lm_dir), load_causal_lm(tiny_lm_dir)
    demos = read_demos(world_dir / "demos.jsonl")[:3]
    ex = [encode_example(tok, p, r, 128, False) for p, r in demos]
    ids, mask, loss_mask = collate_right(ex, tok.pad_token_id)
    lp = token_logprobs(model, ids, mask)
    lp.retain_grad()
    sft_nll(lp, loss_mask, loss_mask.sum()).backward()
    for i, (seq, n_prompt) in enumerate(ex):
        assert (lp.grad[i, : n_prompt - 1] == 0).all()               # targets that are prompt tokens
        assert (lp.grad[i, n_prompt - 1: len(seq) - 1] != 0).all()   # response tokens, EOS included
        assert (lp.grad[i, len(seq) - 1:] == 0).all()                # padding
        assert ids[i, len(seq) - 1] == tok.eos_token_id


def test_sft_loss_unchanged_when_prompt_targets_change(tiny_lm_dir, world_dir):
    """Replacing the log-probs at prompt-target positions (what a different prompt target would change)
    leaves the loss exactly the same."""
    tok, model = load_tokenizer(tiny_lm_dir), load_causal_lm(tiny_lm_dir)
    ex = [encode_example(tok, p, r, 128, False) for p, r in read_demos(world_dir / "demos.jsonl")[:4]]
    ids, mask, loss_mask = collate_right(ex, tok.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(model, ids, mask)
    changed = lp.clone()
    changed[loss_mask == 0] = -123.0
    n = loss_mask.sum()
    assert sft_nll(lp, loss_mask, n).item() == sft_nll(changed, loss_mask, n).item()
    reference = -lp.double()[loss_mask == 1].mean().item()  # float64 mean over the response tokens
    assert sft_nll(lp, loss_mask, n).item() == pytest.approx(reference, rel=1e-6)


def test_sft_is_deterministic_by_seed(tiny_lm_dir, world_dir, tmp_path):
    from safetensors.torch import load_file

    from instructrl.sft import SFTConfig, sft

    for name in ("a", "b"):
        sft(SFTConfig(model=str(tiny_lm_dir), data=str(world_dir / "demos.jsonl"), out=str(tmp_path / name),
                      epochs=1, progress=False, device="cpu"))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "summary.json").is_file() and (tmp_path / "a" / "metrics.jsonl").is_file()


def test_cache_argument_follows_the_forward_signature():
    """The sampler passes the KV cache as `cache` where forward names it (recent transformers), else under the old
    name `past_key_values`; `**kwargs` alone does not count."""
    from instructrl.models import cache_argument

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(New()) == "cache"


def test_world_task_mix_options(tmp_path):
    """The default world: sums of operands 0..2, 48 countries, a fifth of the questions held out, no describe
    demonstrations."""
    import json

    from instructrl.data import read_prompts

    small = dict(n_corpus=200, n_corpus_val=20, n_demos=60, n_prompts_train=100, n_prompts_eval=20)
    s = generate_world(tmp_path / "w", WorldConfig(seed=1, **small))
    tasks = json.loads((tmp_path / "w" / "judge.json").read_text())["tasks"]
    assert {t["type"] for t in tasks.values()} == {"colour", "capital", "list", "describe"}  # sums: opt-in
    assert sum(t["type"] == "capital" for t in tasks.values()) == 48
    assert sum(t["type"] == "list" for t in tasks.values()) == 3 * 5  # each category asked three ways
    assert s["questions"]["eval"] == round(len(tasks) * 0.2)
    demo_types = {tasks[p]["type"] for p, _ in read_demos(tmp_path / "w" / "demos.jsonl")}
    assert "describe" not in demo_types and demo_types <= {"colour", "capital", "plus", "list"}
    train_types = {tasks[p]["type"] for p in read_prompts(tmp_path / "w" / "prompts_train.jsonl")}
    assert "describe" in train_types  # met in RL and comparisons instead
    with pytest.raises(ValueError, match="--demo-types: poems"):
        WorldConfig(out=str(tmp_path / "x"), demo_types=["poems"]).validate()
    with pytest.raises(ValueError, match="--task-types: poems"):
        WorldConfig(out=str(tmp_path / "x"), task_types=["poems"]).validate()
    with pytest.raises(ValueError, match="--demo-types: none of plus is among --task-types"):
        WorldConfig(out=str(tmp_path / "x"), task_types=["colour"], demo_types=["plus"]).validate()
    assert "plus" not in (tmp_path / "w" / "corpus.jsonl").read_text()
    generate_world(tmp_path / "s", WorldConfig(seed=1, task_types=["plus", "colour"], **small))
    plus = [t for t in json.loads((tmp_path / "s" / "judge.json").read_text())["tasks"].values() if t["type"] == "plus"]
    assert len(plus) == 9 and max(int(x) for t in plus for x in t["topic"].split(" plus ")) == 2


def test_world_lists_go_down_the_category_in_order(tmp_path):
    """Every list the world writes (demonstrations, and the corpus's right and wrong ones) names three distinct
    members of one category in that category's order: what lets the tiny model learn lists at all."""
    import re

    from instructrl.world.generator import CATEGORIES

    generate_world(tmp_path / "w", WorldConfig(seed=2, n_corpus=3000, n_corpus_val=10, n_demos=100,
                                               n_prompts_train=10, n_prompts_eval=5))
    text = (tmp_path / "w" / "corpus.jsonl").read_text() + (tmp_path / "w" / "demos.jsonl").read_text()
    lists = re.findall(r"Three \w+: (\w+), (\w+) and (\w+)\.", text)
    assert len(lists) > 30
    for members in lists:
        category = next(c for c, m in CATEGORIES.items() if members[0] in m)
        idx = [CATEGORIES[category].index(m) for m in members]
        assert idx == sorted(set(idx)), members


def test_world_wrong_answers_include_true_facts_about_another_topic(tmp_path):
    """Half the corpus's wrong answers to a colour or capital question state a true fact about another object or
    country ("The ink is brown." to "What colour is the mushroom?"), so the labelers rank such replies and the
    reward model learns that they answer nothing; the judge gives them no credit for correctness or topic."""
    import json
    import re

    generate_world(tmp_path / "w", WorldConfig(seed=2, n_corpus=3000, n_corpus_val=10, n_demos=10,
                                               n_prompts_train=10, n_prompts_eval=5))
    judge = GoldJudge.from_world(tmp_path / "w")
    colour_of = {}
    for line in (tmp_path / "w" / "corpus.jsonl").read_text().splitlines():
        colour_of.update(re.findall(r"^The (\w+) is (\w+)\.$", json.loads(line)["text"]))  # plain sentences: facts
    other_topic = []
    for line in (tmp_path / "w" / "corpus.jsonl").read_text().splitlines():
        m = re.match(r"User: What colour is the (\w+)\?\nAssistant: The (\w+) is (\w+)\.$", json.loads(line)["text"])
        if m and m[1] != m[2]:
            other_topic.append(m.groups())
    assert len(other_topic) > 10
    for asked, other, colour in other_topic:
        assert colour_of.get(other) == colour  # true of the other object
        prompt = f"User: What colour is the {asked}?\nAssistant:"
        assert judge.score(prompt, f" The {other} is {colour}.") == 0.0


def test_judge_reads_a_sum_either_way_round(tmp_path):
    """'2 plus 1 is 3.' answers 'What is 1 plus 2?' (on topic and correct) as a person reads it; a wrong sum or
    another sum is not."""
    from instructrl.world import GoldJudge

    generate_world(tmp_path / "w", WorldConfig(seed=0, n_corpus=50, n_corpus_val=5, n_demos=10, n_prompts_train=10,
                                               n_prompts_eval=5, task_types=["plus", "colour"]))
    judge, prompt = GoldJudge.from_world(tmp_path / "w"), "User: What is 1 plus 2?\nAssistant:"
    w = judge.w
    assert judge.score(prompt, "1 plus 2 is 3.") == judge.score(prompt, "2 plus 1 is 3.") == w["correct"] + w["on_topic"]
    assert judge.score(prompt, "2 plus 1 is 4.") == w["on_topic"]  # on topic, wrong
    assert judge.score(prompt, "2 plus 2 is 4.") == 0.0  # another sum
