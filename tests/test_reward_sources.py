"""Reward sources (issue 17): PPO with a Python callable, an HTTP reward server (OpenRLHF's contract), a weighted
pair; failing servers stop the run cleanly; reward models with another tokenizer score their own tokenisation."""
import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from instructrl import cli
from instructrl.models import ScalarHeadModel, load_causal_lm, load_tokenizer, train_tokenizer
from instructrl.ppo import PPOConfig, train_ppo
from instructrl.rewards import (HTTPReward, ModelReward, RewardError, RewardOptions, Rewards, load_rewards, parse,
                                post_json)
from instructrl.rm_server import rm_app
from instructrl.rl import setup_rl
from instructrl.rollout import make_rollout
from instructrl.sampling import decode_responses, encode_prompts, sample
from instructrl.utils import checkpoint_dir

TOY = '''
CALLS = []

def words(prompts, responses):
    CALLS.append((prompts, responses))
    return [0.1 * len(r.split()) for r in responses]
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_rewards", None)
    yield "toy_rewards"
    sys.modules.pop("toy_rewards", None)


@pytest.fixture
def ppo_kw(tiny_sft_dir, tiny_rm_dir, world_dir):
    return dict(policy=str(tiny_sft_dir), value=str(tiny_rm_dir), prompts=str(world_dir / "prompts_train.jsonl"),
                episodes=16, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, progress=False,
                device="cpu")


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def serving_app(app):
    """A FastAPI app under uvicorn on 127.0.0.1 (a free port), in a thread; yields its /get_reward URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/get_reward"
    finally:
        server.should_exit = True
        thread.join()


def failing_server(good: int, failure: str):
    """Answers the first `good` requests with zero rewards, then `failure`: 'slow' (later than any timeout here)
    or 'malformed' (not JSON). Yields its URL and the requests served."""
    malformed = answer(b"{rewards: oops")

    def slow(h, n):
        time.sleep(1.5)
        malformed(h, n)

    return scripted_server(*[good_answer] * good, slow if failure == "slow" else malformed)


# --- PPO with each kind -------------------------------------------------------------------------------------------
def test_ppo_with_a_python_callable(ppo_kw, toy_module, tmp_path):
    s = train_ppo(PPOConfig(reward=[f"{toy_module}:words"], out=str(tmp_path / "ppo"), **ppo_kw))
    calls = sys.modules[toy_module].CALLS
    assert s["episodes"] == 16 and len(calls) == 2  # one call per iteration, with the batch's texts
    prompts, responses = calls[0]
    assert len(prompts) == len(responses) == 8 and all(isinstance(x, str) for x in prompts + responses)
    recs = metrics(tmp_path / "ppo")
    for rec, (_, responses) in zip(recs, calls):
        assert rec["objective/score/words"] == pytest.approx(sum(0.1 * len(r.split()) for r in responses) / 8)


def test_ppo_with_an_http_reward_server_serving_our_rm(ppo_kw, tiny_rm_dir, tmp_path):
    model, tok = ScalarHeadModel.from_pretrained(tiny_rm_dir).eval(), load_tokenizer(tiny_rm_dir)
    with serving_app(rm_app(model, tok)) as url:
        s = train_ppo(PPOConfig(reward=[url], out=str(tmp_path / "ppo"), **ppo_kw))
    assert s["episodes"] == 16
    name = url.split("://")[1].replace(".", "_").replace(":", "_").replace("/", "_")  # 127_0_0_1_PORT_get_reward
    assert all(f"objective/score/{name}" in rec for rec in metrics(tmp_path / "ppo"))


def test_serve_rm_scores_each_query_as_the_model_scores_its_tokens(tiny_rm_dir, world_dir):
    """Queries of different lengths in one request: each reward equals the model's score of that text's own
    tokens alone (the server's padding changes nothing)."""
    model, tok = ScalarHeadModel.from_pretrained(tiny_rm_dir).eval(), load_tokenizer(tiny_rm_dir)
    queries = ["Say hello.\nHello there, friend." + tok.eos_token, "List three fruits.\napple" + tok.eos_token,
               "Hi" + tok.eos_token]
    with torch.no_grad():
        expected = []
        for q in queries:
            ids = torch.tensor([tok(q, add_special_tokens=False)["input_ids"]])
            expected.append(float(model.score(ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))))
    with serving_app(rm_app(model, tok, batch_size=2)) as url:
        got = post_json(url, {"query": queries, "prompts": ["", "", ""], "labels": None}, 10, 0)["rewards"]
    assert got == pytest.approx(expected, abs=1e-5)


def test_ppo_with_a_weighted_pair_logs_each_part(ppo_kw, tiny_rm_dir, toy_module, tmp_path):
    train_ppo(PPOConfig(reward=[str(tiny_rm_dir), f"{toy_module}:words"], reward_weights=[0.5, 2.0],
                        out=str(tmp_path / "ppo"), **ppo_kw))
    for rec in metrics(tmp_path / "ppo"):
        assert {"objective/score", f"objective/score/{tiny_rm_dir.name}", "objective/score/words"} <= set(rec)


def test_weighted_sum_and_normalised_sum_equal_the_hand_computation():
    a, b = [0.3, -1.2, 2.5, 0.0], [4.0, 1.0, -2.0, 3.5]

    class Fixed:
        def __init__(self, name, values):
            self.name, self.values = name, values

        def score(self, prompts, responses, batch):
            return torch.tensor(self.values)

    total, parts = Rewards([Fixed("a", a), Fixed("b", b)], [0.5, -2.0]).score(None, None, None)
    assert total.tolist() == pytest.approx([0.5 * x - 2.0 * y for x, y in zip(a, b)], abs=1e-6)
    assert parts["a"].tolist() == pytest.approx(a) and parts["b"].tolist() == pytest.approx(b)

    def whitened(x):  # population variance, eps 1e-8 (as masked_whiten), in float64
        m = sum(x) / len(x)
        v = sum((t - m) ** 2 for t in x) / len(x)
        return [(t - m) / (v + 1e-8) ** 0.5 for t in x]
    total, _ = Rewards([Fixed("a", a), Fixed("b", b)], [0.5, -2.0], normalize=True).score(None, None, None)
    assert total.tolist() == pytest.approx([0.5 * x - 2.0 * y for x, y in zip(whitened(a), whitened(b))], abs=1e-5)


def test_rollout_reward_is_the_weighted_sum_of_its_parts_with_the_eos_penalty(tiny_sft_dir, tiny_rm_dir, world_dir):
    """The real path: an RM at 0.5 and the gold judge at 2 (SPEC@WEIGHT); r.scores = 0.5·rm + 2·gold where the
    response ended, the missing-EOS penalty elsewhere; the gold part equals the judge's own scores."""
    cfg = PPOConfig(policy=str(tiny_sft_dir), reward=[f"{tiny_rm_dir}@0.5", f"gold:{world_dir}@2"],
                    judge=str(world_dir), prompts=str(world_dir / "prompts_train.jsonl"), out="", batch_size=16,
                    max_new_tokens=10, missing_eos_penalty=-3.0, progress=False, device="cpu")
    s = setup_rl(cfg, torch.device("cpu"), torch.float32, with_value=False)
    prompts, ids = s.prompts.next(16)
    r = make_rollout(s, prompts, ids, with_values=False)
    rm, gold = r.parts[tiny_rm_dir.name], r.parts["gold"]
    assert gold.tolist() == pytest.approx(r.gold)
    with torch.no_grad():
        own = s.reward.sources[0].model.score(r.batch.input_ids, r.batch.attention_mask, r.batch.last_index)
    assert torch.equal(rm, own)
    hand = [0.5 * x + 2 * y if e else -3.0 for x, y, e in zip(rm.tolist(), gold.tolist(), r.batch.ended.tolist())]
    assert r.scores.tolist() == pytest.approx(hand, abs=1e-6)


# --- failures -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["slow", "malformed"])
def test_a_failing_server_stops_the_run_cleanly_after_the_retries(failure, ppo_kw, tmp_path):
    """Iteration 1 is served and checkpointed; iteration 2's server fails every attempt: RewardError naming the
    URL, the checkpoint of step 1 intact, no output directory (nor its lock) left."""
    out = tmp_path / "ppo"
    with failing_server(good=1, failure=failure) as (url, served):
        t0 = time.time()
        with pytest.raises(RewardError, match=rf"{url}.*after 3 attempts"):
            train_ppo(PPOConfig(reward=[url], out=str(out), save_every=1, reward_timeout=0.5, reward_retries=2,
                                **ppo_kw))
    assert len(served) == 1 + 3 and time.time() - t0 < 60
    assert not out.exists() and not (tmp_path / ".ppo.lock").exists()
    assert [p.name for p in checkpoint_dir(out).iterdir() if p.name.startswith("step-")] == ["step-00000001"]
    # the checkpoint is whole: the run resumes from it, and fails again at step 2 (the server is gone now)
    with pytest.raises(RewardError, match=rf"{url}.*after 3 attempts"):
        train_ppo(PPOConfig(reward=[url], out=str(out), save_every=1, reward_timeout=0.5, reward_retries=2,
                            resume=True, **ppo_kw))
    assert not out.exists()


def test_cli_eval_with_a_malformed_server_exits_2_naming_the_url(tiny_sft_dir, world_dir, monkeypatch, capsys):
    with failing_server(good=0, failure="malformed") as (url, served):
        args = ["eval", "--model", tiny_sft_dir, "--prompts", world_dir / "prompts_eval.jsonl", "--reward", url,
                "--reward-retries", "1", "--max-new-tokens", "4", "--device", "cpu"]
        monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(served) == 2, err
    assert err.startswith("error:") and url in err and "malformed JSON" in err, err


def test_ppo_without_a_model_reward_asks_for_a_value_init(ppo_kw, world_dir, tmp_path):
    kw = {**ppo_kw, "value": None}
    with pytest.raises(ValueError, match="pass --value"):
        train_ppo(PPOConfig(reward=[f"gold:{world_dir}"], out=str(tmp_path / "ppo"), **kw))
    assert not (tmp_path / "ppo").exists()


def test_specs_weights_and_their_errors(tiny_rm_dir):
    assert parse([f"{tiny_rm_dir}@0.25", "m.x:f", "http://h:1/r@2", "gold:/w"], []) == [
        ("model", str(tiny_rm_dir), 0.25), ("function", "m.x:f", 1.0), ("http", "http://h:1/r", 2.0),
        ("gold", "gold:/w", 1.0)]
    assert [w for *_, w in parse(["a:f", "b:g"], [0.5, 3.0])] == [0.5, 3.0]
    with pytest.raises(ValueError, match="2 weights for 1"):
        parse(["a:f"], [1.0, 2.0])
    with pytest.raises(ValueError, match="either with @ or with --reward-weights"):
        parse(["a:f@2"], [1.0])
    with pytest.raises(ValueError, match="cannot import"):
        load_rewards(["no_such_module_xyz:f"], RewardOptions(), None, torch.device("cpu"))


# --- another tokenizer --------------------------------------------------------------------------------------------
def test_rm_with_another_tokenizer_scores_its_own_tokenisation(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    """A Hugging Face classifier with its own (different) tokenizer: the decoded prompt + response is re-tokenised
    with it (prompt, response, its EOS), and the reward equals that classifier's own logit on those tokens. Our RM,
    saved with the policy's tokenizer, keeps reading the sampled ids."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from instructrl.data import read_prompts, read_texts

    rm_tok = train_tokenizer(read_texts(world_dir / "corpus.jsonl")[:500], vocab_size=300)
    torch.manual_seed(0)
    hf = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(rm_tok), n_embd=32, n_layer=2, n_head=2,
                                                  n_positions=128, num_labels=1, pad_token_id=rm_tok.pad_token_id,
                                                  eos_token_id=rm_tok.eos_token_id)).eval()
    hf.save_pretrained(tmp_path / "hf_rm", safe_serialization=True)
    rm_tok.save_pretrained(tmp_path / "hf_rm")

    policy_tok, policy = load_tokenizer(tiny_sft_dir), load_causal_lm(tiny_sft_dir)
    rewards = load_rewards([str(tmp_path / "hf_rm"), str(tiny_rm_dir)], RewardOptions(), policy_tok,
                           torch.device("cpu"))
    other, ours = rewards.sources
    assert other.tokenizer is not None and ours.tokenizer is None
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:6]
    batch = sample(policy, encode_prompts(policy_tok, prompts, 100), eos_id=policy_tok.eos_token_id,
                   pad_id=policy_tok.pad_token_id, max_new_tokens=10, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    texts = decode_responses(policy_tok, batch)
    with torch.no_grad():
        got = other.score(prompts, texts, batch)
        expected = [float(hf(torch.tensor([rm_tok(p)["input_ids"] + rm_tok(t, add_special_tokens=False)["input_ids"]
                                           + [rm_tok.eos_token_id]])).logits[0, 0]) for p, t in zip(prompts, texts)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_serve_rm_command_answers_the_contract(tiny_rm_dir):
    """`instructrl serve-rm` in its own process: POST {"query": [...]} to /get_reward → {"rewards": [...]}, equal to
    the model's own scores; a body without queries is a 400."""
    import socket
    import subprocess
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", "serve-rm", "--reward", str(tiny_rm_dir),
                             "--port", str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/get_reward"
    tok = load_tokenizer(tiny_rm_dir)
    queries = ["Say hello.\nHello!" + tok.eos_token, "Hi" + tok.eos_token]
    try:
        deadline = time.time() + 120
        while True:  # until it listens
            try:
                got = post_json(url, {"query": queries, "prompts": ["", ""], "labels": None}, 10, 0)["rewards"]
                break
            except RewardError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(urllib.request.Request(url, b'{"prompts": []}',
                                                          {"Content-Type": "application/json"}), timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    model = ScalarHeadModel.from_pretrained(tiny_rm_dir).eval()
    with torch.no_grad():
        expected = [float(model.score(ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1])))
                    for ids in (torch.tensor([tok(q, add_special_tokens=False)["input_ids"]]) for q in queries)]
    assert got == pytest.approx(expected, abs=1e-5)


# --- the reward-server client: a wall-clock deadline, retries, one line -------------------------------------------
@contextlib.contextmanager
def scripted_server(*answers):
    """Answers request i with answers[i] (the last one after that), each a function (handler, n queries) that
    writes the whole HTTP answer. Yields its URL and the list of requests served."""
    served = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"])
            served.append(self.headers.get("Authorization"))
            with contextlib.suppress(OSError):  # the client may have given up
                answers[min(len(served), len(answers)) - 1](self, n)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/reward", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def answer(body: bytes, status: int = 200, length: int | None = None):
    """An answer with `body`, declaring `length` bytes (a larger length: the answer is cut off)."""
    def write(h, n):
        h.send_response(status)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
    return write


def rewards_json(n):
    return json.dumps({"rewards": [0.5] * n}).encode()


def good_answer(h, n):
    answer(json.dumps({"rewards": [0.0] * n}).encode())(h, n)


def drip(where: str):
    """A byte every 0.25 s for 30 s: in the status line and headers, or in the body."""
    def write(h, n):
        body = rewards_json(n).ljust(120)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        whole = head + body if where == "headers" else body
        if where == "body":
            h.wfile.write(head)
        for i in range(120):
            h.wfile.write(whole[i:i + 1])
            h.wfile.flush()
            time.sleep(0.25)
    return write


def query(n=3):
    return {"query": ["a"] * n, "prompts": [""] * n, "labels": None}


def read3(out):
    return torch.as_tensor(out["rewards"]) if len(out.get("rewards", [])) == 3 else (_ for _ in ()).throw(
        ValueError(f"expected 3 rewards, got {out}"))


@pytest.mark.parametrize("where", ["headers", "body"])
def test_the_timeout_is_a_wall_clock_deadline_even_for_a_server_that_drips(where):
    """Each read gets a byte within 0.25 s, so a per-read timeout of 1 s would wait the whole 30 s."""
    with scripted_server(drip(where)) as (url, served):
        t0 = time.time()
        with pytest.raises(RewardError, match=rf"{url}: no whole answer within --reward-timeout 1 s \(after 1 "):
            post_json(url, query(), timeout=1.0, retries=0)
        took = time.time() - t0
    assert 0.9 < took < 3, took


@pytest.mark.parametrize("bad", [answer(b'{"rewards": [0.5, 0.', length=200),  # cut off
                                 answer(b'{"rewards": [0.5,'),                  # not JSON
                                 answer(b'{"rewards": [1]}'),                   # one number for three queries
                                 answer(b"overloaded", status=503)])
def test_a_truncated_or_invalid_answer_is_retried_with_backoff(bad):
    with scripted_server(bad, bad, good_answer) as (url, served):
        t0 = time.time()
        got = post_json(url, query(), timeout=5, retries=2, read=read3)
    assert got.tolist() == [0.0] * 3 and len(served) == 3
    assert time.time() - t0 >= 0.5 + 1.0  # waited 0.5 s, then 1 s
    with scripted_server(bad) as (url, served):
        with pytest.raises(RewardError, match=rf"^reward server {url}: .* \(after 2 attempts\)"):
            post_json(url, query(), timeout=5, retries=1, read=read3)
    assert len(served) == 2


def test_a_refusal_is_not_retried_and_the_token_is_sent(monkeypatch):
    monkeypatch.setenv("INSTRUCTRL_RM_TOKEN", "s3cret")
    with scripted_server(answer(b'{"detail": "missing or wrong token"}', status=401)) as (url, served):
        with pytest.raises(RewardError, match=rf"^reward server {url}: HTTP 401 \(.*wrong token.*not retried$"):
            post_json(url, query(), timeout=5, retries=3)
    assert served == ["Bearer s3cret"]


def test_a_server_that_is_down_fails_after_the_retries_in_one_line():
    with socket_port() as port:  # nothing listens there
        url = f"http://127.0.0.1:{port}/r"
        with pytest.raises(RewardError, match=rf"^reward server {url}: ConnectionRefusedError.*after 2 attempts"):
            post_json(url, query(), timeout=5, retries=1)


@contextlib.contextmanager
def socket_port():
    """A port that was free a moment ago (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


RAISING = '''
def broken(prompts, responses):
    return {}["no such key"]
'''


def test_a_reward_function_that_raises_is_one_line_naming_it(tiny_sft_dir, world_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "raising_rewards.py").write_text(RAISING)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["eval", "--model", tiny_sft_dir, "--prompts", world_dir / "prompts_eval.jsonl", "--reward",
            "raising_rewards:broken", "--max-new-tokens", "4", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert err == "error: reward function raising_rewards:broken raised KeyError: 'no such key'", err


@pytest.mark.parametrize("extra, says", [
    (["--reward-timeout", "-1"], "--reward-timeout must be > 0, not -1.0"),
    (["--reward-timeout", "0"], "--reward-timeout must be > 0, not 0.0"),
    (["--reward-retries", "-1"], "--reward-retries must be >= 0, not -1"),
    (["--reward", "no_such_module:score"], "--reward no_such_module:score: cannot import score from no_such_module"),
    (["--reward", "gold:{tmp}/world"], "--reward gold:{tmp}/world: {tmp}/world has no judge.json"),
    (["--reward", "{tmp}/rm@2"], "--reward {tmp}/rm: no such directory"),
    (["--reward-weights", "1", "--reward-weights", "2"], "--reward-weights: 2 weights for 1 --reward sources")])
@pytest.mark.parametrize("command", ["ppo", "eval"])
def test_reward_options_are_refused_before_any_model_loads(command, extra, says, tmp_path, monkeypatch, capsys):
    """The model paths do not exist: an error about the reward option proves it was checked first."""
    model = ["--policy", tmp_path / "none", "--out", tmp_path / "out"] if command == "ppo" else ["--model",
                                                                                                  tmp_path / "none"]
    args = [command, *model, "--prompts", tmp_path / "p.jsonl", "--reward", "http://127.0.0.1:1/r",
            *(x.format(tmp=tmp_path) for x in extra)]
    monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {says.format(tmp=tmp_path)}") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


FLAKY = '''
CALLS = []

def flaky(prompts, responses):
    CALLS.append(len(prompts))
    if len(CALLS) == 2:
        raise ConnectionError("the scorer went away")
    return [float(len(r)) for r in responses]
'''


def test_resume_ignores_how_the_server_is_called_but_not_what_is_learned(ppo_kw, tmp_path, monkeypatch):
    """Iteration 2's reward fails; the run resumes from step 1 with another --reward-timeout and --reward-retries
    (they change nothing that is learned), but not with another --lr."""
    (tmp_path / "flaky_rewards.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flaky_rewards", None)
    out = tmp_path / "ppo"
    kw = dict(ppo_kw, reward=["flaky_rewards:flaky"], out=str(out), save_every=1)
    with pytest.raises(RewardError, match="flaky_rewards:flaky raised ConnectionError: the scorer went away"):
        train_ppo(PPOConfig(**kw))
    with pytest.raises(ValueError, match=r"other settings: --lr 3e-05 → 0.001"):
        train_ppo(PPOConfig(**kw, resume=True, lr=1e-3, reward_timeout=5.0))
    s = train_ppo(PPOConfig(**kw, resume=True, reward_timeout=5.0, reward_retries=0))
    assert s["episodes"] == 16 and [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    sys.modules.pop("flaky_rewards", None)


def test_the_pipeline_reuses_a_stage_whatever_its_reward_timeout():
    from instructrl.pipeline import stage_fingerprint

    a, b = PPOConfig(reward_timeout=60.0, reward_retries=3), PPOConfig(reward_timeout=2.0, reward_retries=0)
    assert stage_fingerprint(a, contents=False) == stage_fingerprint(b, contents=False)
    assert stage_fingerprint(a, contents=False) != stage_fingerprint(PPOConfig(lr=1.0), contents=False)


# --- serve-rm: limits, auth, fairness, a port in use ----------------------------------------------------------
def test_serve_rm_refuses_what_it_should_and_keeps_serving(tiny_rm_dir):
    import httpx

    model, tok = ScalarHeadModel.from_pretrained(tiny_rm_dir).eval(), load_tokenizer(tiny_rm_dir)
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    with serving_app(rm_app(model, tok, max_body_bytes=1000, max_queries=4, token="s3cret")) as url:
        def post(content, headers=auth):
            r = httpx.post(url, content=content, headers=headers, timeout=30)
            return r.status_code, r.json()["detail"] if r.status_code != 200 else r.json()

        ok = json.dumps({"query": ["Hi", "Say hello.\nHello!"]})
        assert post(ok, {})[0] == 401 and post(ok, {**auth, "Authorization": "Bearer nope"})[0] == 401
        assert post(ok)[0] == 200 and len(post(ok)[1]["rewards"]) == 2
        big = json.dumps({"query": ["x" * 2000]})
        assert post(big) == (413, "request body larger than 1000 bytes (the server's --max-body-bytes)")
        assert post(iter([big[:600].encode(), big[600:].encode()]))[0] == 413  # chunked: no Content-Length
        assert post(json.dumps({"query": ["a"] * 5})) == (413, "5 queries; this server takes at most 4 per request "
                                                               "(its --max-queries)")
        for bad, says in [("{not json", "not JSON"), ('{"query": "Hi"}', 'expected JSON {"query"'),
                          ('{"query": ["Hi", 3]}', "query 1: expected a non-empty string, got 3"),
                          ('{"query": ["Hi", ""]}', "query 1: expected a non-empty string"),
                          ('{"query": ["\\ud800"]}', "query 0 cannot be tokenised (surrogates not allowed"),
                          (b'{"query": ["\xff"]}', "not JSON")]:
            status, detail = post(bad)
            assert status == 400 and says in detail, (bad, detail)
        assert post(ok)[0] == 200  # still serving


def test_the_fair_lock_is_granted_in_arrival_order():
    from instructrl.rm_server import FairLock

    lock, order, threads = FairLock(), [], []
    with lock:
        for i in range(6):
            threads.append(threading.Thread(target=lambda i=i: lock.__enter__() or order.append(i) or
                                            lock.__exit__()))
            threads[-1].start()
            while len(lock._queue) < i + 2:  # it waits in the queue before the next one starts
                time.sleep(0.001)
    for t in threads:
        t.join(10)
    assert order == list(range(6))


def test_a_huge_request_does_not_starve_a_small_one(tiny_rm_dir):
    """Each forward takes 50 ms: a request of 40 chunks takes 2 s; a one-query request sent during it waits for
    one chunk, not for the whole request."""
    model, tok = ScalarHeadModel.from_pretrained(tiny_rm_dir).eval(), load_tokenizer(tiny_rm_dir)
    score = model.score

    def slow(*args):
        time.sleep(0.05)
        return score(*args)

    model.score = slow
    done = {}

    def send(name, n):
        post_json(url, query(n), timeout=60, retries=0)
        done[name] = time.time()

    with serving_app(rm_app(model, tok, batch_size=1)) as url:
        huge = threading.Thread(target=send, args=("huge", 40))
        huge.start()
        time.sleep(0.3)
        t0 = time.time()
        send("small", 1)
        huge.join(60)
    assert done["small"] - t0 < 0.5 and done["small"] < done["huge"] - 0.5, (done["small"] - t0, done)


def test_serve_rm_on_a_port_in_use_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(sys, "argv", ["instructrl", "serve-rm", "--reward", str(tmp_path / "rm"), "--port",
                                          str(port), "--device", "cpu"])
        with pytest.raises(SystemExit) as e:
            cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (f"error: --port {port}: 127.0.0.1:{port} is already in use; stop what "
                                         f"listens there or choose another --port"), err


def test_serve_rm_load_smoke():
    """benchmarks/serve_rm_load.py --smoke: 15 clients and one sending 10 MB bodies, too many queries and a batch
    near the limits, for a few seconds: no 500, every oversized request a 413, the near-limit batch served."""
    import subprocess
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_rm_load.py"
    proc = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=600)
    report = json.JSONDecoder().raw_decode(proc.stdout)[0]
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["no_500"] and report["statuses"] == {"200": report["requests"]} and report["requests"] >= 15
    for kind in ("10MB", "10MB-streamed", "too-many-queries"):
        assert report["heavy"][kind].get("413", 0) >= 1 and set(report["heavy"][kind]) <= {"413", "closed"}, report
    assert report["heavy"]["near-limits"] == {"200": report["heavy"]["near-limits"]["200"]}, report
