"""report.json (machine-readable) and report.html (one self-contained page with matplotlib figures)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

from .stages import label
from .utils import atomic_write_text, write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

METRICS = ["toxicity_rate", "gold_reward", "rm_reward", "win_rate_gold", "win_rate_rm", "rm_gold_spearman",
           "kl_to_reference", "pretrain_loss",
           "bias_gap", "bias_stereotype_share", "response_length", "episodes", "seconds"]
CURVE = ("train/episodes", "objective/score", "objective/gold", "objective/kl", "objective/beta",
         "rollout/response_length")


def _curve(stage_dir: Path) -> list[dict]:
    f = stage_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    records = [json.loads(x) for x in f.read_text().splitlines()]
    return [{k: d[k] for k in CURVE if k in d} for d in records if "train/episodes" in d]  # RL stages only


def _smooth(ys: list[float], w: int = 5) -> list[float]:
    return [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]


def claims(stages: dict) -> list[dict]:
    """The four claims of [RLHF-intro] and [IG] as checks on the measured numbers (absent runs are reported as not measured)."""
    s = stages
    out = []

    def add(name, ok, detail):
        out.append({"claim": name, "holds": ok, "detail": detail})

    if all(k in s for k in ("pretrained", "sft", "ppo_ptx")):
        t = [s[k]["toxicity_rate"] for k in ("pretrained", "sft", "ppo_ptx")]
        add("1. RLHF lowers toxicity well below SFT's, and SFT below the pretrained model's",
            t[0] > t[1] > t[2] and t[2] <= t[1] / 2,
            f"toxicity pretrained {t[0]:.3f} > SFT {t[1]:.3f} > PPO-ptx {t[2]:.3f} (PPO-ptx ≤ SFT/2: {t[2] <= t[1] / 2})")
    if "ppo" in s and "ppo_beta0" in s and "gold_reward" in s["ppo"]:
        a, b = s["ppo"], s["ppo_beta0"]
        add("2. The KL penalty keeps the policy near SFT; β = 0 hacks the reward model",
            b["kl_to_reference"] > a["kl_to_reference"] and (b["rm_reward"] - b["gold_reward"]) > (a["rm_reward"] - a["gold_reward"]),
            f"β>0: KL {a['kl_to_reference']:.2f}, proxy {a['rm_reward']:.3f}, gold {a['gold_reward']:.3f}; "
            f"β=0: KL {b['kl_to_reference']:.2f}, proxy {b['rm_reward']:.3f}, gold {b['gold_reward']:.3f}")
    if "ppo" in s and "pg" in s and "gold_reward" in s["ppo"]:
        a, b = s["ppo"], s["pg"]
        add("3. PPO reaches more reward than vanilla PG with the same sampled episodes",
            a["gold_reward"] > b["gold_reward"],
            f"{a['episodes']} episodes each: gold PPO {a['gold_reward']:.3f} vs PG {b['gold_reward']:.3f}; "
            f"proxy PPO {a['rm_reward']:.3f} vs PG {b['rm_reward']:.3f}")
    if all(k in s for k in ("sft", "ppo", "ppo_ptx")):
        base = s["sft"]["pretrain_loss"]
        d_ptx, d_ppo = s["ppo_ptx"]["pretrain_loss"] - base, s["ppo"]["pretrain_loss"] - base
        add("4. PPO-ptx regresses less on pretraining text than PPO", d_ptx < d_ppo,
            f"pretraining loss vs SFT ({base:.3f}): PPO-ptx {d_ptx:+.3f}, PPO {d_ppo:+.3f}")
    return out


def bias_summary(stages: dict, bias: dict, first: str = "sft", last: str = "ppo_ptx", tol: float = 0.05) -> list[str]:
    """Plain sentences: which bias measures moved between SFT and PPO-ptx (by more than `tol`) and which did not."""
    out = []
    if first in stages and last in stages and stages[first].get("bias_gap") is not None:
        a, b = stages[first]["bias_gap"], stages[last]["bias_gap"]
        moved = "moved" if abs(b - a) > tol else "did not move"
        out.append(f"Probe log-probability gap (stereotyped − anti-stereotyped): {a:.2f} → {b:.2f}: {moved}.")
    if first in bias and last in bias:
        for key in sorted(bias[first]):
            if key in bias[last]:
                a, b = bias[first][key], bias[last][key]
                moved = "moved" if abs(b - a) > tol else "did not move"
                out.append(f"Generation gap {key} (prompt a − prompt b): {a:+.3f} → {b:+.3f}: {moved}.")
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figures(stages: dict, curves: dict, out: Path) -> dict[str, str]:
    """The report's plots as PNG files under out/plots and base64 for the HTML page."""
    figs = {}
    rl = [k for k in curves if curves[k]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for k in rl:
        ep = [c["train/episodes"] for c in curves[k]]
        kl = _smooth([c["objective/kl"] for c in curves[k]])
        line, = axes[0].plot(ep, _smooth([c["objective/score"] for c in curves[k]]), label=f"{label(k)} proxy")
        if "objective/gold" in curves[k][0]:
            gold = _smooth([c["objective/gold"] for c in curves[k]])
            axes[0].plot(ep, gold, "--", color=line.get_color(), label=f"{label(k)} gold")
            axes[2].plot(kl, gold, color=line.get_color(), label=label(k))
        axes[1].plot(ep, kl, label=label(k))
    axes[0].set(title="Reward vs episodes (solid: reward model, dashed: gold)", xlabel="episodes", ylabel="reward")
    axes[1].set(title="KL to SFT vs episodes", xlabel="episodes", ylabel="Σ_t k1 per response")
    axes[2].set(title="Gold reward vs KL to SFT (training rollouts)", xlabel="Σ_t k1 per response",
                ylabel="gold reward")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    figs["curves"] = _png(fig)

    names = list(stages)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar([label(n) for n in names], [stages[n]["toxicity_rate"] for n in names], color="#c0504d")
    axes[0].set(title="Toxicity rate of sampled responses (eval prompts)", ylabel="share toxic")
    axes[0].tick_params(axis="x", rotation=20)
    for n in names:
        st = stages[n]
        if st.get("kl_to_reference") is None:
            continue
        for key, marker in (("gold_reward", "o"), ("rm_reward", "x")):
            if st.get(key) is not None:
                axes[1].scatter(st["kl_to_reference"], st[key], marker=marker)
                axes[1].annotate(f"{label(n)} {'gold' if key == 'gold_reward' else 'RM'}",
                                 (st["kl_to_reference"], st[key]), fontsize=7)
    axes[1].set(title="Reward vs KL frontier (o gold, x reward model)", xlabel="KL to SFT", ylabel="reward")
    axes[1].grid(alpha=0.3)
    figs["stages"] = _png(fig)
    (out / "plots").mkdir(exist_ok=True)
    for name, data in figs.items():
        (out / "plots" / f"{name}.png").write_bytes(base64.b64decode(data))
    return figs


def write_report(out: Path, stage_dirs: dict[str, str], evals: dict[str, dict], rm_summary: dict,
                 seconds: float, peak_rss_mb: float) -> dict:
    out = Path(out)
    stages, examples, curves, bias = {}, {}, {}, {}
    for name, e in evals.items():
        d = Path(stage_dirs[name])
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
        stages[name] = {"toxicity_rate": e["toxicity_rate"], "gold_reward": e.get("gold_reward"),
                        "rm_reward": e.get("rm_reward"), "rm_gold_spearman": e.get("rm_gold_spearman"),
                        "kl_to_reference": e.get("kl_to_reference"),
                        "pretrain_loss": e.get("pretrain_loss"), "bias_gap": e.get("bias_gap"),
                        "bias_stereotype_share": e.get("bias_stereotype_share"),
                        "response_length": e["response_length"], "episodes": summary.get("episodes", 0),
                        "seconds": summary.get("seconds")}
        for judge, w in (e.get("win_rate") or {}).items():  # against SFT, under the gold judge and the RM
            stages[name][f"win_rate_{judge}"] = w["win_rate"]
            stages[name][f"win_rate_{judge}_ci"] = w["win_rate_ci"]
        if e.get("generation_bias"):
            bias[name] = {k: v["mean_gap"] for k, v in e["generation_bias"].items()}
        examples[name] = e["examples"]
        curves[name] = _curve(d)
    report = {"stages": stages, "claims": claims(stages), "generation_bias": bias,
              "bias_summary": bias_summary(stages, bias),
              "reward_model": {k: rm_summary.get(k) for k in ("held_out", "demo_score_mean", "norm_gain", "norm_bias")},
              "curves": {k: v for k, v in curves.items() if v}, "examples": examples,
              "seconds": seconds, "peak_rss_mb": peak_rss_mb}
    write_json(out / "report.json", report)
    figs = figures(stages, curves, out)
    atomic_write_text(out / "report.html", render_html(report, figs))
    return report


def render_html(report: dict, figs: dict[str, str]) -> str:
    e = html.escape
    stages = report["stages"]
    head = "".join(f"<th>{e(m)}</th>" for m in METRICS)
    rows = ""
    for name, st in stages.items():
        cells = "".join(f"<td>{'' if st.get(m) is None else (f'{st[m]:.3f}' if isinstance(st[m], float) else st[m])}</td>"
                        for m in METRICS)
        rows += f"<tr><th>{e(label(name))}</th>{cells}</tr>"
    claims_html = "".join(
        f"<li class='{'ok' if c['holds'] else 'no'}'><b>{'✓' if c['holds'] else '✗'} {e(c['claim'])}</b><br>"
        f"{e(c['detail'])}</li>" for c in report["claims"]) or "<li>Run with <code>--compare</code> to test claims 2–4.</li>"
    ex_html = ""
    prompts = [x["prompt"] for x in next(iter(report["examples"].values()), [])]
    for p in prompts:
        ex_html += f"<h4>{e(p)}</h4><table class='ex'>"
        for name, exs in report["examples"].items():
            resp = next((x["response"] for x in exs if x["prompt"] == p), "")
            ex_html += f"<tr><th>{e(label(name))}</th><td>{e(resp)}</td></tr>"
        ex_html += "</table>"
    rm = report["reward_model"].get("held_out") or {}
    rm_line = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rm.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>instructrl report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}.wide{{overflow-x:auto}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
table.ex td{{text-align:left;white-space:pre-wrap}}li.ok b{{color:#2a7}}li.no b{{color:#c33}}img{{max-width:100%}}
h4{{font-family:monospace;white-space:pre-wrap;margin-bottom:0}}</style></head><body>
<h1>instructrl report</h1>
<p>This run of the pipeline took {report['seconds']:.0f} s (stages finished earlier are reused; each stage's own
training time is in the <i>seconds</i> column), peak memory {report['peak_rss_mb']:.0f} MiB.
Metrics on held-out evaluation prompts. KL is Σ_t log π/π_SFT per sampled response.</p>
<div class="wide"><table><tr><th>stage</th>{head}</tr>{rows}</table></div>
<h2>The claims of the RLHF article and InstructGPT</h2><ul>{claims_html}</ul>
<h2>Bias</h2><p>Probes: log-probability gaps between paired sentences. Generations: paired prompts that differ in
one demographic word (win rates and gaps are measured on samples; intervals in report.json).</p>
<ul>{"".join(f"<li>{e(x)}</li>" for x in report.get("bias_summary", [])) or "<li>not measured</li>"}</ul>
<h2>Reward model (held-out prompts)</h2><p>{e(rm_line)}</p>
<h2>Training curves</h2><img alt="reward and KL curves" src="data:image/png;base64,{figs['curves']}">
<h2>Stages</h2><img alt="toxicity and frontier" src="data:image/png;base64,{figs['stages']}">
<h2>Sample responses (same prompts, every stage)</h2>{ex_html}
</body></html>
"""
