"""optim.adam (the fused kernel where torch has one) against Adam/AdamW written out in float64."""
import pytest
import torch

from instructrl.optim import adam


def adam_ref(p0, grads, lr, betas, eps, weight_decay, decoupled):
    """Kingma & Ba Algorithm 1 with bias correction; AdamW decays the weights before the update (Loshchilov &
    Hutter), Adam adds weight_decay·p to the gradient."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        g = g.double()
        if decoupled:
            p = p * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (True, 0.1), (True, 0.0)])
def test_adam_matches_float64_reference_and_is_fused_on_cpu(decoupled, weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    # two param groups, as pretrain uses them (weight decay on matrices only)
    groups = [{"params": params[:1], "weight_decay": weight_decay}, {"params": params[1:], "weight_decay": 0.0}]
    opt = adam(groups, decoupled_weight_decay=decoupled, lr=1e-2, betas=(0.9, 0.95), eps=1e-5)
    assert opt.defaults["fused"] is True
    assert isinstance(opt, torch.optim.AdamW if decoupled else torch.optim.Adam)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for i, (p, p0) in enumerate(zip(params, start)):
        wd = weight_decay if i == 0 else 0.0
        ref = adam_ref(p0, [step[i] for step in grads], 1e-2, (0.9, 0.95), 1e-5, wd, decoupled)
        torch.testing.assert_close(p.detach().double(), ref, atol=1e-6, rtol=1e-5)


def test_adam_falls_back_to_the_loop_where_no_fused_kernel_applies():
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]  # no fused kernel for float64
    opt = adam(params, lr=1e-3)
    assert not opt.defaults["fused"]
    params[0].grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(params[0].detach(), torch.full((3,), -1e-3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_adam_takes_generators_as_torch_optim_does():
    model = torch.nn.Linear(3, 2)
    opt = adam({"params": model.parameters(), "lr": 1e-3} for _ in range(1))
    assert opt.defaults["fused"] is True
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    opt2 = adam(model.parameters(), lr=1e-3)
    assert len(opt2.param_groups[0]["params"]) == 2
