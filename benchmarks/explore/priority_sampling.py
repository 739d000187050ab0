"""Experiment: priority sampling (k ids, weights max(p, tau)) packed as pseudo-counts of 255 draws."""
import sys, json, torch
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from kdcache.capture.kinds import sample as S
from kdcache.capture.kinds.base import Encoded, invalid_rows
from pipelines.lm import distill
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from pipelines.lm import data

K = int(sys.argv[1]); TEACHER = sys.argv[2] if len(sys.argv) > 2 else "teacher"; NORM = "norm"
D = 255

def encode(self, out, start):
    invalid = invalid_rows(out)
    p = out.probs().float()  # (R, V)
    g = torch.Generator(device=p.device).manual_seed(S._seed(self.seed, start))
    u = torch.rand(p.shape, generator=g, device=p.device).clamp_min(1e-12)
    pri = p / u
    top, ids = pri.topk(K + 1, dim=-1)
    tau = top[:, K:K + 1]
    ids = ids[:, :K]
    w = torch.maximum(p.gather(1, ids), tau)  # (R, K) unbiased (HT) weights
    w = w / w.sum(-1, keepdim=True)
    c = torch.floor(w * D)
    rem = (D - c.sum(-1)).long()  # (R,)
    frac = w * D - c
    order = frac.argsort(dim=-1, descending=True)
    add = (torch.arange(K)[None, :] < rem[:, None]).float()
    c.scatter_add_(1, order, add)
    c = c.long()
    full_ids = torch.zeros(p.shape[0], D, dtype=torch.long); full_c = torch.zeros_like(full_ids)
    srt, o = ids.sort(-1)
    full_ids[:, :K] = srt; full_c[:, :K] = c.gather(1, o)
    full_ids = full_ids.where(full_c > 0, 0)
    return Encoded({"sample/index": full_ids.to(torch.int32), "sample/count": full_c.to(torch.uint8),
                    "sample/entropy": out.entropy().to(torch.float16)}, invalid)

S.Sampled.encode = encode
root = Path(str(REPO / "runs" / "lm"))
name = distill._prefix(TEACHER) + f"exp-ps{K}"
out = root / "caches" / f"{name}.zarr"
res = dump(DumpConfig(teacher=distill.TEACHERS[TEACHER], checkpoint=str(data.lm_dir() / "teacher.pt"), data=distill.TRAIN,
                      out=str(out), logits=f"sample:{D}", values="float16", batch_size=32, store_inputs=True), progress=False)
cache = distill.Cache(name, f"ps:{K}", "float16", out, res.seconds, res.rows, 0, 0, TEACHER)
r = distill.train_student(root, cache, alpha=0.9, epochs=3, seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
print(json.dumps({k: r[k] for k in ("name", "kl", "perplexity", "accuracy", "train_seconds")}))
