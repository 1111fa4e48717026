"""Load test for `instructrl serve-rm` on 127.0.0.1: do well-behaved clients keep a p99 latency under 1 s while one
more client sends 10 MB bodies and batches as large as the limits allow?

Starts `instructrl serve-rm` in a child process (a tiny random reward model unless --reward DIR) with a bearer
token. Then, each for at most --duration seconds and --requests requests (the loops stop by themselves):
  - --clients − 1 clients (threads, one connection each) POST --queries texts of about --chars characters,
    one request at a time;
  - one heavy client (a process of its own, so it competes for the server only) cycles through: a 10 MB body with
    Content-Length (413), the same streamed without one (413), --max-queries + 1 queries (413), and a batch just
    under both limits (200: scored chunk by chunk, taking turns with the others' requests), each at least once.
It reports the others' p50/p99 latency, every status seen and the server's peak RSS (VmHWM). ok: only 200s for the
others, only 413s and 200s for the heavy client (no 500), the 413s seen, and (unless --smoke) p99 < 1 s.

    python benchmarks/serve_rm_load.py                  # 16 clients, 30 s
    python benchmarks/serve_rm_load.py --no-heavy       # the same without the heavy client: the baseline
    python benchmarks/serve_rm_load.py --smoke          # a few seconds (CI): the statuses, not the latency
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_load import Server as ChildServer, free_port, percentile  # noqa: E402

TOKEN = "load-test-token"
MAX_BODY_BYTES = 8 << 20  # serve-rm's defaults
MAX_QUERIES = 1024
WORDS = "the reward model reads every answer to the end and scores how helpful honest and harmless it is".split()


def text(i: int, chars: int) -> str:
    words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(chars // 5 + 1)]
    return f"Question {i}?\n" + " ".join(words)[:chars] + "<|endoftext|>"


def tiny_rm(path: Path) -> Path:
    """A random reward model (GPT-2 shape, 2 layers of width 64, context 256) with a byte-level BPE tokenizer: the
    server's own cost per request, without a real model's."""
    import torch
    import transformers
    from transformers import AutoModel, GPT2Config

    from instructrl.models import ScalarHeadModel, train_tokenizer

    transformers.utils.logging.disable_progress_bar()
    tok = train_tokenizer([text(i, 400) for i in range(50)], vocab_size=400)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ScalarHeadModel(AutoModel.from_config(config)).save_pretrained(path)
    tok.save_pretrained(str(path))
    return path


class Server(ChildServer):
    """`instructrl serve-rm` in a child process (peak_rss_mb and stop as label_load's)."""

    def __init__(self, reward: Path, port: int, log: Path, device: str, batch_size: int):
        self.url = f"http://127.0.0.1:{port}/get_reward"
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", "serve-rm", "--reward", str(reward),
                                          "--port", str(port), "--device", device, "--token", TOKEN,
                                          "--batch-size", str(batch_size)],
                                         stdout=f, stderr=subprocess.STDOUT)
        self.log = log

    def wait(self, timeout: float = 120) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-rm exited with {self.proc.returncode}: {self.log.read_text()[-1000:]}")
            try:
                if httpx.get(self.url.replace("get_reward", "health"), timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"serve-rm did not answer within {timeout} s; see {self.log}")


def client_loop(url: str, seed: int, queries: int, chars: int, requests: int, until: float, out: list) -> None:
    """A well-behaved client: one request at a time, each timed, until `requests` or `until`."""
    body = json.dumps({"query": [text(seed * 1000 + i, chars) for i in range(queries)], "labels": None})
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TOKEN}",
                                           "Content-Type": "application/json"}) as client:
        for i in range(requests):
            if i and time.time() > until:  # at least one request each, however late it started
                break
            t0 = time.perf_counter()
            try:
                status = client.post(url, content=body).status_code
            except httpx.TransportError as e:
                status = type(e).__name__
            out.append((status, time.perf_counter() - t0))


def heavy_loop(url: str, requests: int, until: float, near_queries: int, out) -> None:
    """The abusive client (see the module docstring); counts the answers to each kind of request. It sends each
    kind at least once, then stops at `requests` or `until`."""
    flood = b'{"query": ["' + b"x" * (10 << 20) + b'"]}'
    chars = MAX_BODY_BYTES // MAX_QUERIES - 200  # texts as long as the body limit allows at --max-queries
    near = json.dumps({"query": [text(i, chars) for i in range(near_queries)]})
    kinds = {"10MB": lambda: flood, "10MB-streamed": lambda: (flood[i:i + (1 << 20)] for i in range(0, len(flood), 1 << 20)),
             "too-many-queries": lambda: json.dumps({"query": ["hi"] * (MAX_QUERIES + 1)}),
             "near-limits": lambda: near}
    seen: dict[str, Counter] = {k: Counter() for k in kinds}
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}",
                                            "Content-Type": "application/json"}) as client:
        for i in range(max(requests, len(kinds))):
            if i >= len(kinds) and time.time() > until:
                break
            kind = list(kinds)[i % len(kinds)]
            try:
                seen[kind][str(client.post(url, content=kinds[kind]()).status_code)] += 1
            except httpx.TransportError:  # the server closed on us mid-send: allowed for the refused bodies
                seen[kind]["closed"] += 1
    out.put({k: dict(v) for k, v in seen.items()})


def run(clients: int = 16, duration: float = 30, requests: int = 2000, queries: int = 8, chars: int = 400,
        reward: str | None = None, device: str = "cpu", smoke: bool = False, heavy: bool = True,
        batch_size: int = 64) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rm = Path(reward) if reward else tiny_rm(Path(tmp) / "rm")
        server = Server(rm, free_port(), Path(tmp) / "serve-rm.log", device, batch_size)
        try:
            server.wait()
            rss_idle = server.peak_rss_mb()
            until = time.time() + duration
            fork = multiprocessing.get_context("fork")
            heavy_out = fork.Queue()
            abuser = fork.Process(target=heavy_loop, args=(server.url, requests // 10, until,
                                                           MAX_QUERIES // 8 if smoke else MAX_QUERIES, heavy_out))
            if heavy:
                abuser.start()
            results: list[list] = [[] for _ in range(clients - 1)]
            threads = [threading.Thread(target=client_loop, args=(server.url, c, queries, chars, requests, until, r))
                       for c, r in enumerate(results)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(duration + 120)
            heavy_seen = heavy_out.get(timeout=duration + 240) if heavy else {}
            if heavy:
                abuser.join(30)
            rss_peak = server.peak_rss_mb()
        finally:
            server.stop()
    answers = [a for r in results for a in r]
    latencies = [t for s, t in answers if s == 200]
    statuses = Counter(str(s) for s, _ in answers)
    heavy_statuses = Counter(s for v in heavy_seen.values() for s in v)
    p99 = percentile(latencies, 99)
    report = {"clients": clients, "batch_size": batch_size, "duration_s": duration, "requests": len(answers), "statuses": dict(statuses),
              "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(p99), "max_ms": _ms(max(latencies, default=None)),
              "heavy": heavy_seen, "rss_idle_mb": rss_idle, "rss_peak_mb": rss_peak}
    report["no_500"] = "500" not in statuses and "500" not in heavy_statuses
    report["refused_413"] = not heavy or all(heavy_seen[k].get("413", 0) + heavy_seen[k].get("closed", 0)
                                             == sum(heavy_seen[k].values()) > 0
                                             for k in ("10MB", "10MB-streamed", "too-many-queries"))
    report["ok"] = (set(statuses) == {"200"} and set(heavy_statuses) <= {"200", "413", "closed"}
                    and report["no_500"] and report["refused_413"] and (smoke or p99 is not None and p99 < 1))
    return report


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="clients in all, the heavy one included")
    ap.add_argument("--duration", type=float, default=30, help="seconds each loop runs at most")
    ap.add_argument("--requests", type=int, default=2000, help="requests per well-behaved client at most")
    ap.add_argument("--queries", type=int, default=8, help="texts per well-behaved request")
    ap.add_argument("--chars", type=int, default=400, help="characters per text")
    ap.add_argument("--reward", default=None, help="reward-model directory (default: a tiny random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64, help="serve-rm's --batch-size: texts per forward, the "
                    "quantum the heavy client's batch is scored in")
    ap.add_argument("--no-heavy", action="store_true", help="without the heavy client: the baseline latency")
    ap.add_argument("--smoke", action="store_true", help="seconds (CI): 16 clients for 3 s, the heavy one's "
                    "largest batch 1/8 of the limit, no latency bound")
    a = ap.parse_args()
    kw = dict(clients=a.clients, duration=a.duration, requests=a.requests, queries=a.queries, chars=a.chars,
              reward=a.reward, device=a.device, heavy=not a.no_heavy, batch_size=a.batch_size)
    report = run(**(kw | dict(duration=3, requests=20, smoke=True) if a.smoke else kw))
    print(json.dumps(report, indent=2))
    from instructrl.machine import child_cpu_info, cpu_line

    print(cpu_line(child_cpu_info(1)))  # the server's CPU (a child process), after the JSON that tests read first
    print(f"{report['clients']} clients: p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms over "
          f"{report['requests']} requests {report['statuses']}; heavy client {report['heavy']}; server RSS "
          f"{report['rss_idle_mb']} → {report['rss_peak_mb']} MB: " + ("OK" if report["ok"] else "FAILED"))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
