"""torchrun with 2 processes (gloo, CPU): data-parallel SFT equals one process on the whole batch, PPO whitening and
KL statistics equal one process's over the same rollouts, rank 0 is the only writer, and a 2-process resume is exact.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WEIGHT_TOL = 1e-6  # abs, after one AdamW step of lr 1e-4: the two runs differ only in float summation order
STAT_TOL = 1e-6    # abs, on whitening mean/var/advantages and rollout metrics

# Run a module under torchrun with an audit hook that records, per rank, every file opened for writing, directory
# made, renamed or removed under WATCH_DIR (safetensors writes from Rust, but only into directories made here).
AUDITED = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    root, writes = os.environ["WATCH_DIR"], []
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
    EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkdtemp", "tempfile.mkstemp"}
    def path_of(x):
        x = os.fspath(x) if isinstance(x, os.PathLike) else x
        x = os.fsdecode(x) if isinstance(x, bytes) else x
        return x if isinstance(x, str) and x.startswith(root) else None
    def hook(event, args):
        if event == "open" and args and path_of(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & WRITE:
                writes.append([event, path_of(args[0])])
        elif event in EVENTS and args and path_of(args[0]):
            writes.append([event, path_of(args[0])])
    sys.addaudithook(hook)
    def report():  # one file per rank: torchrun interleaves the ranks' stdout, even within a line
        with open(os.path.join(os.environ["REPORT_DIR"], "writes.%s.json" % os.environ["RANK"]), "w") as f:
            json.dump({"rank": int(os.environ["RANK"]), "writes": writes}, f)
    atexit.register(report)
    runpy.run_module("instructrl.cli", run_name="__main__", alter_sys=True)
""")

# Fixed rollouts per rank (different counts and lengths); rank 0 writes the 2-process statistics to argv[1].
STATS = textwrap.dedent("""
    import json, sys, torch
    from instructrl import distributed as dist
    from instructrl.losses import masked_whiten
    from instructrl.ppo import whitening
    from instructrl.rollout import rollout_metrics
    sys.path.insert(0, sys.argv[2])
    from test_distributed import fixed_rollout
    dist.init(torch.device("cpu"))
    r = fixed_rollout(dist.rank())
    adv = masked_whiten(r.rewards, r.mask, **whitening(r.rewards, r.mask))
    w = whitening(r.rewards, r.mask)
    rows = dist.gather_cat(adv)
    out = {"mean": float(w["mean"]), "var": float(w["var"]), "whitened": rows.tolist(), **rollout_metrics(r)}
    if dist.is_main():
        json.dump(out, open(sys.argv[1], "w"))
""")


def fixed_rollout(rank: int, width: int = 10):
    """A deterministic batch of experience for one rank: 5 + 3·rank rows, random lengths, shifted scales."""
    from instructrl.rollout import Rollout
    from instructrl.sampling import SampleBatch

    g = torch.Generator().manual_seed(100 + rank)
    B = 5 + 3 * rank
    lengths = torch.randint(1, width + 1, (B,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    lp = -torch.rand(B, width, generator=g) * mask
    ref = -torch.rand(B, width, generator=g) * mask
    rewards = (torch.randn(B, width, generator=g) * (1 + rank) + rank) * mask
    batch = SampleBatch(torch.ones(B, 3, dtype=torch.long), torch.ones(B, 3, dtype=torch.long), mask.clone(), mask,
                        lengths < width)
    r = Rollout(batch, lp, ref, None, torch.randn(B, generator=g), [""] * B, [""] * B)
    r.rewards = rewards  # fixed per-token rewards (the algorithm's shaping is not under test here)
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def audited_cli(tmp_path, *args):
    script = tmp_path / "audited.py"
    script.write_text(AUDITED)
    with tempfile.TemporaryDirectory() as report_dir:  # outside the watched directory
        torchrun(script, *args, env={"WATCH_DIR": str(tmp_path), "REPORT_DIR": report_dir})
        reports = [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("writes.*.json"))]
    return {r["rank"]: r["writes"] for r in reports}


SFT_KW = dict(epochs=1, batch_size=108, lr=1e-4)  # one optimizer step on the whole training set (108 examples)


@pytest.fixture(scope="module")
def one_rank_sft(tiny_lm_dir, world_dir, tmp_path_factory):
    from instructrl.sft import SFTConfig, sft

    out = tmp_path_factory.mktemp("one") / "sft"
    s = sft(SFTConfig(model=str(tiny_lm_dir), data=str(world_dir / "demos.jsonl"), out=str(out), progress=False,
                      device="cpu", **SFT_KW))
    assert s["steps"] == 1 and s["train_examples"] == 108
    return out


def sft_args(tiny_lm_dir, world_dir):
    return ["sft", "--model", tiny_lm_dir, "--data", world_dir / "demos.jsonl", "--device", "cpu",
            *sum(([f"--{k.replace('_', '-')}", v] for k, v in SFT_KW.items()), [])]


def assert_same_step(one, two, start):
    a, b, s = (load_file(d / "model.safetensors") for d in (one, two, start))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_TOL
    assert max((a[k] - s[k]).abs().max().item() for k in a) > 50 * WEIGHT_TOL  # the step did move the weights
    ma, mb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        assert mb[1][key] == pytest.approx(ma[1][key], abs=1e-5), key


def test_sft_two_ranks_half_batch_equal_one_rank_whole_batch(one_rank_sft, tiny_lm_dir, world_dir, tmp_path):
    """1 × 108 vs 2 ranks × 54 (DDP), and rank 1 writes nothing."""
    writes = audited_cli(tmp_path, *sft_args(tiny_lm_dir, world_dir), "--out", tmp_path / "two")
    assert writes[1] == [] and writes[0]
    keys = [load_file(d / "model.safetensors").keys() for d in (one_rank_sft, tmp_path / "two")]
    assert keys[0] == keys[1]
    assert_same_step(one_rank_sft, tmp_path / "two", tiny_lm_dir)


def test_fsdp_sft_smoke(one_rank_sft, tiny_lm_dir, world_dir, tmp_path):
    """Basic FSDP (fully_shard over 2 CPU ranks): the same step as one process; the output gathers whole weights."""
    torchrun("-m", "instructrl.cli", *sft_args(tiny_lm_dir, world_dir), "--out", tmp_path / "fsdp", "--fsdp")
    assert_same_step(one_rank_sft, tmp_path / "fsdp", tiny_lm_dir)


def test_ppo_statistics_over_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "stats.py"
    script.write_text(STATS)
    torchrun(script, tmp_path / "two.json", os.path.dirname(__file__))
    two = json.loads((tmp_path / "two.json").read_text())

    from instructrl.losses import masked_mean, masked_var, masked_whiten
    from instructrl.rollout import Rollout, rollout_metrics
    from instructrl.sampling import SampleBatch

    parts = [fixed_rollout(0), fixed_rollout(1)]
    cat = lambda f: torch.cat([f(r) for r in parts])
    batch = SampleBatch(*(cat(lambda r, a=a: getattr(r.batch, a)) for a in
                          ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended")))
    whole = Rollout(batch, cat(lambda r: r.logprobs), cat(lambda r: r.ref_logprobs), None, cat(lambda r: r.scores),
                    [], [])
    whole.rewards = cat(lambda r: r.rewards)
    mask = whole.mask
    assert two["mean"] == pytest.approx(masked_mean(whole.rewards, mask).item(), abs=STAT_TOL)
    assert two["var"] == pytest.approx(masked_var(whole.rewards, mask).item(), abs=STAT_TOL)
    assert torch.allclose(torch.tensor(two["whitened"]), masked_whiten(whole.rewards, mask), atol=STAT_TOL, rtol=0)
    for key, value in rollout_metrics(whole).items():  # the KL the controller sees, reward, its std, …
        assert two[key] == pytest.approx(value, abs=STAT_TOL), key


def test_ppo_two_ranks_single_writer_and_exact_resume(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    args = ["ppo", "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts", world_dir / "prompts_train.jsonl",
            "--judge", world_dir, "--episodes", 48, "--batch-size", 16, "--minibatch-size", 8, "--max-new-tokens", 10,
            "--ptx-coef", 0.5, "--ptx-data", world_dir / "corpus.jsonl", "--kl-target", 1.0, "--save-every", 1,
            "--device", "cpu"]
    writes = audited_cli(tmp_path, *args, "--out", tmp_path / "a")
    assert writes[1] == [], writes[1]
    assert any("a-checkpoints" in w[1] for w in writes[0]) and any("metrics.jsonl" in w[1] for w in writes[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a-checkpoints", "audited.py"]
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and recs[-1]["train/episodes"] == 48
    assert recs[0]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5) and abs(recs[0]["objective/kl"]) < 1e-4
    ckpt = tmp_path / "a-checkpoints" / "step-00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["metrics.jsonl", "model.policy.safetensors",
                                                      "model.value.safetensors", "optimizer.safetensors",
                                                      "rng.rank1.safetensors", "rng.safetensors", "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    # Resume from iteration 1 (each rank restores its own random streams): the same result, bit for bit.
    (tmp_path / "a-checkpoints").rename(tmp_path / "b-checkpoints")
    for p in (tmp_path / "b-checkpoints").iterdir():
        if p.name != "step-00000001":
            p.rename(tmp_path / f"old-{p.name}")
    torchrun("-m", "instructrl.cli", *args, "--out", tmp_path / "b", "--resume")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
                       for x in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")



def test_ppo_two_ranks_held_out_evaluation_changes_no_weight(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    """--eval-every over 2 ranks: 7 held-out prompts (shares of 4 and 3, the short one padded so both score as many
    chunks: a whitened reward is a collective), every iteration; the weights are those of the run without it."""
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join((world_dir / "prompts_eval.jsonl").read_text().splitlines(True)[:7]))
    args = ["ppo", "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts", world_dir / "prompts_train.jsonl",
            "--judge", world_dir, "--episodes", 32, "--batch-size", 8, "--minibatch-size", 4, "--max-new-tokens", 8,
            "--reward-normalize", "--device", "cpu"]
    torchrun("-m", "instructrl.cli", *args, "--out", tmp_path / "a", "--eval-every", 1, "--eval-prompts", evals)
    torchrun("-m", "instructrl.cli", *args, "--out", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval/score" in r] == [0, 1, 2, 3, 4]
    assert abs(recs[0]["eval/kl"]) < 1e-4 and len(recs[0]["eval/samples"]) == 4

# --- FSDP + LoRA + checkpoints: SIGKILL after a checkpoint, --resume, the same final weights -----------------------
def torchrun_cmd(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "instructrl.cli", *map(str, args)]


def kill_two_ranks_after_first_checkpoint(args, ckpt_dir):
    """test_resume's kill_after_first_checkpoint for torchrun: SIGKILL the launcher and both ranks (its process
    group) as soon as the first checkpoint is complete."""
    p = subprocess.Popen(torchrun_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 240
    while not (ckpt_dir.is_dir() and any(x.name.startswith("step-") for x in ckpt_dir.iterdir())):
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def assert_fsdp_resume_identical(args, tmp_path, outputs, check_checkpoint):
    """An uninterrupted 2-process FSDP run vs one killed after its first checkpoint (`check_checkpoint(dir)`) and
    resumed: the same safetensors in every output file (`outputs`, relative to OUT), bitwise; and the same metrics."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    torchrun("-m", "instructrl.cli", *args, "--out", ref)
    kill_two_ranks_after_first_checkpoint([*args, "--out", out], tmp_path / "run-checkpoints")
    assert not out.exists(), "a killed run must not leave a half-written output"
    ckpt = sorted((tmp_path / "run-checkpoints").glob("step-*"))[0]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    check_checkpoint(ckpt)
    torchrun("-m", "instructrl.cli", *args, "--out", out, "--resume")
    for name in outputs:
        a, b = load_file(ref / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
                       for x in p.read_text().splitlines()]
    assert strip(ref / "metrics.jsonl") == strip(out / "metrics.jsonl")


def test_fsdp_lora_sft_sigkill_resume_is_identical(tiny_lm_dir, world_dir, tmp_path):
    """SFT, --fsdp --lora-r 4: checkpoints hold the gathered adapters (and the best ones) and Adam state; the final
    save is the merged model, as one process without FSDP writes it (to 1e-6)."""
    from instructrl.sft import SFTConfig, sft

    kw = dict(epochs=2, batch_size=36, lr=1e-3, eval_every=2, patience=100)
    args = ["sft", "--model", tiny_lm_dir, "--data", world_dir / "demos.jsonl", "--device", "cpu", "--fsdp",
            "--lora-r", 4, "--save-every", 2, *sum(([f"--{k.replace('_', '-')}", v] for k, v in kw.items()), [])]

    def check(ckpt):
        saved = load_file(ckpt / "model.model.safetensors")
        assert saved and all("lora_" in k for k in saved)  # the adapters only: the frozen base is re-read
        assert load_file(ckpt / "optimizer.safetensors")

    assert_fsdp_resume_identical(args, tmp_path, ["model.safetensors", "lora_adapter/adapter_model.safetensors"],
                                 check)
    sft(SFTConfig(model=str(tiny_lm_dir), data=str(world_dir / "demos.jsonl"), out=str(tmp_path / "one"),
                  progress=False, device="cpu", lora_r=4, **kw))
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_TOL


def test_fsdp_lora_ppo_sigkill_resume_is_identical(tiny_sft_dir, tiny_rm_dir, world_dir, tmp_path):
    """PPO, --fsdp --lora-r 4 (policy and value model sharded, adapters trained, the reference = adapters off)."""
    args = ["ppo", "--policy", tiny_sft_dir, "--reward", tiny_rm_dir, "--prompts", world_dir / "prompts_train.jsonl",
            "--episodes", 48, "--batch-size", 16, "--minibatch-size", 8, "--max-new-tokens", 8, "--kl-target", 1.0,
            "--device", "cpu", "--fsdp", "--lora-r", 4, "--save-every", 1]

    def check(ckpt):
        assert sorted(p.name for p in ckpt.iterdir()) == ["metrics.jsonl", "model.policy.safetensors",
                                                          "model.value.safetensors", "optimizer.safetensors",
                                                          "rng.rank1.safetensors", "rng.safetensors", "state.json"]
        assert all("lora_" in k for k in load_file(ckpt / "model.policy.safetensors"))

    assert_fsdp_resume_identical(args, tmp_path, ["model.safetensors", "value_model/model.safetensors"], check)
