"""Export the rankings to the JSONL rankings format, and measure how much labelers agree.

The export is the reward model's input as is: one line per (labeler, task) ranking, readable by
`instructrl.data.read_rankings`; the extra fields (labeler, labeler_id, created_at, task_id, flags) ride along.
A ranking that ties all responses compares nothing; the app refuses those, and the export leaves out any stored
before it did (and says how many).

Agreement is measured on tasks ranked by two or more labelers, for every pair of their rankings:
  pairwise agreement  the share of response pairs (i, j) both put in the same order (both tied counts as agreeing);
  Kendall's tau-b     rank correlation that accounts for ties; undefined (left out) when a ranking is one big tie.
"""
from __future__ import annotations

import itertools
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..data import DataError, Ranking, write_jsonl
from . import store


def export_records(db) -> list[dict]:
    with store.using(db, create=False) as engine:
        return [Ranking(t.prompt, list(t.responses), [list(g) for g in r.ranking], {
            "labeler": l.name, "labeler_id": l.id, "created_at": store.iso(r.created_at),
            "task_id": t.id, "flags": list(r.flags or [])}).to_json()
            for r, t, l in store.all_rankings(engine)]


def export_rankings(db, out: str | os.PathLike, overwrite: bool = False) -> tuple[int, int]:
    """Write every ranking that orders something to `out` atomically, never over an existing file unless
    `overwrite`. Returns (rankings written, all-tied rankings left out); on error nothing is written."""
    from ..outputs import check_place

    out = Path(out)
    check_place(out, [str(db)], "--out")  # never over the database itself
    if out.is_dir():
        raise DataError(out, None, "is a directory; --out takes a file path")
    records = export_records(db)
    kept = [r for r in records if len(r["ranking"]) > 1]
    try:
        write_jsonl(out, kept, overwrite)
    except OSError as e:
        refused = isinstance(e, FileExistsError) and e.filename2 is not None  # by the final link: `out` exists
        raise DataError(out, None, "exists; pass --overwrite to replace it" if refused
                        else f"cannot write it: {e.strerror}: {e.filename}") from None
    return len(kept), len(records) - len(kept)


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
    """Counts per labeler and agreement on shared tasks, as plain JSON-able data."""
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
            for lid, name in s.execute(select(store.Labeler.id, store.Labeler.name)):
                names[lid] = name
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
                 "flags": flags_by[lid], "comparisons": len(agree_by[lid]),
                 "pairwise_agreement": _mean(agree_by[lid]), "kendall_tau": _mean(tau_by[lid])}
                for lid in sorted(names)]
    return {"tasks": n_tasks, "tasks_ranked": len(by_task), "tasks_shared": shared,
            "rankings": sum(counts.values()), "skips": sum(skips.values()), "flags": dict(flag_kinds),
            "agreement": {"comparisons": len(agree_all), "pairwise_agreement": _mean(agree_all),
                          "kendall_tau": _mean(tau_all)},
            "labelers": labelers}
