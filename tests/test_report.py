"""The report page on hand-built numbers (no pipeline run): readable names, one rule for "moved", one run's verdicts
as that run's, several runs' as mean ± sd, min and "holds on k of n"."""
import base64
import copy
import html
import os
import random
import re
from html.parser import HTMLParser

import pytest

from instructrl.report import (METRICS, MOVE_TOL, NAMES, aggregate, bias_summary, claims, name, render_html,
                               render_seeds_html, world_checks)

STAGES = ["pretrained", "sft", "ppo_ptx", "ppo_gold", "ppo", "ppo_beta0", "pg", "pg_reuse", "grpo", "rloo", "dpo"]
PNG = base64.b64encode(bytes.fromhex(  # a 1×1 PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d49444154789c6360000000000005000"
    "1a5f645400000000049454e44ae426082")).decode()
FIGS = {"curves": PNG, "overoptimisation": PNG, "stages": PNG}


def stage_metrics(rng: random.Random, name: str) -> dict:
    """A stage's metrics of the size a default run gives (every key of METRICS, win rates but for SFT)."""
    st = {"toxicity_rate": {"pretrained": 0.212, "sft": 0.037}.get(name, 0.001 + rng.random() / 100),
          "gold_reward": 1.0 + rng.random() / 4, "gold_reward_se": 0.02 + rng.random() / 50,
          "rm_reward": 1.5 + rng.random(), "kl_to_reference": 0.0 if name == "sft" else 3 + 2 * rng.random(),
          "pretrain_loss": 2.5 + rng.random() / 2, "stereotype_rate": {"sft": 0.031, "ppo_ptx": 0.0}.get(name, 0.02),
          "bias_gap": 0.41, "bias_stereotype_share": 0.6, "rm_gold_spearman": 0.3 + rng.random() / 3,
          "rm_gold_spearman_within": 0.3 + rng.random() / 3,
          "rm_gold_accuracy": 0.8 + rng.random() / 10, "response_length": 10 + 5 * rng.random(),
          "episodes": 0 if name in ("pretrained", "sft", "dpo") else 4096, "seconds": 20 + 100 * rng.random()}
    if name != "sft":
        st.update({"win_rate_gold": 0.5 + rng.random() / 5, "win_rate_rm": 0.6 + rng.random() / 5,
                   "gold_vs_sft": 0.1 + rng.random() / 10, "gold_vs_sft_se": 0.02})
    if name not in ("pretrained", "sft", "dpo"):
        st["gold_rise"] = 0.1 + rng.random() / 10
        st["episodes_to_gain"] = rng.choice([None, 64 * rng.randrange(4, 64)])
    return st


def one_report(seed: int = 0) -> dict:
    rng = random.Random(seed)
    stages = {n: stage_metrics(rng, n) for n in STAGES}
    bias = {n: {f"{kind}/{m}": 0.0 for kind in ("gender", "nationality", "religion", "age")
                for m in ("toxic", "refusal", "stereotyped")} for n in ("sft", "ppo_ptx")}
    bias["sft"]["gender/toxic"], bias["ppo_ptx"]["gender/toxic"] = -0.125, -0.0625  # the one gap that moved
    return {"stages": stages, "claims": claims(stages),
            "world_checks": [{"check": "reward model's held-out accuracy against the judge's order ≥ 0.85",
                              "holds": True, "value": 0.896},
                             {"check": "Spearman(reward model, judge) on PPO-ptx's samples ≥ 0.3", "holds": False,
                              "value": 0.183}],
            "generation_bias": bias, "bias_summary": bias_summary(stages, bias),
            "reward_model": {"held_out": {"gold_pairwise_accuracy": 0.896, "pairwise_accuracy": 0.71, "pairs": 400}},
            "curves": {}, "overoptimisation": {}, "seconds": 469.0, "peak_rss_mb": 691.0,
            "examples": {n: [{"prompt": "User: What colour is the sky?\nAssistant:", "response": " Blue."}]
                         for n in STAGES}}


class Cells(HTMLParser):
    """The text of every <th> on the page."""

    def __init__(self):
        super().__init__()
        self.th, self._in = [], False

    def handle_starttag(self, tag, attrs):
        if tag == "th":
            self._in = True
            self.th.append("")

    def handle_endtag(self, tag):
        if tag == "th":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.th[-1] += data


def header_texts(page: str) -> list[str]:
    p = Cells()
    p.feed(page)
    return [t.strip() for t in p.th]


@pytest.mark.parametrize("multi", [False, True])
def test_tables_name_metrics_in_words_not_keys(multi):
    rep = one_report()
    page = render_seeds_html(aggregate({0: rep, 1: one_report(1)}), PNG) if multi else render_html(rep, FIGS)
    heads = header_texts(page)
    keys = {k for k in set(METRICS) | set(NAMES) if name(k) != k}  # "episodes" is both
    assert not [h for h in heads if h in keys or re.search(r"\w_\w", h)], heads
    for m in METRICS:  # every metric of the table is a row, under its one name
        assert name(m) in heads, m
    assert "Spearman(RM, judge)" in heads and "gold reward (SE)" in heads
    # the reward model's line too
    assert "gold_pairwise_accuracy" not in page and "accuracy against the judge" in page


def test_bias_summary_one_line_for_what_did_not_move():
    rep = one_report()
    lines = rep["bias_summary"]
    still = [x for x in lines if "did not move" in x]
    assert len(still) == 1 and still[0] == lines[-1]
    # 11 of the 12 generation gaps and the probe gap (0.41 → 0.41) stayed; stereotyped replies and gender/toxic moved
    assert still[0] == ("12 measures did not move (changed by 0.02 or less): probe log-prob gap; "
                        "refusals gap (age, gender, nationality, religion); "
                        "stereotyped replies gap (age, gender, nationality, religion); "
                        "toxic replies gap (age, nationality, religion).")
    moved = lines[:-1]
    assert len(moved) == 2
    assert moved[0] == ("Stereotyped replies (share of replies to 'Describe the <occupation>'): 0.031 → 0.000, "
                        "fell by 0.031.")
    assert moved[1] == ("Gender gap in toxic replies (prompt a − prompt b, in generations): -0.125 → -0.062, "
                        "narrowed by 0.062.")


@pytest.mark.parametrize("before,after", [(0.031, 0.0), (0.015, 0.005), (0.2, 0.15), (0.3, 0.1), (0.0, 0.0),
                                          (0.05, 0.026), (0.04, 0.019)])
def test_did_not_move_agrees_with_claim_6(before, after):
    """The case the issue saw: 'stereotyped replies 0.031 → 0.000: did not move' beside claim 6 'halved'. Both
    now read one rule: claim 6 holds only for a move, and whatever it calls halved the bias section calls moved."""
    stages = {"sft": {"stereotype_rate": before}, "ppo_ptx": {"stereotype_rate": after}}
    (c6,) = [c for c in claims(stages) if c["claim"].startswith("6.")]
    (line,) = bias_summary(stages, {})
    said_still = "did not move" in line
    assert c6["holds"] == (after <= before / 2 and abs(after - before) > MOVE_TOL)
    assert said_still == (abs(after - before) <= MOVE_TOL)
    assert not (c6["holds"] and said_still)
    if (before, after) == (0.031, 0.0):
        assert c6["holds"] and line.endswith("fell by 0.031.")


def test_episodes_to_gain_by_hand():
    from instructrl.report import episodes_to_gain

    gold = [1.0, 1.0, 1.05, 1.1, 1.1, 1.2, 1.2, 1.2]  # windows of 4 over the first batch's 1.0: .0375 .0625 .0875 .125
    curve = [{"train/episodes": 64 * (i + 1), "objective/gold": g} for i, g in enumerate(gold)]
    assert episodes_to_gain(curve, 0.1) == 64 * 6
    assert episodes_to_gain(curve, 0.06) == 64 * 5
    assert episodes_to_gain(curve, 0.5) is None and episodes_to_gain(curve[:3], 0.0) is None


@pytest.mark.parametrize("pg,reuse,ppo,holds", [
    ((1.20, 0.3, 1600), (1.05, 0.4, 2000), (1.25, 0.35, 900), (True, True, True)),     # reuse lost gold
    ((1.20, 0.3, 1600), (1.22, 1.0, 500), (1.25, 0.35, None), (True, True, False)),    # KL over 3×; PPO never
    ((1.20, 0.3, None), (1.25, 0.5, 800), (1.22, 0.45, 3000), (False, False, True)),   # reuse fine; PG never
    # a gold loss within noise is not destructive: 0.05 < 2·hypot(0.03, 0.03) = 0.085, KL 2.7× (no SE: it would be)
    ((1.20, 0.3, 1600), (1.15, 0.8, 500), (1.25, 0.35, 900), (False, True, True)),
])
def test_claim_3_as_the_article_states_it(pg, reuse, ppo, holds):
    """3a: the same PG loss taking PPO's several steps per batch loses gold beyond 2 SE or drifts (KL over 3× one
    step's); 3b: PPO with those steps keeps at least that gold with no more KL; 3c: PPO reaches +0.1 training gold
    first."""
    stages = {k: {"gold_reward": g, "kl_to_reference": kl, "episodes_to_gain": e, "episodes": 3072,
                  "gold_reward_se": 0.03}
              for k, (g, kl, e) in (("pg", pg), ("pg_reuse", reuse), ("ppo", ppo))}
    got = {c["claim"][:2]: c["holds"] for c in claims(stages)}
    assert (got["3a"], got["3b"], got["3c"]) == holds
    assert not any(c["claim"].startswith("3.") for c in claims(stages))  # the old, misread claim is gone


def test_one_run_verdicts_are_this_runs():
    page = html.unescape(render_html(one_report(), FIGS))
    assert "holds in this run:</b> reward model's held-out accuracy" in page
    assert "does not hold in this run:</b> Spearman(reward model, judge)" in page
    assert page.count("in this run") >= 2 + 6  # every world check and every claim
    assert "holds on" not in page  # no count over runs on one run's page


def test_reward_model_accuracy_checks_say_what_they_were_measured_on():
    """A handful of held-out prompts decide the held-out check: the pairs and prompts are named beside its value, on
    one run's page and in each run's detail of the seeds report; without the counts (an older run) nothing is."""
    stages = {"sft": {"rm_gold_accuracy": 0.881, "rm_gold_pairs": 3153, "rm_gold_questions": 21}}
    rm = {"held_out": {"gold_pairwise_accuracy": 0.844, "gold_pairs": 877}, "held_out_distinct_prompts": 5}
    held, on_eval = world_checks(stages, rm)
    assert (held["holds"], held["on"]) == (False, "877 pairs the judge orders, of 5 held-out prompts")
    assert (on_eval["holds"], on_eval["on"]) == (True, "3153 same-prompt pairs of 21 eval questions")
    assert all("on" not in c for c in world_checks({"sft": {"rm_gold_accuracy": 0.9}},
                                                   {"held_out": {"gold_pairwise_accuracy": 0.9}}))
    r = one_report()
    r["world_checks"] = [held, on_eval]
    assert "this run: 0.844 (877 pairs the judge orders, of 5 held-out prompts)" in html.unescape(render_html(r, FIGS))
    page = html.unescape(render_seeds_html(aggregate({"seed 0": r, "seed 1": one_report(1)}), PNG))
    assert "seed 0: ✗ 0.844 (877 pairs the judge orders, of 5 held-out prompts)" in page


def test_several_runs_hold_on_k_of_n_with_mean_sd_min():
    """Three runs (two seeds on one float path, one on another) where the Spearman check holds twice."""
    runs = {}
    for i, (key, rho) in enumerate((("seed 0, default", 0.65), ("seed 1, default", 0.40), ("seed 0, avx2", 0.18))):
        r = one_report(i)
        r["world_checks"][1].update(value=rho, holds=rho >= 0.3)
        runs[key] = r
    agg = aggregate(runs)
    assert agg["runs"] == list(runs) and agg["seeds"] == []
    (rho,) = [c for c in agg["world_checks"] if c["check"].startswith("Spearman")]
    assert {k: rho[k] for k in ("values", "holds", "runs", "min", "max")} == {
        "values": [0.65, 0.40, 0.18], "holds": 2, "runs": 3, "min": 0.18, "max": 0.65}
    assert rho["mean"] == pytest.approx(0.41) and rho["sd"] == pytest.approx(0.2351595, abs=1e-6)  # n − 1
    assert [d["run"] for d in rho["details"]] == list(runs)
    page = html.unescape(render_seeds_html(agg, PNG))
    assert ("holds on 2 of 3 runs</b>: Spearman(reward model, judge) on PPO-ptx's samples ≥ 0.3; measured "
            "0.410 ± 0.235, min 0.180") in page
    assert "holds on 3 of 3 runs</b>: reward model's held-out accuracy" in page
    assert "in this run" not in page
    # a stage metric: mean ± sd over the runs
    tox = agg["stages"]["sft"]["toxicity_rate"]
    assert tox["values"] == [0.037] * 3 and tox["sd"] == 0.0
    # rows in the per-run shape with holds/runs as lists (a benchmark's JSON) render the same count
    rows = copy.deepcopy(agg)
    for r in rows["world_checks"]:
        r["holds"], r["runs"] = [d["holds"] for d in r["details"]], [d["run"] for d in r["details"]]
    assert "holds on 2 of 3 runs" in render_seeds_html(rows, PNG)


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="/usr/bin/chromium is absent")
def test_overoptimisation_figure_draws_every_online_method(monkeypatch):
    """One figure, both panels, every RL run with a gold curve (several seeds pooled); one legend entry per method,
    naming its two fits; a run without the gold judge is left out."""
    import base64

    import instructrl.report as rep
    from instructrl.stages import label

    def run(a, b):  # gold rises then falls with √KL; the proxy keeps rising
        return [{"objective/kl": (i / 10) ** 2, "objective/gold": i / 10 * (a - b * i / 10),
                 "objective/score": i / 10 * a} for i in range(30)]

    legends = []
    monkeypatch.setattr(rep.plt.Figure, "legend", lambda self, handles, labels, **kw: legends.append(labels))
    png = rep.overoptimisation_figure({"ppo_ptx": [run(1.0, 0.5), run(1.1, 0.5)], "grpo": run(2.0, 1.0),
                                       "dpo": [{"objective/kl": 0.1, "objective/score": 0.2}]})
    assert base64.b64decode(png).startswith(b"\x89PNG")
    (labels,) = legends
    assert [x.split(" (")[0] for x in labels] == [label("ppo_ptx"), label("grpo")]
    # the fit of the smoothed points (5-iteration means) is near the curve drawn: d(2 − d) for gold, 2d for the proxy
    gold_a, gold_b, proxy_a, proxy_b = map(float, re.findall(r"α=(-?[\d.]+) β=(-?[\d.]+)", labels[1])[0]
                                           + re.findall(r"α=(-?[\d.]+) β=(-?[\d.]+)", labels[1])[1])
    assert gold_a == pytest.approx(2.0, abs=0.1) and gold_b == pytest.approx(1.0, abs=0.1)
    assert proxy_a == pytest.approx(2.0, abs=0.1) and proxy_b == pytest.approx(0.0, abs=0.1)


def test_reward_model_by_task_type_in_the_report():
    """The per-task-type table under the world checks: one column group per stage, a dash where nothing is left to
    order, and none at all without the data (a run on the user's own prompts)."""
    rep = one_report()
    rep["rm_by_task"] = {
        "sft": {"plus": {"samples": 8, "questions": 2, "gold": 0.29, "rm": -0.3, "spearman": 0.3, "accuracy": 0.68,
                         "pairs": 12},
                "colour": {"samples": 40, "questions": 12, "gold": 1.27, "rm": -0.2, "spearman": 0.48,
                           "accuracy": 0.96, "pairs": 50}},
        "ppo_ptx": {"plus": {"samples": 8, "questions": 2, "gold": 0.54, "rm": -0.1, "spearman": 0.04,
                             "accuracy": 0.57, "pairs": 11},
                    "colour": {"samples": 40, "questions": 12, "gold": 1.5, "rm": 0.0, "spearman": None,
                               "accuracy": None, "pairs": 0}}}
    page = html.unescape(render_html(rep, FIGS))
    assert "by task type" in page and "colour (12 q.)" in page and "plus (2 q.)" in page
    row = page[page.index("colour (12 q.)"):].split("</tr>")[0]
    assert [c.split("</td>")[0] for c in row.split("<td>")[1:]] == ["1.27", "0.48", "0.96", "1.50", "–", "–"]
    assert "by task type" not in render_html(one_report(), FIGS)


@pytest.mark.parametrize("multi", [False, True])
def test_stage_table_fits_1280_px(tmp_path, multi):
    from playwright.sync_api import sync_playwright

    runs = {f"seed {s}, {fp}": one_report(s) for s in range(5) for fp in ("default", "avx2")}
    page_html = render_seeds_html(aggregate(runs), PNG) if multi else render_html(one_report(), FIGS)
    f = tmp_path / "report.html"
    f.write_text(page_html)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f.as_uri())
        table, box = page.eval_on_selector("table.stages", "t => [t.scrollWidth, t.parentElement.clientWidth]")
        page_width = page.evaluate("document.documentElement.scrollWidth")
        browser.close()
    assert table <= box and page_width <= 1280, (table, box, page_width)


def test_spearman_check_is_the_within_prompt_value_with_the_pooled_one_beside_it():
    """The check is the Spearman within a prompt (evaluate.within_prompt_spearman), which a reward model's
    per-prompt level does not move; the pooled one stands beside it. An evaluation without the within-prompt value
    (older than it: no question count) is checked on the pooled one, and says so in the check's name; one where the
    judge scored every question's replies alike has no value and does not hold."""
    from instructrl.report import measured, world_checks

    stages = {"ppo_ptx": {"rm_gold_spearman": 0.2, "rm_gold_spearman_within": 0.5, "rm_gold_spearman_prompts": 7},
              "sft": {"rm_gold_spearman": 0.6, "rm_gold_spearman_within": None}}
    sft, ppo = [c for c in world_checks(stages, {}) if c["check"].startswith("Spearman")]
    assert ppo["check"] == "Spearman(reward model, judge) within a prompt on PPO-ptx's samples ≥ 0.3"
    assert (ppo["value"], ppo["holds"]) == (0.5, True)
    assert ppo["on"] == "mean over 7 eval questions the judge does not score alike; pooled over all prompts 0.200"
    assert sft["check"] == "Spearman(reward model, judge) on SFT's samples ≥ 0.3"
    assert (sft["value"], sft["holds"]) == (0.6, True) and "on" not in sft
    stages["ppo_ptx"]["rm_gold_spearman_within"] = 0.29  # below the bar within a prompt, above it pooled
    stages["ppo_ptx"]["rm_gold_spearman"] = 0.9
    (ppo,) = [c for c in world_checks(stages, {}) if "PPO-ptx's samples" in c["check"]]
    assert (ppo["value"], ppo["holds"]) == (0.29, False)
    stages["ppo_ptx"].update(rm_gold_spearman_within=None, rm_gold_spearman_prompts=0)  # no question to rank within
    (ppo,) = [c for c in world_checks(stages, {}) if "PPO-ptx's samples" in c["check"]]
    assert (ppo["value"], ppo["holds"]) == (None, False) and "within a prompt" in ppo["check"]
    assert measured(ppo) == "no value (mean over 0 eval questions the judge does not score alike; pooled over all " \
                            "prompts 0.900)"
