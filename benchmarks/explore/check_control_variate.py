import torch
from kdcache.losses import kd_loss, SampledTargets
torch.manual_seed(0)
V, R, N = 50, 4, 8
t = torch.randn(R, V) * 2
for scale in (0.0, 0.3, 1.0):
    s0 = t + scale * torch.randn(R, V)
    dense_s = s0.clone().requires_grad_()
    dl = kd_loss(dense_s, t, torch.zeros(R, dtype=torch.long), alpha=1.0, temperature=1.0)
    dl.backward(); gd = dense_s.grad
    res = {}
    for cv in (False, True):
        gs, ls = [], []
        g = torch.Generator().manual_seed(1)
        for _ in range(4000):
            st = SampledTargets.from_logits(t, N, temperature=1.0, generator=g)
            if cv:
                lp = torch.log_softmax(t, -1).gather(-1, st.index)
                st = SampledTargets(st.index, st.count, st.draws, st.temperature, st.entropy, st.vocab, logprob=lp)
            x = s0.clone().requires_grad_()
            l = kd_loss(x, st, torch.zeros(R, dtype=torch.long), alpha=1.0, temperature=1.0)
            l.backward(); gs.append(x.grad); ls.append(l.detach())
        G = torch.stack(gs); L = torch.stack(ls)
        res[cv] = ((G.mean(0) - gd).norm().item() / gd.norm().clamp_min(1e-12).item(), G.var(0).sum().item(), (L.mean() - dl).item(), L.var().item())
    print(f"scale {scale} dense loss {dl.item():.4f}", {k: tuple(round(v, 5) for v in r) for k, r in res.items()})
