"""The RL and ranking math against float64 references written independently here, with plain loops."""
import math

import pytest
import torch

from instructrl import losses as L



def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mask_of(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)


# --- ranking loss ---------------------------------------------------------------------------------------------
def ranking_ref(r, order):
    """−1/C · Σ over (better, worse) pairs of log σ(r_w − r_l); `order` is groups best first."""
    pairs = [(w, l) for i, g in enumerate(order) for h in order[i + 1:] for w in g for l in h]
    return -sum(math.log(1 / (1 + math.exp(-(r[w] - r[l])))) for w, l in pairs) / len(pairs)


def test_ranking_loss_k2_by_hand():
    r = f64([1.0, -0.5])
    # −log σ(1.5) = log(1 + e^{−1.5})
    assert L.ranking_loss(r, [[[0], [1]]]).item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-12)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_ranking_loss_k_way(k):
    r = rand(k, seed=k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).tolist()
    groups = [[i] for i in perm]
    assert len(L.ranking_pairs([groups])[0]) == math.comb(k, 2)
    assert L.ranking_loss(r, [groups]).item() == pytest.approx(ranking_ref(r.tolist(), groups), abs=1e-12)


def test_ranking_loss_with_tie_skips_tied_pair():
    r = rand(4, seed=3)
    groups = [[2], [0, 3], [1]]  # 0 and 3 tie: 5 pairs instead of 6
    assert len(L.ranking_pairs([groups])[0]) == 5
    assert L.ranking_loss(r, [groups]).item() == pytest.approx(ranking_ref(r.tolist(), groups), abs=1e-12)


def test_ranking_loss_batch_is_mean_over_prompts_with_varying_k():
    r = rand(2 + 4 + 9, seed=5)
    gs = [[[1], [0]], [[3], [0], [2], [1]], [[i] for i in range(9)]]
    refs = [ranking_ref(r[:2].tolist(), gs[0]), ranking_ref(r[2:6].tolist(), gs[1]), ranking_ref(r[6:].tolist(), gs[2])]
    assert L.ranking_loss(r, gs).item() == pytest.approx(sum(refs) / 3, abs=1e-12)


def test_ranking_loss_without_a_ranked_pair_is_zero_not_nan():
    r = rand(3 + 2 + 4, seed=6).requires_grad_()
    all_tied = [[[0, 1, 2]], [[0, 1]]]
    loss = L.ranking_loss(r[:5], all_tied)  # no prompt of the batch has a (winner, loser) pair
    assert loss.item() == 0.0
    loss.backward()
    assert r.grad.abs().max().item() == 0.0
    # a tied prompt beside a ranked one: the mean over the prompts that have pairs, as the float64 reference
    gs = [[[0, 1, 2]], [[1], [0]], [[3], [0, 2], [1]]]
    refs = [ranking_ref(r[3:5].tolist(), gs[1]), ranking_ref(r[5:].tolist(), gs[2])]
    assert L.ranking_loss(r.detach(), gs).item() == pytest.approx(sum(refs) / 2, abs=1e-12)


def test_pairwise_accuracy():
    r = f64([3.0, 1.0, 2.0])
    assert L.pairwise_accuracy(r, [[[0], [1], [2]]]) == (2, 3)


# --- KL and reward shaping ---------------------------------------------------------------------------------------
def test_kl_estimators():
    lp, ref = rand(3, 5, seed=1), rand(3, 5, seed=2)
    for b in range(3):
        for t in range(5):
            l = lp[b, t].item() - ref[b, t].item()
            assert L.kl_k1(lp, ref)[b, t].item() == pytest.approx(l, abs=1e-12)
            assert L.kl_k3(lp, ref)[b, t].item() == pytest.approx(math.exp(-l) - 1 + l, abs=1e-12)
    assert (L.kl_k3(lp, ref) >= 0).all()
    assert L.kl_k1(lp, lp).abs().max().item() == 0.0
    assert L.kl_k3(lp, lp).abs().max().item() == 0.0


def test_shaped_rewards_put_score_on_last_real_token():
    kl, score = rand(3, 6, seed=4), f64([1.0, -2.0, 0.5])
    lengths = [6, 3, 1]
    mask, beta = mask_of(lengths, 6), 0.1
    r = L.shaped_rewards(score, kl, mask, beta)
    for b, n in enumerate(lengths):
        for t in range(6):
            expect = 0.0 if t >= n else -beta * kl[b, t].item() + (score[b].item() if t == n - 1 else 0.0)
            assert r[b, t].item() == pytest.approx(expect, abs=1e-12)


# --- GAE, whitening --------------------------------------------------------------------------------------------
def gae_ref(rewards, values, n, gamma, lam):
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    ret = [adv[t] + values[t] if t < n else 0.0 for t in range(len(rewards))]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_backward_loop(gamma, lam):
    T, lengths = 7, [7, 4, 1, 5]
    rewards, values, mask = rand(4, T, seed=6), rand(4, T, seed=7), mask_of(lengths, T)
    adv, ret = L.gae(rewards * mask, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        a_ref, r_ref = gae_ref(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b].tolist() == pytest.approx(a_ref, abs=1e-10)
        assert ret[b].tolist() == pytest.approx(r_ref, abs=1e-10)


def test_reward_to_go():
    rewards, mask = rand(2, 5, seed=8), mask_of([5, 2], 5)
    g = L.reward_to_go(rewards * mask, mask, 1.0)
    for b, n in enumerate([5, 2]):
        for t in range(5):
            assert g[b, t].item() == pytest.approx(sum(rewards[b, t:n].tolist()) if t < n else 0.0, abs=1e-10)


def test_masked_whiten_uses_only_real_tokens_and_biased_variance():
    x, mask = rand(3, 6, seed=9), mask_of([6, 2, 4], 6)
    vals = [x[b, t].item() for b in range(3) for t in range(6) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased
    w = L.masked_whiten(x, mask)
    for b in range(3):
        for t in range(6):
            expect = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(expect, abs=1e-10)
    kept = L.masked_whiten(x, mask, shift_mean=False)
    assert kept[0, 0].item() == pytest.approx((x[0, 0].item() - mean) / math.sqrt(var + 1e-8) + mean, abs=1e-10)


def test_leave_one_out_baseline():
    g = f64([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert L.leave_one_out_baseline(g, 3).tolist() == pytest.approx([2.5, 2.0, 1.5, 25.0, 20.0, 15.0])


# --- PPO and PG losses -------------------------------------------------------------------------------------------
def test_ppo_policy_loss_matches_loop():
    T, lengths, eps = 5, [5, 3], 0.2
    logp, old, adv, mask = rand(2, T, seed=10) * 0.3, rand(2, T, seed=11) * 0.3, rand(2, T, seed=12), mask_of(lengths, T)
    loss, stats = L.ppo_policy_loss(logp, old, adv, mask, eps)
    terms, clipped = [], 0
    for b, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            u, c = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(u, c))
            clipped += c > u
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(clipped / len(terms), abs=1e-12)


def test_ppo_ratio_is_one_when_policy_equals_old():
    logp, adv, mask = rand(2, 4, seed=13), rand(2, 4, seed=14), mask_of([4, 2], 4)
    loss, stats = L.ppo_policy_loss(logp, logp.clone(), adv, mask)
    assert stats["ratio_mean"].item() == 1.0 and stats["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-12)


def test_value_loss_matches_loop():
    T, lengths, eps = 4, [4, 2], 0.2
    v, v_old, ret, mask = rand(2, T, seed=15), rand(2, T, seed=16), rand(2, T, seed=17), mask_of(lengths, T)
    loss, _ = L.value_loss(v, v_old, ret, mask, eps)
    terms = []
    for b, n in enumerate(lengths):
        for t in range(n):
            vc = v_old[b, t].item() + min(max(v[b, t].item() - v_old[b, t].item(), -eps), eps)
            terms.append(max((v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)


def test_pg_loss_and_pads_carry_nothing():
    logp = rand(2, 4, seed=18).requires_grad_()
    adv, mask = rand(2, 4, seed=19), mask_of([4, 1], 4)
    loss = L.pg_loss(logp, adv, mask)
    ref = -sum(adv[b, t].item() * logp[b, t].item() for b, n in enumerate([4, 1]) for t in range(n)) / 5
    assert loss.item() == pytest.approx(ref, abs=1e-12)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all()


def test_ptx_loss():
    lp, mask = rand(2, 3, seed=20), mask_of([3, 2], 3)
    ref = -2.0 * sum(lp[b, t].item() for b, n in enumerate([3, 2]) for t in range(n)) / 5
    assert L.ptx_loss(lp, mask, 2.0).item() == pytest.approx(ref, abs=1e-12)


def test_adaptive_kl_controller():
    # KL 2x target: error clipped to +0.2 → β·(1 + 0.2·64/10000)
    assert L.adaptive_kl_beta(0.1, 12.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert L.adaptive_kl_beta(0.1, 6.6, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert L.adaptive_kl_beta(0.1, 0.0, 6.0, 100, 100) == pytest.approx(0.1 * 0.8)
