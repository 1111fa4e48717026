"""Shared fixtures: a small embedded world and tiny models built from configs, saved to and loaded from disk."""
import os

import pytest
import torch
import transformers

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from instructrl.world import WorldConfig, generate_world
    from instructrl.world.generator import TASK_TYPES

    d = tmp_path_factory.mktemp("world") / "w"
    # the earlier task mix (the sums, all 100 of them, 1/8 of the questions for eval, demonstrations of every task
    # type): the tiny runs' trends were tuned on it
    generate_world(d, WorldConfig(seed=0, n_corpus=3000, n_corpus_val=200, n_demos=120, n_prompts_train=200,
                                  n_prompts_eval=40, max_operand=9, n_countries=24, eval_share=0.125,
                                  task_types=list(TASK_TYPES), demo_types=list(TASK_TYPES)))
    return d


@pytest.fixture(scope="session")
def tiny_lm_dir(world_dir, tmp_path_factory):
    """A tiny pretrained GPT on the small world (a few seconds of training)."""
    from instructrl.pretrain import PretrainConfig, pretrain

    d = tmp_path_factory.mktemp("lm") / "pretrained"
    pretrain(PretrainConfig(corpus=str(world_dir / "corpus.jsonl"), out=str(d), vocab_size=600, n_layer=2,
                            n_embd=64, n_head=2, steps=60, batch_size=16, progress=False))
    return d


@pytest.fixture(scope="session")
def tiny_sft_dir(tiny_lm_dir, world_dir, tmp_path_factory):
    from instructrl.sft import SFTConfig, sft

    d = tmp_path_factory.mktemp("sft") / "sft"
    sft(SFTConfig(model=str(tiny_lm_dir), data=str(world_dir / "demos.jsonl"), out=str(d), epochs=1, lr=1e-3,
                  progress=False, device="cpu"))
    return d


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_sft_dir, world_dir, tmp_path_factory):
    from instructrl.data import read_prompts, write_jsonl
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.reward import RewardConfig, train_reward_model
    from instructrl.world import GoldJudge
    from instructrl.world.labelers import simulate_rankings

    base = tmp_path_factory.mktemp("rm")
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:40]
    recs = simulate_rankings(load_causal_lm(tiny_sft_dir), load_tokenizer(tiny_sft_dir), prompts,
                             GoldJudge.from_world(world_dir), k=4, max_new_tokens=16)
    write_jsonl(base / "rankings.jsonl", recs)
    train_reward_model(RewardConfig(model=str(tiny_sft_dir), data=str(base / "rankings.jsonl"),
                                    demos=str(world_dir / "demos.jsonl"), out=str(base / "rm"), progress=False,
                                    device="cpu"))
    return base / "rm"


@pytest.fixture
def cli_main(monkeypatch):
    """`instructrl ARGS...` in-process through the real entry point (cli.main): its exit code."""
    import sys

    from instructrl import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["instructrl", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        return e.value.code
    return run
