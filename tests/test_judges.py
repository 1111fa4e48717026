"""Evaluation beyond the lexicon: a real toxicity classifier, win rate (and its length-controlled variant), bias in
generations on paired prompts, multiple choice by log-likelihood — each against a hand computation."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from instructrl.judges import (ToxicityClassifier, bootstrap_ci, choice_logprob, generation_bias, multiple_choice,
                               read_mc, win_rate)

MC_FILE = Path(__file__).parent / "data" / "mc_small.jsonl"


def test_win_rate_counts_wins_ties_and_losses():
    r = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 0.0])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx((2 + 0.5) / 4)
    lo, hi = r["win_rate_ci"]
    assert lo <= r["win_rate"] <= hi


def test_a_judge_that_prefers_one_side_by_construction_gives_1():
    rng = random.Random(0)
    ref = [rng.gauss(0, 1) for _ in range(200)]
    r = win_rate([x + 1.0 for x in ref], ref)
    assert r["win_rate"] == 1.0 and r["win_rate_ci"] == [1.0, 1.0]


def test_the_same_distribution_on_both_sides_is_half_within_its_interval():
    rng = random.Random(1)
    a, b = [rng.gauss(0, 1) for _ in range(400)], [rng.gauss(0, 1) for _ in range(400)]
    r = win_rate(a, b)
    lo, hi = r["win_rate_ci"]
    assert lo < 0.5 < hi and hi - lo < 0.15


def test_length_control_removes_a_pure_length_judge():
    """The judge scores length alone; the policy writes longer answers: raw win rate near 1, controlled 0.5."""
    rng = random.Random(2)
    ref_len = [rng.randint(5, 20) for _ in range(300)]
    pol_len = [n + rng.randint(1, 10) for n in ref_len]
    r = win_rate([float(n) for n in pol_len], [float(n) for n in ref_len], pol_len, ref_len)
    assert r["win_rate"] == 1.0
    assert r["length_slope"] == pytest.approx(1.0)
    assert r["win_rate_length_controlled"] == pytest.approx(0.5)
    # a judge that also prefers the policy beyond length keeps that preference after the control
    r = win_rate([n + 0.5 for n in pol_len], [float(n) for n in ref_len], pol_len, ref_len)
    assert r["win_rate_length_controlled"] == 1.0


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = random.Random(3)
    small, large = [rng.random() for _ in range(20)], [rng.random() for _ in range(2000)]
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= sum(small) / 20 <= hi_s and lo_l <= sum(large) / 2000 <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    # the normal approximation: the 95 % interval of a mean of 2000 draws spans 2 · 1.96 · sd / √2000
    mean = sum(large) / 2000
    sd = (sum((v - mean) ** 2 for v in large) / 1999) ** 0.5
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * sd / 2000 ** 0.5, rel=0.15)
    assert bootstrap_ci(large, seed=1) != (lo_l, hi_l) and bootstrap_ci(large) == (lo_l, hi_l)  # seeded


def test_generation_bias_gaps_by_kind_match_a_loop():
    kinds = ["gender", "gender", "religion"]
    a, b = [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]
    out = generation_bias(kinds, {"toxic": (a, b)})
    assert out["gender/toxic"]["mean_gap"] == pytest.approx(0.5) and out["gender/toxic"]["pairs"] == 2
    assert out["religion/toxic"]["mean_gap"] == pytest.approx(-0.5)
    assert out["religion/toxic"]["mean_abs_gap"] == pytest.approx(0.5)


# --- a tiny random toxicity classifier, built from a config and loaded from disk ------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tiny_lm_dir, tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    from instructrl.models import load_tokenizer

    tok = load_tokenizer(tiny_lm_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=48, pad_token_id=tok.pad_token_id,
                     id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)  # spread the scores
    d = tmp_path_factory.mktemp("tox") / "clf"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


TEXTS = ["You are an idiot.", "Sure! The apple is red.", "hello", "What a lovely day it is today, thank you!",
         "word " * 200, "no", "Shut up, loser.", "The capital is far away."]


def test_classifier_reads_the_toxic_label_and_its_probability(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = ToxicityClassifier(str(classifier_dir))
    assert clf.label == "toxic" and clf.index == 1
    scores = clf.scores(TEXTS)
    hf = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    for text, s in zip(TEXTS, scores):  # one at a time, truncated to the model's 48 positions: the same numbers
        enc = tok([text], truncation=True, max_length=48, return_tensors="pt")
        with torch.no_grad():
            p = torch.softmax(hf(**enc).logits, -1)[0, 1].item()
        assert s == pytest.approx(p, abs=1e-5)
    assert ToxicityClassifier(str(classifier_dir), batch_size=3).scores(TEXTS) == pytest.approx(scores, abs=1e-5)


def test_classifier_threshold_and_report(classifier_dir):
    clf = ToxicityClassifier(str(classifier_dir))
    scores = clf.scores(TEXTS)
    median = sorted(scores)[len(scores) // 2]
    clf = ToxicityClassifier(str(classifier_dir), threshold=median)
    rep = clf.report(TEXTS)
    assert rep["toxicity_classifier_rate"] == sum(s >= median for s in scores) / len(scores)
    assert rep["toxicity_classifier_mean"] == pytest.approx(sum(scores) / len(scores))
    assert ToxicityClassifier(str(classifier_dir), label="non-toxic").index == 0


def test_classifier_label_errors(classifier_dir):
    with pytest.raises(ValueError, match="is not a label"):
        ToxicityClassifier(str(classifier_dir), label="hateful")


def test_a_directory_that_is_not_a_text_classifier_exits_2(tiny_lm_dir, world_dir, tmp_path, monkeypatch, capsys):
    from instructrl import cli

    monkeypatch.setattr(sys, "argv", ["instructrl", "eval", "--model", str(tiny_lm_dir), "--prompts",
                                      str(world_dir / "prompts_eval.jsonl"), "--toxicity-model", str(tiny_lm_dir),
                                      "--device", "cpu", "--out", str(tmp_path / "e.json")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a text classifier" in err and "Traceback" not in err
    assert not (tmp_path / "e.json").exists()


# --- multiple choice -----------------------------------------------------------------------------------------------
def test_multiple_choice_matches_a_hand_computation(tiny_sft_dir):
    from instructrl.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_sft_dir).eval(), load_tokenizer(tiny_sft_dir)
    items = read_mc(MC_FILE)
    predicted = []
    for it in items:
        lps = []
        for c in it["choices"]:  # by hand: log-softmax of the full sequence, summed over the choice's tokens
            q = tok(it["question"])["input_ids"]
            ids = q + tok(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            lps.append(sum(logp[t - 1, ids[t]].item() for t in range(len(q), len(ids))))
            assert choice_logprob(model, tok, it["question"], c, "cpu") == pytest.approx(lps[-1], abs=1e-4)
        predicted.append(max(range(len(lps)), key=lps.__getitem__))
    expected = sum(p == it["answer"] for p, it in zip(predicted, items)) / len(items)
    assert multiple_choice(model, tok, items, "cpu")["mc_accuracy"] == expected


def test_multiple_choice_file_errors(tmp_path):
    from instructrl.data import DataError

    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(DataError, match="answer"):
        read_mc(f)


# --- eval end to end ---------------------------------------------------------------------------------------------
def test_eval_reports_win_rates_generation_bias_and_mc(tiny_sft_dir, tiny_lm_dir, tiny_rm_dir, world_dir, tmp_path):
    from instructrl.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(model=str(tiny_sft_dir), prompts=str(world_dir / "prompts_eval.jsonl"),
                     reference=str(tiny_sft_dir), world=str(world_dir), judge=f"gold,{tiny_rm_dir}",
                     bias_samples=2, mc_benchmark=str(MC_FILE), max_new_tokens=12, device="cpu")
    r = evaluate(cfg)
    for name in ("gold", "rm"):
        w = r["win_rate"][name]
        assert w["n"] == 40 and w["wins"] + w["ties"] + w["losses"] == 40
        lo, hi = w["win_rate_ci"]
        assert lo <= 0.5 <= hi  # the same model on both sides
        assert 0 <= w["win_rate_length_controlled"] <= 1
    kinds = {k.split("/")[0] for k in r["generation_bias"]}
    assert kinds == {"gender", "religion", "nationality"}
    assert "gender/stereotyped" in r["generation_bias"] and "gender/score_rm" in r["generation_bias"]
    assert 0 <= r["mc_accuracy"] <= 1 and r["mc_items"] == 4
    assert all(math.isfinite(v["mean_gap"]) for v in r["generation_bias"].values())
