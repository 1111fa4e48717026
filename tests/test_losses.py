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


# --- KL estimators in the loss ----------------------------------------------------------------------------------
def test_kl_k2_matches_loop():
    a, b = rand(3, 5, seed=11), rand(3, 5, seed=12)
    ref = [[0.5 * (a[i, t].item() - b[i, t].item()) ** 2 for t in range(5)] for i in range(3)]
    assert torch.allclose(L.kl_k2(a, b), f64(ref), atol=1e-14)


def categorical_case(theta_logits):
    """Three categories; π_old = (1/2, 1/4, 1/4) exactly, so the 4 'sampled' tokens (0, 0, 1, 2) average to the
    exact expectation under π_old. Returns (loss function of the estimator, θ logits, p_θ, q = π_ref)."""
    old = torch.log(f64([0.5, 0.25, 0.25]))
    ref_logits = f64([0.3, -0.4, 0.9])
    tokens = torch.tensor([0, 0, 1, 2])
    theta = f64(theta_logits).requires_grad_(True)

    def loss(estimator):
        logp = torch.log_softmax(theta, 0)[tokens][None]
        ones = torch.ones(1, 4, dtype=torch.float64)
        return L.masked_mean(L.kl_loss_terms(logp, old[tokens][None], torch.log_softmax(ref_logits, 0)[tokens][None],
                                             ones, estimator), ones)

    p = [math.exp(x) for x in torch.log_softmax(theta.detach(), 0).tolist()]
    q = [math.exp(x) for x in torch.log_softmax(ref_logits, 0).tolist()]
    return loss, theta, p, q


def reverse_kl_grad(p, q):
    """∂/∂z_j KL(p‖q) for p = softmax(z): p_j (log p_j − log q_j − KL), written out."""
    kl = sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(len(p)))
    return [p[j] * (math.log(p[j]) - math.log(q[j]) - kl) for j in range(len(p))]


@pytest.mark.parametrize("theta_logits", [[math.log(0.5), math.log(0.25), math.log(0.25)], [0.2, -0.1, 0.5]])
def test_k3_in_the_loss_with_the_ratio_has_the_reverse_kl_gradient(theta_logits):
    """On- and off-policy (θ ≠ old), ∇ E_old[ρ·k3] = ∇ KL(π_θ‖π_ref) exactly; its value is the KL itself."""
    loss, theta, p, q = categorical_case(theta_logits)
    value = loss("k3")
    value.backward()
    assert torch.allclose(theta.grad, f64(reverse_kl_grad(p, q)), atol=1e-12)
    assert value.item() == pytest.approx(sum(p[i] * math.log(p[i] / q[i]) for i in range(3)), abs=1e-12)


def test_k3_without_the_ratio_has_the_forward_kl_gradient():
    """The pitfall the ratio corrects: on-policy, ∇ E[k3] (no ratio) is ∇ KL(π_ref‖π_θ) = p − q, not the reverse."""
    _, theta, p, q = categorical_case([math.log(0.5), math.log(0.25), math.log(0.25)])
    tokens = torch.tensor([0, 0, 1, 2])
    L.kl_k3(torch.log_softmax(theta, 0)[tokens], torch.log(f64(q))[tokens]).mean().backward()
    assert torch.allclose(theta.grad, f64([p[j] - q[j] for j in range(3)]), atol=1e-12)
    assert not torch.allclose(theta.grad, f64(reverse_kl_grad(p, q)), atol=1e-3)


def test_k2_in_the_loss_on_policy_has_the_reverse_kl_gradient():
    loss, theta, p, q = categorical_case([math.log(0.5), math.log(0.25), math.log(0.25)])
    loss("k2").backward()
    assert torch.allclose(theta.grad, f64(reverse_kl_grad(p, q)), atol=1e-12)


def test_k1_has_no_loss_form():
    with pytest.raises(ValueError, match="k2 \\| k3"):
        L.kl_loss_terms(rand(2, 3), rand(2, 3), rand(2, 3), torch.ones(2, 3), "k1")


def test_k3_in_the_loss_ignores_a_padding_log_prob_below_float32_exp_range():
    """log π(PAD) = −100 at a padding position: e^{100} overflows float32 and inf·0 was NaN; masked before the
    exponent, the loss is the one real token's β·ρ·k3 and its gradient is finite."""
    logp = torch.tensor([[-1.0, -100.0]], requires_grad=True)
    loss = L.kl_in_loss(logp, torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.2, 0.0]]), torch.tensor([[1.0, 0.0]]),
                        0.05, "k3")
    want = 0.05 * (math.expm1(-0.2) + 0.2)  # ρ = 1, ℓ = 0.2 on the real token
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1].item() == 0.0


@pytest.mark.parametrize("estimator,mode", [("k2", "token"), ("k3", "sequence"), ("k3", "dr_grpo")])
def test_kl_in_loss_matches_loop(estimator, mode):
    lengths, T, beta = [4, 1, 3], 4, 0.1
    m = mask_of(lengths, T)
    logp, old, ref = rand(3, T, seed=41) * 0.5, rand(3, T, seed=42) * 0.5, rand(3, T, seed=43) * 0.5
    per_row = []
    for i in range(3):
        terms = []
        for t in range(lengths[i]):
            lr = logp[i, t].item() - ref[i, t].item()
            k = 0.5 * lr ** 2 if estimator == "k2" else \
                math.exp(logp[i, t].item() - old[i, t].item()) * (math.expm1(-lr) + lr)
            terms.append(k)
        per_row.append(terms)
    flat = [k for row in per_row for k in row]
    want = {"token": sum(flat) / len(flat), "sequence": sum(sum(r) / len(r) for r in per_row) / 3,
            "dr_grpo": sum(flat) / (T * 3)}[mode]
    got = L.kl_in_loss(logp, old, ref, m, beta, estimator, mode, max_len=T)
    assert got.item() == pytest.approx(beta * want, abs=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_in_reward_matches_loop(estimator):
    lengths, T, beta = [3, 1], 4, 0.2
    m = mask_of(lengths, T)
    logp, ref, scores = rand(2, T, seed=44), rand(2, T, seed=45), rand(2, seed=46)
    got = L.kl_in_reward(scores, logp, ref, m, beta, estimator)
    for i in range(2):
        for t in range(T):
            lr = logp[i, t].item() - ref[i, t].item()
            k = lr if estimator == "k1" else math.expm1(-lr) + lr
            want = (-beta * k if t < lengths[i] else 0.0) + (scores[i].item() if t == lengths[i] - 1 else 0.0)
            assert got[i, t].item() == pytest.approx(want, abs=1e-12)


# --- GRPO: group advantages and loss aggregation ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_loop(scale):
    k, r = 4, rand(12, seed=21)
    out = L.group_advantages(r, k, scale)
    for g in range(3):
        xs = r[g * k:(g + 1) * k].tolist()
        mean = sum(xs) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (k - 1))  # unbiased, as TRL
        for i, x in enumerate(xs):
            want = (x - mean) / (std + 1e-4) if scale else x - mean
            assert out[g * k + i].item() == pytest.approx(want, abs=1e-12)


def test_loss_aggregation_modes_match_loops():
    x, lengths, T = rand(3, 5, seed=22), [5, 2, 3], 5
    m = mask_of(lengths, T)
    tokens = [x[i, t].item() for i in range(3) for t in range(lengths[i])]
    assert L.aggregate(x, m, "token").item() == pytest.approx(sum(tokens) / len(tokens), abs=1e-12)
    seq = [sum(x[i, t].item() for t in range(lengths[i])) / lengths[i] for i in range(3)]
    assert L.aggregate(x, m, "sequence").item() == pytest.approx(sum(seq) / 3, abs=1e-12)
    assert L.aggregate(x, m, "dr_grpo", max_len=8).item() == pytest.approx(sum(tokens) / (8 * 3), abs=1e-12)
    with pytest.raises(ValueError, match="token \\| sequence \\| dr_grpo"):
        L.aggregate(x, m, "mean")


@pytest.mark.parametrize("mode", ["token", "sequence", "dr_grpo"])
def test_loss_aggregation_shares_sum_to_the_whole_batch(mode):
    """Micro-batches normalised by the whole batch's token and row counts (`n`, `rows`) sum to the whole batch's
    aggregate: what gradient accumulation and several ranks rely on."""
    x, m = rand(5, 6, seed=47), mask_of([6, 1, 3, 4, 2], 6)
    parts = sum(L.aggregate(x[rows], m[rows], mode, 6, n=m.sum(), rows=5) for rows in ([0, 1], [2], [3, 4]))
    assert parts.item() == pytest.approx(L.aggregate(x, m, mode, 6).item(), abs=1e-12)


def test_clipped_surrogate_per_token_matches_ppo_loss():
    logp, old, adv = rand(2, 4, seed=23) * 0.3, rand(2, 4, seed=24) * 0.3, rand(2, 4, seed=25)
    m = mask_of([4, 2], 4)
    per_token, *_ = L.clipped_surrogate(logp, old, adv, m, 0.2)
    for i, n in enumerate([4, 2]):
        for t in range(n):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            assert per_token[i, t].item() == pytest.approx(max(-a * rho, -a * min(max(rho, 0.8), 1.2)), abs=1e-12)
    assert L.ppo_policy_loss(logp, old, adv, m, 0.2)[0].item() == pytest.approx(
        L.masked_mean(per_token, m).item(), abs=1e-15)


# --- DPO family ---------------------------------------------------------------------------------------------------
def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def dpo_ref(pi, ref, groups_per_prompt, beta, kind, eps):
    """Loss and d loss / d log π(response), prompt by prompt, pair by pair."""
    loss, grad, offset = 0.0, [0.0] * len(pi), 0
    n_prompts = len(groups_per_prompt)
    for groups in groups_per_prompt:
        pairs = [(offset + w, offset + l) for i, g in enumerate(groups) for h in groups[i + 1:] for w in g for l in h]
        for w, l in pairs:
            h = (pi[w] - ref[w]) - (pi[l] - ref[l])
            if kind == "ipo":
                value, slope = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
            else:
                value = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
                slope = -(1 - eps) * beta / (1 + math.exp(beta * h)) + eps * beta / (1 + math.exp(-beta * h))
            loss += value / len(pairs) / n_prompts
            grad[w] += slope / len(pairs) / n_prompts
            grad[l] -= slope / len(pairs) / n_prompts
        offset += sum(len(g) for g in groups)
    return loss, grad


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_family_losses_and_gradients_match_loops_on_k_way_rankings(kind, eps):
    groups = [[[1], [0]], [[3], [0, 2], [1]], [[i] for i in range(5)]]  # K = 2, 4 with a tie, 5
    pi, ref = rand(11, seed=31), rand(11, seed=32)
    pi.requires_grad_(True)
    loss, stats = L.dpo_loss(pi, ref, groups, beta=0.3, kind=kind, label_smoothing=eps)
    loss.backward()
    want, want_grad = dpo_ref(pi.tolist(), ref.tolist(), groups, 0.3, kind, eps)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(pi.grad, f64(want_grad), atol=1e-12)
    win, lose, _ = L.ranking_pairs(groups)
    margins = [0.3 * ((pi[w] - ref[w]) - (pi[l] - ref[l])).item() for w, l in zip(win.tolist(), lose.tolist())]
    assert stats["margin"].item() == pytest.approx(sum(margins) / len(margins), abs=1e-12)
    assert stats["accuracy"].item() == pytest.approx(sum(m > 0 for m in margins) / len(margins), abs=1e-12)


def test_dpo_on_pairs_is_the_plain_pairwise_formula():
    """K = 2: one pair per prompt, so the per-prompt grouping is the mean of −log σ(β·h) over pairs [DPO]."""
    n, beta = 6, 0.5
    pi, ref = rand(2 * n, seed=33), rand(2 * n, seed=34)
    plain = -sum(log_sigmoid(beta * ((pi[2 * i] - ref[2 * i]) - (pi[2 * i + 1] - ref[2 * i + 1])).item())
                 for i in range(n)) / n
    loss, _ = L.dpo_loss(pi, ref, [[[0], [1]]] * n, beta)
    assert loss.item() == pytest.approx(plain, abs=1e-12)


def test_dpo_without_a_ranked_pair_is_zero_not_nan():
    """As ranking_loss: a batch of all-tied rankings has nothing to learn; 0 with zero gradient, finite stats."""
    pi = rand(5, seed=36).requires_grad_()
    loss, stats = L.dpo_loss(pi, torch.zeros(5, dtype=torch.float64), [[[0, 1, 2]], [[0, 1]]], 0.1)
    assert loss.item() == 0.0 and all(math.isfinite(float(v)) for v in stats.values())
    loss.backward()
    assert pi.grad.abs().max().item() == 0.0


def test_dpo_groups_per_prompt_not_per_pair():
    """A prompt with 6 pairs weighs as much as a prompt with 1 (as the InstructGPT RM loss), unlike a pair mean."""
    groups = [[[0], [1]], [[i] for i in range(4)]]
    pi, ref = rand(6, seed=35), torch.zeros(6, dtype=torch.float64)
    per_prompt = [dpo_ref(pi[:2].tolist(), [0.0] * 2, groups[:1], 1.0, "sigmoid", 0.0)[0],
                  dpo_ref(pi[2:].tolist(), [0.0] * 4, groups[1:], 1.0, "sigmoid", 0.0)[0]]
    assert L.dpo_loss(pi, ref, groups, 1.0)[0].item() == pytest.approx(sum(per_prompt) / 2, abs=1e-12)
    win, lose, _ = L.ranking_pairs(groups)
    pair_mean = -sum(log_sigmoid((pi[w] - pi[l]).item()) for w, l in zip(win.tolist(), lose.tolist())) / 7
    assert L.dpo_loss(pi, ref, groups, 1.0)[0].item() != pytest.approx(pair_mean, abs=1e-6)
