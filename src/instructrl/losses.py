"""The pure math of RLHF: each function reads like the equation it cites (tags: docs/references.md).

Shapes: [B, T] tensors over response tokens with a 0/1 `mask` (1 = real token, EOS included; 0 = PAD after EOS).
Nothing here touches models, files or global state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --- Step 2: reward model ---------------------------------------------------------------------------------
def ranking_pairs(groups_per_prompt: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten K-way rankings into (winner, loser, prompt) index tensors over the concatenated responses.

    groups_per_prompt[i] is prompt i's ranking as groups of tied indices (best first); indices are local to
    the prompt and are offset here by the number of responses before it. Tied pairs are skipped [IG Eq. 1].
    """
    win, lose, elem, offset = [], [], [], 0
    for i, groups in enumerate(groups_per_prompt):
        for a, better in enumerate(groups):
            for worse in groups[a + 1:]:
                for w in better:
                    for l in worse:
                        win.append(offset + w)
                        lose.append(offset + l)
                        elem.append(i)
        offset += sum(len(g) for g in groups)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)
    return as_long(win), as_long(lose), as_long(elem)


def ranking_loss(rewards: torch.Tensor, groups_per_prompt: list[list[list[int]]]) -> torch.Tensor:
    """InstructGPT Eq. 1, one prompt per batch element, averaged over prompts:
    loss_i = −1/C_i · Σ_{(w,l)} log σ(r_w − r_l), C_i = number of ranked (non-tied) pairs of prompt i [IG §3.5].

    `rewards` holds the scores of all responses of all prompts, concatenated in order.
    """
    win, lose, elem = (t.to(rewards.device) for t in ranking_pairs(groups_per_prompt))
    return -mean_over_prompts(F.logsigmoid(rewards[win] - rewards[lose]), elem, len(groups_per_prompt))


def mean_over_prompts(pair: torch.Tensor, elem: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """1/P · Σ_i 1/C_i · Σ_{pairs of prompt i} pair, over the P prompts with C_i > 0 ranked pairs [IG §3.5]; `elem`:
    each pair's prompt. A batch without a ranked pair gives 0 (zero gradient), not the NaN of an empty mean."""
    zeros = torch.zeros(n_prompts, device=pair.device, dtype=pair.dtype)
    n_pairs = zeros.index_add(0, elem, torch.ones_like(pair))
    per_prompt = zeros.index_add(0, elem, pair)
    has_pairs = n_pairs > 0
    mean = (per_prompt[has_pairs] / n_pairs[has_pairs]).mean()
    return torch.where(has_pairs.any(), mean, torch.zeros_like(mean))


def pairwise_accuracy(rewards: torch.Tensor, groups_per_prompt: list[list[list[int]]]) -> tuple[int, int]:
    """(correctly ordered pairs, pairs) — ties in the labels are skipped, ties in the rewards count as wrong."""
    win, lose, _ = ranking_pairs(groups_per_prompt)
    return int((rewards[win] > rewards[lose]).sum()), len(win)


def gold_pair_agreement(scores: list[float], gold: list[float]) -> tuple[int, int]:
    """Over one prompt's responses: (pairs the scores order as the gold scores do, pairs the gold orders strictly);
    gold ties are skipped, a tie in the scores counts as wrong."""
    pairs = [(i, j) for i in range(len(gold)) for j in range(len(gold)) if gold[i] > gold[j]]
    return sum(scores[i] > scores[j] for i, j in pairs), len(pairs)


# --- Step 3: KL estimators and reward shaping ----------------------------------------------------------------
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π_θ − log π_ref: unbiased, can be negative per token [KL]."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (e^{−ℓ} − 1) + ℓ with ℓ = log π_θ − log π_ref: unbiased and ≥ 0 [KL]."""
    log_ratio = logp - ref_logp
    return torch.expm1(-log_ratio) + log_ratio

def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ ℓ² with ℓ = log π_θ − log π_ref: biased, ≥ 0; on-policy its gradient is the reverse KL's [KL, KLG]."""
    return 0.5 * (logp - ref_logp) ** 2


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# Allowed estimators per placement (README "KL: estimator and placement") [KLG]: in the reward the estimate is a
# return, so it must be unbiased (k1; k3 is kept: unbiased value, biased gradient); in the loss its gradient is what
# counts (k2; k3 with the ratio), and k1's is zero in expectation.
KL_PLACES = {"reward": ("k1", "k3"), "loss": ("k2", "k3")}


def kl_loss_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  estimator: str) -> torch.Tensor:
    """Per-token KL penalty for the loss (tokens drawn from π_old) [KLG]:
    k2 as is (on-policy its gradient is ∇ KL(π_θ‖π_ref)); k3 weighted by ρ = π_θ/π_old, since
    E_{π_old}[ρ·k3] = E_{π_θ}[k3] = KL(π_θ‖π_ref) whose gradient is the reverse KL's (without ρ, the gradient of
    E_{π_old}[k3] is the forward KL's). k1 has zero expected gradient and is refused by the caller. Log-ratios are
    masked before any exponent: a PAD position's log-prob may be anything (e^{100} overflows float32, and inf·0 is
    NaN). 0 on padding."""
    logp, old_logp, ref_logp = logp * mask, old_logp * mask, ref_logp * mask
    if estimator == "k2":
        return kl_k2(logp, ref_logp)
    if estimator == "k3":
        return torch.exp(logp - old_logp) * kl_k3(logp, ref_logp)
    raise ValueError(f"no loss form of the KL estimator {estimator!r} (k2 | k3)")


def kl_in_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float,
               estimator: str, mode: str = "token", max_len: int | None = None, n: torch.Tensor | None = None,
               rows: int | None = None) -> torch.Tensor:
    """β · the per-token KL penalty aggregated like the policy loss (`aggregate`, `n`/`rows` as there) [KLG, GRPO]."""
    return beta * aggregate(kl_loss_terms(logp, old_logp, ref_logp, mask, estimator), mask, mode, max_len, n, rows)


def kl_in_reward(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float,
                 estimator: str) -> torch.Tensor:
    """Per-token rewards r_t = −β·k_t, plus the score on the last real token [IG Eq. 2, LHP, N+]. [B, R]"""
    return shaped_rewards(scores, KL_ESTIMATORS[estimator](logp, ref_logp) * mask, mask, beta)


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·k_t on every response token, plus the sequence score on the last real token (EOS) [LHP, N+]."""
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def clip_reward(scores: torch.Tensor, limit: float) -> torch.Tensor:
    """The sequence score clipped to [−limit, limit] before it enters the return [ORLHF reward_clip_range]."""
    return scores.clamp(-limit, limit)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment [DAPO Eq. 13], scaled by `penalty`: 0 up to max_len − buffer tokens, then
    linear to −penalty at max_len (`lengths`: response tokens, EOS included). [B]"""
    return -penalty * ((lengths - (max_len - buffer)) / buffer).clamp(0, 1)


# --- Advantages -------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, n: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the masked entries; `n` (dim None only): the count to divide by instead of the mask's own — a
    micro-batch's share of a mean over a larger (global) batch, whose count is `n`."""
    if dim is None:
        return (x * mask).sum() / (mask.sum() if n is None else n).clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased (population) variance over the masked entries [LHP]."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over masked entries; pads stay 0. `mean`/`var` may be passed in when they were
    reduced across processes, so every rank whitens with the global statistics."""
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation [37]: δ_t = r_t + γ·V_{t+1} − V_t (V after the last token = 0),
    A_t = Σ_{s≥t} (γλ)^{s−t} δ_s, returns R_t = A_t + V_t (before any whitening).

    The backward recursion is written as one matrix product with the discount matrix (no loop over tokens).
    """
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = (rewards + gamma * next_values - values) * mask
    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    power = (idx[None, :] - idx[:, None]).to(rewards.dtype)           # s − t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = deltas @ discount.T * mask
    returns = (advantages + values) * mask
    return advantages, returns


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s−t} r_s — the return of the vanilla policy gradient (GAE with V = 0, λ = 1)."""
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return advantages


def leave_one_out_baseline(returns: torch.Tensor, k: int) -> torch.Tensor:
    """For k samples per prompt (consecutive rows), each sample's baseline is the mean of the other k−1 [RLOO]."""
    grouped = returns.view(-1, k)
    return ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).view(-1)

def group_advantages(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: for k samples per prompt (consecutive rows), A_i = (r_i − mean_group) / (std_group + eps), std unbiased
    as in [GRPO, TRL]; scale=False keeps only the mean shift [DrGRPO]. [B]"""
    grouped = scores.view(-1, k)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.view(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None,
              n: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """A per-token loss to a scalar: `token` = mean over all real tokens [DAPO]; `sequence` = mean over rows of
    each row's token mean [GRPO]; `dr_grpo` = sum / (max_len · rows), a constant normaliser [DrGRPO].
    `n`, `rows`: the token and row counts of the whole (accumulated, all-rank) batch this micro-batch is a share of
    (default: its own), so that the shares sum to the whole batch's loss."""
    if mode == "token":
        return masked_mean(per_token, mask, n=n)
    rows = per_token.shape[0] if rows is None else rows
    if mode == "sequence":
        return masked_mean(per_token, mask, dim=1).sum() / rows
    if mode == "dr_grpo":
        return (per_token * mask).sum() / (max_len * rows)
    raise ValueError(f"loss aggregation must be token | sequence | dr_grpo, not {mode!r}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token [PPO]: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε_high)), ρ = exp(log π_θ − log π_old); ε_high = ε unless
    `clip_high` is given ("clip-higher" [DAPO]). `dual_clip` c > 1: where A < 0 the loss is also capped at −c·A,
    so a huge ratio cannot give an unbounded step [DualClip, ORLHF].
    Returns (loss per token, clipped, unclipped, log ρ) — the last three for statistics."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    loss = torch.max(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    return loss, clipped, unclipped, log_ratio


def entropy_from_logits(logits: torch.Tensor, logz: torch.Tensor | None = None) -> torch.Tensor:
    """H(π) = log Z − Σ_v π_v · logit_v per position, from (temperature-scaled) logits [PPO Eq. 9]; `logz`: their
    logsumexp where the caller has it."""
    logz = torch.logsumexp(logits, dim=-1) if logz is None else logz
    return logz - (torch.exp(logits - logz[..., None]) * logits).sum(-1)


def surrogate_stats(clipped, unclipped, log_ratio, mask, n: torch.Tensor | None = None) -> dict:
    """Clip fraction, approximate KL ½(log ρ)² and mean ratio over real tokens [LHP, N+] (`n`: see masked_mean)."""
    with torch.no_grad():
        return {"clipfrac": masked_mean((clipped > unclipped).float(), mask, n=n),
                "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask, n=n),
                "ratio_mean": masked_mean(torch.exp(log_ratio), mask, n=n)}


# --- Losses -----------------------------------------------------------------------------------------------------
def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, n: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate [PPO]: mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(log π_θ − log π_old).
    `n`: the token count the means divide by (default: the mask's; see masked_mean), statistics alike."""
    per_token, clipped, unclipped, log_ratio = clipped_surrogate(logp, old_logp, advantages, mask, clip)
    return masked_mean(per_token, mask, n=n), surrogate_stats(clipped, unclipped, log_ratio, mask, n)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, n: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """0.5·mean(max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)) [LHP]; `n` as in ppo_policy_loss."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask, n=n)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask, n=n)}
    return loss, stats


def pg_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            n: torch.Tensor | None = None) -> torch.Tensor:
    """Vanilla policy gradient (REINFORCE with a baseline): −mean_t(A_t · log π_θ(y_t|s_t)); `n` as in
    ppo_policy_loss."""
    return -masked_mean(advantages.detach() * logp, mask, n=n)


def ptx_loss(logp: torch.Tensor, mask: torch.Tensor, coef: float, n: torch.Tensor | None = None) -> torch.Tensor:
    """PPO-ptx [IG Eq. 2]: −γ · mean token log-likelihood of pretraining text; `n` as in ppo_policy_loss."""
    return -coef * masked_mean(logp, mask, n=n)

def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, groups_per_prompt: list[list[list[int]]],
             beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO on K-way rankings, one prompt per batch element, averaged over prompts as the InstructGPT RM loss [IG §3.5]:
    loss_i = 1/C_i · Σ_{(w,l)} ℓ(h_wl), h = (log π(w) − log π_ref(w)) − (log π(l) − log π_ref(l)) (sequence log-probs):
      sigmoid: ℓ = −log σ(β h) [DPO];  label smoothing ε > 0: −(1−ε) log σ(β h) − ε log σ(−β h) [cDPO];
      ipo: ℓ = (h − 1/(2β))² [IPO].
    Pairs data is K = 2. Returns (loss, stats): implicit rewards β(log π − log π_ref), their mean margin and the
    share of pairs they order correctly."""
    win, lose, elem = (t.to(policy_logps.device) for t in ranking_pairs(groups_per_prompt))
    logratio = policy_logps - ref_logps
    h = logratio[win] - logratio[lose]
    if kind == "sigmoid":
        pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        pair = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss must be sigmoid | ipo, not {kind!r}")
    loss = mean_over_prompts(pair, elem, len(groups_per_prompt))
    with torch.no_grad():
        mean = lambda x: x.mean() if x.numel() else x.new_zeros(())  # noqa: E731  (no ranked pair: 0, not NaN)
        margin = beta * h.detach()
        stats = {"margin": mean(margin), "accuracy": mean((margin > 0).float()),
                 "chosen": beta * mean(logratio[win].detach()), "rejected": beta * mean(logratio[lose].detach())}
    return loss, stats


# --- KL control ---------------------------------------------------------------------------------------------------

def adaptive_kl_beta(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """[LHP] e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n/horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
