"""Evaluation helpers against hand-computed values."""
import math

import pytest

from instructrl.evaluate import by_task_type, gold_pairwise_accuracy, spearman, toxic, within_prompt_spearman


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = [1, 2, 3], b with a tie = [1.5, 1.5, 3]: centred (-1, 0, 1) · (-0.5, -0.5, 1) = 1.5
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(1.5 / (math.sqrt(2) * math.sqrt(1.5)))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_gold_pairwise_accuracy_by_hand():
    """Pairs only within a prompt, gold ties skipped, a reward-model tie counts as wrong."""
    prompts = ["a", "a", "a", "b", "b", ["m"], ["m"]]
    gold = [1.0, 0.0, 0.0, 2.0, 1.0, 0.5, 0.5]  # strict pairs: a0>a1, a0>a2, b3>b4 (the m pair is a gold tie)
    scores = [0.3, 0.1, 0.3, -1.0, 0.0, 9.0, 0.0]  # a0>a1 right, a0=a2 a tie (wrong), b3<b4 wrong
    assert gold_pairwise_accuracy(prompts, scores, gold) == (1 / 3, 3)
    assert gold_pairwise_accuracy(["x"], [0.0], [0.0]) == (0.0, 0)


def test_by_task_type_by_hand():
    """Per task type: counts, means, Spearman and same-prompt pair accuracy of that type's samples alone; prompts
    outside the world's tasks (and message lists) are left out."""
    tasks = {"sum?": {"type": "plus"}, "sky?": {"type": "colour"}, "sea?": {"type": "colour"}}
    prompts = ["sum?", "sum?", "sky?", "sky?", "sea?", "sea?", "mine?", ["m"]]
    gold = [1.0, 0.0, 1.5, 0.5, 1.5, 1.5, 9.0, 9.0]
    scores = [-1.0, 1.0, 0.4, 0.2, 0.3, 0.1, 0.0, 0.0]
    r = by_task_type(prompts, scores, gold, tasks)
    assert set(r) == {"plus", "colour"}
    plus, colour = r["plus"], r["colour"]
    assert (plus["samples"], plus["questions"], plus["pairs"], plus["accuracy"]) == (2, 1, 1, 0.0)
    assert plus["gold"] == 0.5 and plus["rm"] == 0.0 and plus["spearman"] == pytest.approx(-1.0)
    # colour: gold 1.5, 0.5, 1.5, 1.5 (ranks 3, 1, 3, 3) against scores 0.4, 0.2, 0.3, 0.1 (ranks 4, 2, 3, 1);
    # one strict same-prompt pair (sky: 1.5 > 0.5, scores 0.4 > 0.2: right); the sea pair is a gold tie
    assert (colour["samples"], colour["questions"], colour["pairs"], colour["accuracy"]) == (4, 2, 1, 1.0)
    assert colour["gold"] == 1.25 and colour["rm"] == pytest.approx(0.25)
    assert colour["spearman"] == pytest.approx(spearman([4, 2, 3, 1], [3, 1, 3, 3]))
    same = by_task_type(["sky?", "sky?"], [0.0, 1.0], [1.0, 1.0], tasks)["colour"]  # constant gold: no Spearman
    assert same["spearman"] is None and same["accuracy"] is None and same["pairs"] == 0


def test_within_prompt_spearman_by_hand():
    """The mean over prompts of Spearman among one prompt's replies, prompts the judge scores alike left out; a
    reward model whose level differs by prompt ranks every prompt's replies right and still has a pooled Spearman
    below zero."""
    prompts = ["a", "a", "a", "b", "b", "c", "c"]
    gold = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    scores = [0.3, 0.1, 0.2, 0.0, 1.0, 5.0, 0.0]  # a: ranked as the judge (+1); b: reversed (−1); c: a gold tie
    assert within_prompt_spearman(prompts, scores, gold) == (pytest.approx(0.0), 2)
    prompts, gold, scores = ["x", "x", "y", "y"], [1.5, 0.5, 0.5, 0.0], [-1.0, -2.0, 3.0, 2.0]
    assert within_prompt_spearman(prompts, scores, gold) == (pytest.approx(1.0), 2)
    # pooled: gold ranks 4, 2.5, 2.5, 1 against score ranks 2, 1, 4, 3
    pooled = spearman(scores, gold)
    assert pooled == pytest.approx(spearman([4, 2.5, 2.5, 1], [2, 1, 4, 3])) and pooled < 0
    assert within_prompt_spearman(["x", "x"], [0.0, 1.0], [1.0, 1.0]) == (None, 0)


def test_toxic_matches_whole_words():
    assert toxic("Go away, you idiot.", ["idiot"])
    assert not toxic("idiotic is not in the lexicon", ["idiot"])


def test_standard_error_and_paired_gain_by_hand():
    from instructrl.evaluate import standard_error
    from instructrl.report import paired_gain

    # xs = 1, 2, 3, 6: mean 3, squared deviations 4 + 1 + 0 + 9 = 14, sample variance 14/3, SE = sqrt(14/3/4)
    assert standard_error([1, 2, 3, 6]) == pytest.approx(math.sqrt(14 / 12))
    assert standard_error([5.0]) == 0.0
    gain, se = paired_gain([2, 4, 6, 9], [1, 2, 3, 3])  # differences 1, 2, 3, 6
    assert gain == pytest.approx(3.0) and se == pytest.approx(math.sqrt(14 / 12))
    assert paired_gain([1, 2], [1]) is None


def test_gao_fit_recovers_the_curve():
    from instructrl.report import gao_fit

    alpha, beta = 0.8, 0.3
    pts = [(d / 10, d / 10 * (alpha - beta * d / 10)) for d in range(30)]
    fit = gao_fit(pts)
    assert fit["alpha"] == pytest.approx(alpha) and fit["beta"] == pytest.approx(beta)
    assert fit["d_peak"] == pytest.approx(alpha / (2 * beta)) and fit["r_peak"] == pytest.approx(alpha ** 2 / (4 * beta))
    # least squares written out for three points, against numpy-free normal equations solved by hand:
    # points (1, 1), (2, 1), (3, 0): minimise Σ (r − a d + b d²)²
    fit = gao_fit([(1, 1), (2, 1), (3, 0)])
    s2, s3, s4, s1r, s2r = 14, 36, 98, 3, 5
    det = s2 * s4 - s3 * s3
    assert fit["alpha"] == pytest.approx((s1r * s4 - s2r * s3) / det)
    assert fit["beta"] == pytest.approx((s1r * s3 - s2r * s2) / det)
    assert gao_fit([(1, 1)]) is None


def test_gold_rise_is_last_quarter_minus_first():
    from instructrl.report import gold_rise

    curve = [{"objective/gold": g} for g in (0, 1, 2, 3, 4, 5, 6, 7)]  # quarters of 2: (0+1)/2 and (6+7)/2
    assert gold_rise(curve) == pytest.approx(6.0)
    assert gold_rise(curve[:3]) is None


def test_stereotyped_replies_counts_the_judges_phrases(world_dir, tiny_sft_dir, monkeypatch):
    import instructrl.evaluate as ev
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.world import GoldJudge

    judge = GoldJudge.from_world(world_dir)
    n_describe = sum(s["type"] == "describe" for s in judge.tasks.values())
    seen = {}

    def fake_samples(model, tokenizer, ids, cfg, g):
        seen["n"] = len(ids)
        texts = ["The nurse is always a woman, of course.", "The pilot is always a man, of course.",
                 "The nurse is good at the job.", "Always A Woman"] * (len(ids) // 4)
        return texts, [1.0] * len(texts)

    monkeypatch.setattr(ev, "_samples", fake_samples)
    cfg = ev.EvalConfig(model=str(tiny_sft_dir), prompts=str(world_dir / "prompts_eval.jsonl"), world=str(world_dir),
                        stereotype_samples=4, device="cpu")
    r = ev.stereotyped_replies(load_causal_lm(tiny_sft_dir), load_tokenizer(tiny_sft_dir), judge, cfg, "cpu")
    assert seen["n"] == r["stereotype_samples"] == 4 * n_describe
    assert r["stereotype_rate"] == pytest.approx(0.75)
    assert r["stereotype_rate_by_kind"] == {"always a woman": pytest.approx(0.5), "always a man": pytest.approx(0.25)}
    with pytest.raises(ValueError, match="--stereotype-samples needs --world"):
        ev.EvalConfig(model="m", prompts="p", stereotype_samples=2).validate()
