"""Load and crash test for the labeling app: is every acknowledged ranking stored exactly once?

Runs `instructrl label serve` as a subprocess on a fresh SQLite database, lets L simulated labelers (threads,
one httpx client each) fetch tasks and submit random rankings for D seconds, then exports and checks:
  lost        acknowledged (201) rankings missing from the export          must be 0
  duplicated  (labeler, task) pairs exported more than once                must be 0
  mismatched  acknowledged rankings exported with a different order        must be 0
  over cap    tasks with more than N rankings                              must be 0
With --kills M the server is `kill -9`ed M times during the load and restarted on the same database; requests
in flight at a kill may have committed without an answer: they show up as `unacknowledged`, which is allowed.

Meanwhile one more labeler, in a process of its own, keeps POSTing --flood-mb MB bodies (alternately with and
without Content-Length); the others' p99 latency must stay under 1 s (`latency_ok`) and the server's memory flat.

    python benchmarks/label_load.py --labelers 16 --duration 30
    python benchmarks/label_load.py --labelers 16 --duration 30 --kills 1
    python benchmarks/label_load.py --labelers 16 --duration 30 --kills 1 --flood-mb 0   # no flood
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from instructrl.data import read_rankings
from instructrl.label.export import export_rankings
from instructrl.label.store import add_labeler, enqueue_tasks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`instructrl label serve` in a child process that can be killed with SIGKILL and started again."""

    def __init__(self, db: str, port: int, max_labelers: int, log: Path):
        self.db, self.port, self.max_labelers, self.log = db, port, max_labelers, log
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> float:
        t0 = time.perf_counter()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "instructrl.label.cli", "serve", "--db", self.db, "--port", str(self.port),
                 "--max-labelers-per-task", str(self.max_labelers), "--no-access-log"],
                stdout=log, stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not answer within {timeout} s; see {self.log}")

    def peak_rss_mb(self) -> float | None:
        """The server process's peak resident memory so far (Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


def random_ranking(rng: random.Random, k: int, tie_p: float = 0.2) -> list:
    """A random order of 0..k-1, in canonical form (singletons as ints), sometimes with ties, never all tied."""
    order = list(range(k))
    rng.shuffle(order)
    groups = [[order[0]]]
    for i in order[1:]:
        (groups[-1].append(i) if rng.random() < tie_p else groups.append([i]))
    if len(groups) == 1:  # all tied: the app refuses a ranking that compares nothing
        groups.append([groups[0].pop()])
    return [g[0] if len(g) == 1 else g for g in groups]


def labeler_loop(base: str, name: str, token: str, stop: threading.Event, seed: int) -> dict:
    """Fetch a task, rank it, repeat; record what the server acknowledged and how long it took."""
    rng = random.Random(seed)
    res = {"acked": [], "post_latency": [], "get_latency": [], "conflicts": 0, "transport_errors": 0,
           "other_status": Counter(), "out_of_tasks": False}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        while not stop.is_set():
            try:
                t0 = time.perf_counter()
                r = client.get("/api/tasks/next")
                t1 = time.perf_counter()
                if r.status_code != 200:
                    res["other_status"][r.status_code] += 1
                    time.sleep(0.05)
                    continue
                res["get_latency"].append(t1 - t0)
                task = r.json()["task"]
                if task is None:
                    res["out_of_tasks"] = True
                    break
                ranking = random_ranking(rng, len(task["responses"]))
                t1 = time.perf_counter()
                r = client.post("/api/rankings", json={"task_id": task["id"], "ranking": ranking})
                t2 = time.perf_counter()
                if r.status_code == 201:
                    res["acked"].append((name, task["id"], ranking))
                    res["post_latency"].append(t2 - t1)
                elif r.status_code == 409:
                    res["conflicts"] += 1
                else:
                    res["other_status"][r.status_code] += 1
            except httpx.TransportError:  # the server is down (killed); this request was not acknowledged
                res["transport_errors"] += 1
                time.sleep(0.05)
    return res


def flood(base: str, token: str, mb: float, stop, out) -> None:
    """The abusive labeler: POST bodies of `mb` MB in a loop, alternately with Content-Length and streamed
    (chunked, no length); count the answers. Runs in a process of its own, so it competes for the server only."""
    body = b'{"task_id": 1, "ranking": [' + b"0, " * int(mb * 2**20 / 3) + b"0]}"

    def chunks():
        return (body[i:i + 2**20] for i in range(0, len(body), 2**20))

    seen = Counter()
    with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {token}",
                                                           "Content-Type": "application/json"}) as client:
        while not stop.is_set():
            try:
                r = client.post("/api/rankings", content=body if sum(seen.values()) % 2 == 0 else chunks())
                seen[str(r.status_code)] += 1
            except httpx.TransportError:  # the server closed on us mid-send (or is down: a kill)
                seen["transport_error"] += 1
                time.sleep(0.01)
    out.put(dict(seen))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def verify(db_path: Path, acked: list[tuple], max_labelers: int, out: Path) -> dict:
    """Compare what the server acknowledged with what the export holds."""
    export_rankings(str(db_path), out, overwrite=True)
    records = read_rankings(out) if out.stat().st_size else []  # also proves the export is valid rankings JSONL
    keys = Counter((r.extra["labeler"], r.extra["task_id"]) for r in records)
    exported = {(r.extra["labeler"], r.extra["task_id"]): r.to_json()["ranking"] for r in records}
    acked_keys = Counter((name, tid) for name, tid, _ in acked)
    per_task = Counter(r.extra["task_id"] for r in records)
    with sqlite3.connect(db_path) as con:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    return {"exported": len(records),
            "lost": sum(1 for k in acked_keys if k not in exported),
            "duplicated": sum(c - 1 for c in keys.values() if c > 1),
            "acked_twice": sum(c - 1 for c in acked_keys.values() if c > 1),
            "mismatched": sum(1 for name, tid, rk in acked if exported.get((name, tid), rk) != rk),
            "over_cap": sum(1 for c in per_task.values() if c > max_labelers),
            "unacknowledged": len(set(exported) - set(acked_keys)),
            "integrity_check": integrity}


def run(labelers: int = 16, duration: float = 30, kills: int = 0, tasks: int = 20000, k: int = 4,
        max_labelers: int = 3, workdir: str | None = None, flood_mb: float = 50) -> dict:
    work = Path(workdir or tempfile.mkdtemp(prefix="label_load."))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "label.db"
    enqueue_tasks(str(db), [f"prompt {i}" for i in range(tasks)],
                  [[f"response {i}.{j}" for j in range(k)] for i in range(tasks)])
    tokens = {f"labeler{i:02d}": add_labeler(str(db), f"labeler{i:02d}") for i in range(labelers)}
    flooder_token = add_labeler(str(db), "flooder")
    server = Server(str(db), free_port(), max_labelers, work / "server.log")
    restarts = [server.start()]
    stop = threading.Event()
    results: list[dict] = []
    threads = [threading.Thread(target=lambda n=n, t=t, i=i: results.append(labeler_loop(server.base, n, t, stop, i)))
               for i, (n, t) in enumerate(tokens.items())]
    fork = multiprocessing.get_context("fork")  # forked before any thread starts; the module needs no re-import
    flood_stop, flood_out = fork.Event(), fork.Queue()
    flooder = fork.Process(target=flood, args=(server.base, flooder_token, flood_mb, flood_stop, flood_out))
    peak_rss = []
    t0 = time.perf_counter()
    try:
        if flood_mb:
            flooder.start()
        for th in threads:
            th.start()
        for i in range(1, kills + 1):
            time.sleep(max(0.0, t0 + duration * i / (kills + 1) - time.perf_counter()))
            peak_rss.append(server.peak_rss_mb())
            server.kill9()
            restarts.append(server.start())
        time.sleep(max(0.0, t0 + duration - time.perf_counter()))
        stop.set()
        flood_stop.set()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
        flooded = flood_out.get(timeout=60) if flood_mb else {}
        peak_rss.append(server.peak_rss_mb())
    finally:
        stop.set()
        flood_stop.set()
        if flooder.pid is not None:
            flooder.join(10)
        server.stop()
    acked = [a for r in results for a in r["acked"]]
    post = [x for r in results for x in r["post_latency"]]
    get = [x for r in results for x in r["get_latency"]]
    other = sum((r["other_status"] for r in results), Counter())
    p99 = percentile(post + get, 99)
    report = {"labelers": labelers, "duration_s": round(elapsed, 2), "kills": kills, "max_labelers_per_task": max_labelers,
              "acknowledged": len(acked), "rankings_per_s": round(len(acked) / elapsed, 1),
              "post_p50_ms": _ms(percentile(post, 50)), "post_p99_ms": _ms(percentile(post, 99)),
              "get_next_p50_ms": _ms(percentile(get, 50)), "get_next_p99_ms": _ms(percentile(get, 99)),
              "p99_ms": _ms(p99), "latency_ok": p99 is not None and p99 < 1.0,
              "flood_mb": flood_mb, "flood_answers": flooded,
              "server_peak_rss_mb": [None if x is None else round(x) for x in peak_rss],
              "conflicts_409": sum(r["conflicts"] for r in results),
              "transport_errors": sum(r["transport_errors"] for r in results),
              "other_status": {str(s): n for s, n in other.items()},
              "ran_out_of_tasks": any(r["out_of_tasks"] for r in results),
              "server_start_s": [round(x, 2) for x in restarts],
              **verify(db, acked, max_labelers, work / "rankings.jsonl"), "workdir": str(work)}
    report["ok"] = (report["lost"] == report["duplicated"] == report["mismatched"] == report["over_cap"]
                    == report["acked_twice"] == 0 and report["integrity_check"] == "ok" and not other.get(500)
                    and "500" not in flooded)
    return report


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelers", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--kills", type=int, default=0, help="kill -9 the server this many times during the load")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-labelers-per-task", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--flood-mb", type=float, default=50, help="one more labeler POSTs bodies this big (0: none)")
    ap.add_argument("--smoke", action="store_true", help="2 labelers for 4 s, one kill, a 1 MB flood (CI)")
    a = ap.parse_args()
    if a.smoke:
        import shutil
        import tempfile

        a.labelers, a.duration, a.kills, a.tasks, a.flood_mb = 2, 4, 1, 200, 1
        a.workdir = tempfile.mkdtemp(prefix="label_load_smoke.")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from instructrl.machine import child_cpu_info, cpu_line

    print(cpu_line(child_cpu_info(1)), flush=True)
    report = run(a.labelers, a.duration, a.kills, a.tasks, a.k, a.max_labelers_per_task, a.workdir, a.flood_mb)
    print(json.dumps(report, indent=2))
    print(f"{report['rankings_per_s']} rankings/s, POST p50 {report['post_p50_ms']} ms, p99 {report['post_p99_ms']} ms, "
          f"all calls p99 {report['p99_ms']} ms with a {a.flood_mb:g} MB flood {report['flood_answers']}; "
          f"lost {report['lost']}, duplicated {report['duplicated']}, kills {report['kills']}: "
          + ("OK" if report["ok"] else "FAILED"))
    if a.smoke:
        shutil.rmtree(a.workdir)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
