"""Models and datasets by Hub id, read from a Hugging Face cache built here (no network): SFT runs by id offline; an
id absent from the cache, or a missing local path, fails at once with one line and exit code 2."""
import shutil
import sys
import time

import pytest
import yaml

from instructrl import cli, hub
from instructrl.hub import looks_like_id

REV = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "http://10.255.255.1"  # a blackhole address: any request there would hang until a timeout


def cached(cache, repo_type: str, repo_id: str, files: dict):
    """The layout huggingface_hub writes: <type>s--org--name/snapshots/<rev>/… and refs/main naming <rev>."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / REV
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, snap / name)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.delenv("INSTRUCTRL_ALLOW_DOWNLOADS", raising=False)
    return cache


def test_sft_by_hub_id_reads_model_and_data_from_the_cache(tiny_lm_dir, world_dir, offline_cache, tmp_path):
    from instructrl.sft import SFTConfig, sft

    cached(offline_cache, "model", "tiny-org/tiny-gpt", {p.name: p for p in tiny_lm_dir.iterdir() if p.is_file()})
    cached(offline_cache, "dataset", "tiny-org/demos", {"data/train.jsonl": world_dir / "demos.jsonl"})
    s = sft(SFTConfig(model="tiny-org/tiny-gpt", data="tiny-org/demos", out=str(tmp_path / "sft"), epochs=1,
                      batch_size=32, progress=False, device="cpu"))
    assert s["steps"] >= 1 and (tmp_path / "sft" / "model.safetensors").is_file()
    assert s["config"]["model"] == "tiny-org/tiny-gpt"
    front = yaml.safe_load((tmp_path / "sft" / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == "tiny-org/tiny-gpt" and front["datasets"] == ["tiny-org/demos"]  # the card
    assert not (tmp_path / "tiny-org").exists()  # the id never became a local path


@pytest.mark.parametrize("model, data, named", [
    ("absent-org/absent-model", None, "no model with this Hub id in the Hugging Face cache"),
    (None, "absent-org/absent-data", "no dataset with this Hub id in the Hugging Face cache"),
    ("no-such-dir/model", None, "INSTRUCTRL_ALLOW_DOWNLOADS=1"),  # a mistyped local path: the same, at once
])
def test_an_id_absent_from_the_cache_fails_at_once_with_exit_2(model, data, named, tiny_lm_dir, world_dir,
                                                               offline_cache, tmp_path, monkeypatch, capsys):
    offline_cache.mkdir()
    args = ["sft", "--model", model or tiny_lm_dir, "--data", data or world_dir / "demos.jsonl",
            "--out", tmp_path / "out", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
    lookups = []  # seconds of each cache lookup: where a network request would hang

    def timed(path, repo_type="model", local=hub.local):
        t0 = time.monotonic()
        try:
            return local(path, repo_type)
        finally:
            lookups.append(time.monotonic() - t0)
    monkeypatch.setattr(hub, "local", timed)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        cli.main()
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    # the lookup that fails answers in well under 5 s; the whole command too on an idle machine (the bound on it
    # is loose: the tests share their CPUs)
    assert e.value.code == 2 and max(lookups) < 5 and seconds < 60, (lookups, seconds, err)
    assert err.startswith("error:") and "\n" not in err and named in err and (model or data) in err, err
    assert not (tmp_path / "out").exists()


def test_what_counts_as_a_hub_id():
    assert looks_like_id("Qwen/Qwen2.5-0.5B-Instruct") and looks_like_id("Anthropic/hh-rlhf")
    for name in ("model", "./org/name", "/abs/name", "a/b/c", "../up", "org/..", "data/demos.jsonl", "-x/y"):
        assert not looks_like_id(name), name
