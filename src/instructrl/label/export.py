"""Export the rankings (per labeler, or one consensus per task; K-way or as pairs; JSONL or parquet), and measure
how much labelers agree.

The K-way export is the reward model's input as is: one record per (labeler, task) ranking, readable by
`instructrl.data.read_rankings`; the extra fields (labeler, labeler_id, created_at, task_id, flags, and `models`
for imported tasks) ride along. A ranking that ties all responses compares nothing; the app refuses those, and the
export leaves out any stored before it did (and says how many). Labelers excluded with `label exclude` are left
out of every export and consensus (their rankings stay in the database).

Consensus (one record per task): each labeler's ranking gives every response its fractional rank (1 = best; a tie
group shares the mean of the positions it spans), and the consensus orders the responses by their mean rank over
the task's labelers, exact equal means tying. This is the Borda count with ties averaged [de Borda 1781; Emerson
2013, "The original Borda count and partial voting"]. Each record carries `mean_ranks`, `labelers`, and the task's
`agreement` and `kendall_tau` (means over its pairs of labelers; null with one labeler).

Pairs: every (better, worse) pair of a ranking as TRL's reward and DPO trainers read preferences: explicit prompt
{"prompt", "chosen", "rejected"}, or implicit prompt {"chosen", "rejected"} holding whole transcripts: a
conversation's messages with the response as the assistant's turn, or for a text prompt Anthropic HH's
"\n\nHuman: P\n\nAssistant: R" (which `read_rankings` splits back at the last shared "\n\nAssistant:").

Agreement is measured on tasks ranked by two or more labelers, for every pair of their rankings:
  pairwise agreement  the share of response pairs (i, j) both put in the same order (both tied counts as agreeing);
  Kendall's tau-b     rank correlation that accounts for ties; undefined (left out) when a ranking is one big tie.
"""
from __future__ import annotations

import itertools
import math
import os
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..data import DataError, Ranking, write_jsonl
from . import store

FORMATS = ("jsonl", "parquet", "pairs")


def _extra(t: store.Task) -> dict:
    return {"task_id": t.id} | ({"models": list(t.models)} if t.models else {})


def export_records(db, with_excluded: bool = False) -> list[Ranking]:
    """Every stored ranking, in commit order (an excluded labeler's only when asked)."""
    with store.using(db, create=False) as engine:
        return [Ranking(store.TaskView.of(t).prompt, list(t.responses), [list(g) for g in r.ranking], {
            "labeler": l.name, "labeler_id": l.id, "created_at": store.iso(r.created_at), **_extra(t),
            "flags": list(r.flags or [])}) for r, t, l in store.all_rankings(engine)
            if with_excluded or l.excluded_at is None]


# --- consensus ----------------------------------------------------------------------------------------------
def fractional_ranks(groups: list[list[int]]) -> dict[int, Fraction]:
    """1-based rank of each index; a tie group spanning positions p+1..p+n gets their mean, p + (n+1)/2."""
    ranks, seen = {}, 0
    for g in groups:
        for i in g:
            ranks[i] = Fraction(2 * seen + len(g) + 1, 2)
        seen += len(g)
    return ranks


def consensus(rankings: list[list[list[int]]]) -> tuple[list[list[int]], list[Fraction]]:
    """(groups, mean rank of each index) of several rankings of the same K responses: ordered by mean fractional
    rank, equal means tied (Borda count with ties averaged)."""
    k = sum(len(g) for g in rankings[0])
    per = [fractional_ranks(r) for r in rankings]
    mean = [sum(p[i] for p in per) / len(per) for i in range(k)]
    groups = [list(g) for _, g in itertools.groupby(sorted(range(k), key=lambda i: (mean[i], i)), key=mean.__getitem__)]
    return groups, mean


def _task_summaries(engine) -> list[dict]:
    """Per ranked task: the task, its included labelers' rankings and flags, consensus and agreement."""
    by_task: dict[int, list] = defaultdict(list)
    tasks: dict[int, store.Task] = {}
    for r, t, l in store.all_rankings(engine):
        if l.excluded_at is None:
            tasks[t.id] = t
            by_task[t.id].append((l.name, [list(g) for g in r.ranking], list(r.flags or [])))
    out = []
    for tid, ranked in by_task.items():
        groups, mean = consensus([g for _, g, _ in ranked])
        pairs = [compare(a, b) for (_, a, _), (_, b, _) in itertools.combinations(ranked, 2)]
        taus = [tau for _, tau in pairs if tau is not None]
        flags = Counter((f["index"], f["flag"]) for _, _, fs in ranked for f in fs)
        out.append({"task": tasks[tid], "labelers": [n for n, _, _ in ranked], "rankings": [g for _, g, _ in ranked],
                    "consensus": groups, "mean_ranks": [float(m) for m in mean],
                    "agreement": _mean([a for a, _ in pairs]), "kendall_tau": _mean(taus),
                    "flags": [{"index": i, "flag": f, "labelers": n} for (i, f), n in sorted(flags.items())]})
    return out


def consensus_records(db) -> list[Ranking]:
    """One record per task ranked by at least one included labeler, in task order."""
    with store.using(db, create=False) as engine:
        return [Ranking(store.TaskView.of(s["task"]).prompt, list(s["task"].responses), s["consensus"], {
            **_extra(s["task"]), "labelers": s["labelers"], "n_labelers": len(s["labelers"]),
            "mean_ranks": s["mean_ranks"], "agreement": s["agreement"], "kendall_tau": s["kendall_tau"],
            "flags": s["flags"]}) for s in sorted(_task_summaries(engine), key=lambda s: s["task"].id)]


def review_data(engine) -> dict:
    """What the review page shows: every task ranked by an included labeler, with its consensus as exported, least
    agreement first, then most flags, tasks with one labeler last; and every labeler, excluded ones marked."""
    tasks = []
    for s in _task_summaries(engine):
        t = store.TaskView.of(s["task"])
        tasks.append({"task_id": t.id, "prompt": t.prompt, "responses": t.responses, "models": t.models,
                      "consensus": [g[0] if len(g) == 1 else g for g in s["consensus"]],
                      "mean_ranks": s["mean_ranks"], "labelers": s["labelers"],
                      "rankings": [[g[0] if len(g) == 1 else g for g in r] for r in s["rankings"]],
                      "agreement": s["agreement"], "kendall_tau": s["kendall_tau"],
                      "flags": dict(Counter(f["flag"] for f in s["flags"] for _ in range(f["labelers"])))})
    tasks.sort(key=lambda x: (x["agreement"] is None, x["agreement"] or 0, -sum(x["flags"].values()), x["task_id"]))
    stats = compute_stats(engine)
    return {"tasks": tasks, "labelers": [{"name": l["name"], "rankings": l["rankings"], "excluded": l["excluded"],
                                          "pairwise_agreement": l["pairwise_agreement"]} for l in stats["labelers"]]}


# --- pairs and writing ----------------------------------------------------------------------------------------
def transcript(prompt, response):
    """Prompt and response as one transcript (the implicit-prompt form)."""
    if isinstance(prompt, str) and isinstance(response, str):
        return f"\n\nHuman: {prompt}\n\nAssistant: {response}"
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return turns + (list(response) if isinstance(response, list) else [{"role": "assistant", "content": response}])


def pair_records(rankings: list[Ranking], implicit_prompt: bool = False) -> list[dict]:
    """Every (better, worse) pair of each ranking, ties skipped, with the task, its labeler and the two models."""
    out = []
    for r in rankings:
        keep = {k: r.extra[k] for k in ("task_id", "labeler") if k in r.extra}
        models = r.extra.get("models")
        for w, l in r.pairs():
            chosen, rejected = r.responses[w], r.responses[l]
            rec = ({"chosen": transcript(r.prompt, chosen), "rejected": transcript(r.prompt, rejected)}
                   if implicit_prompt else {"prompt": r.prompt, "chosen": chosen, "rejected": rejected})
            out.append(rec | keep | ({"chosen_model": models[w], "rejected_model": models[l]} if models else {}))
    return out


def _write_parquet(out: Path, records: list[dict], overwrite: bool) -> None:
    """Atomically, like write_jsonl: a temp file beside `out`, then rename (or link, refusing an existing file)."""
    import secrets

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # e.g. text prompts and conversations in one column
        raise DataError(out, None, f"cannot be one parquet table ({e}); export as jsonl") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_rankings(db, out: str | os.PathLike, overwrite: bool = False, fmt: str = "jsonl",
                    use_consensus: bool = False, implicit_prompt: bool = False) -> tuple[int, int]:
    """Write the rankings (or with `use_consensus` one consensus per task) that order something to `out`
    atomically, never over an existing file unless `overwrite`. fmt: "jsonl", "parquet" (ranking as a list of
    groups), or "pairs" (parquet when `out` ends in .parquet, else JSONL). Returns (records written, all-tied
    rankings left out); on error nothing is written."""
    from ..outputs import check_place

    out = Path(out)
    check_place(out, [str(db)], "--out")  # never over the database itself
    if fmt not in FORMATS:
        raise DataError("--format", None, f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if implicit_prompt and fmt != "pairs":
        raise DataError("--implicit-prompt", None, "only pairs have an implicit-prompt form (use --format pairs)")
    if out.is_dir():
        raise DataError(out, None, "is a directory; --out takes a file path")
    rankings = consensus_records(db) if use_consensus else export_records(db)
    kept = [r for r in rankings if len(r.groups) > 1]
    if fmt == "pairs":
        records = pair_records(kept, implicit_prompt)
    else:
        records = [r.to_json() | ({"ranking": r.groups} if fmt == "parquet" else {}) for r in kept]
    try:
        if fmt == "parquet" or fmt == "pairs" and out.suffix == ".parquet":
            _write_parquet(out, records, overwrite)
        else:
            write_jsonl(out, records, overwrite)
    except OSError as e:
        refused = isinstance(e, FileExistsError) and e.filename2 is not None  # by the final link: `out` exists
        raise DataError(out, None, "exists; pass --overwrite to replace it" if refused
                        else f"cannot write it: {e.strerror}: {e.filename}") from None
    return len(records), len(rankings) - len(kept)


def model_win_rates(rankings: list[Ranking]) -> dict[str, dict]:
    """Per model, over every ranking's pairs of responses by two different models: wins, losses, ties, and the win
    rate (wins + ties / 2) / comparisons."""
    count = defaultdict(Counter)
    for r in rankings:
        models = r.extra.get("models")
        if not models:
            continue
        rank = fractional_ranks(r.groups)
        for i, j in itertools.combinations(range(len(models)), 2):
            if models[i] == models[j]:
                continue
            d = _sign(rank[j] - rank[i])  # +1: i is better
            for m, s in ((models[i], d), (models[j], -d)):
                count[m]["wins" if s > 0 else "losses" if s < 0 else "ties"] += 1
    return {m: {"wins": c["wins"], "losses": c["losses"], "ties": c["ties"], "comparisons": c.total(),
                "win_rate": (c["wins"] + c["ties"] / 2) / c.total()} for m, c in sorted(count.items())}


# --- agreement ------------------------------------------------------------------------------------------
def _positions(groups: list[list[int]]) -> dict[int, int]:
    return {i: g for g, group in enumerate(groups) for i in group}


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def compare(a: list[list[int]], b: list[list[int]]) -> tuple[float, float | None]:
    """(pairwise agreement, Kendall's tau-b) of two rankings of the same K responses."""
    pa, pb = _positions(a), _positions(b)
    same = concordant = discordant = tied_a = tied_b = n = 0
    for i, j in itertools.combinations(sorted(pa), 2):
        sa, sb = _sign(pa[i] - pa[j]), _sign(pb[i] - pb[j])
        n += 1
        same += sa == sb
        tied_a += sa == 0
        tied_b += sb == 0
        if sa and sb:
            concordant += sa == sb
            discordant += sa != sb
    denom = math.sqrt((n - tied_a) * (n - tied_b))
    return same / n, ((concordant - discordant) / denom if denom else None)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compute_stats(db) -> dict:
    """Counts per labeler (excluded ones included, and marked), agreement on shared tasks, and each model's win
    rate over the included labelers' rankings (`model_win_rates`), as plain JSON-able data."""
    by_task: dict[int, list[tuple[int, list[list[int]]]]] = defaultdict(list)
    names: dict[int, str] = {}
    counts, flags_by, flag_kinds = Counter(), Counter(), Counter()
    with store.using(db, create=False) as engine:
        for r, t, l in store.all_rankings(engine):
            names[l.id] = l.name
            counts[l.id] += 1
            by_task[t.id].append((l.id, r.ranking))
            for f in r.flags or []:
                flags_by[l.id] += 1
                flag_kinds[f["flag"]] += 1
        with Session(engine) as s:
            n_tasks = s.scalar(select(func.count()).select_from(store.Task))
            skips = Counter(dict(s.execute(select(store.Answer.labeler_id, func.count())
                                           .where(store.Answer.kind == store.SKIPPED)
                                           .group_by(store.Answer.labeler_id)).all()))
            excluded = set()
            for lid, name, gone in s.execute(select(store.Labeler.id, store.Labeler.name, store.Labeler.excluded_at)):
                names[lid] = name
                if gone is not None:
                    excluded.add(lid)
        models = model_win_rates(export_records(engine))
    agree_all, tau_all = [], []
    agree_by, tau_by = defaultdict(list), defaultdict(list)
    shared = 0
    for rankings in by_task.values():
        if len(rankings) < 2:
            continue
        shared += 1
        for (la, ra), (lb, rb) in itertools.combinations(rankings, 2):
            agree, tau = compare(ra, rb)
            agree_all.append(agree)
            for lid in (la, lb):
                agree_by[lid].append(agree)
                if tau is not None:
                    tau_by[lid].append(tau)
            if tau is not None:
                tau_all.append(tau)
    labelers = [{"labeler_id": lid, "name": names[lid], "rankings": counts[lid], "skips": skips[lid],
                 "flags": flags_by[lid], "comparisons": len(agree_by[lid]), "excluded": lid in excluded,
                 "pairwise_agreement": _mean(agree_by[lid]), "kendall_tau": _mean(tau_by[lid])}
                for lid in sorted(names)]
    return {"tasks": n_tasks, "tasks_ranked": len(by_task), "tasks_shared": shared,
            "rankings": sum(counts.values()), "skips": sum(skips.values()), "flags": dict(flag_kinds),
            "agreement": {"comparisons": len(agree_all), "pairwise_agreement": _mean(agree_all),
                          "kendall_tau": _mean(tau_all)},
            "labelers": labelers, "models": models}
