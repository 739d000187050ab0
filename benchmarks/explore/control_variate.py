import sys, json
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from pipelines.lm import distill
root = Path(sys.argv[4] if len(sys.argv) > 4 else str(REPO / "runs" / "lm"))
for cap in sys.argv[1].split(","):
    cache = distill.dump_cache(root, cap, values=sys.argv[2], teacher=sys.argv[3] if len(sys.argv) > 3 else "teacher")
    print(cap, "bytes/token", round(cache.bytes_per_token, 2), "rows", cache.tokens, "dump s", cache.seconds, flush=True)
    r = distill.train_student(root, cache, alpha=0.9, epochs=3, seed=0)
    print(json.dumps({k: r[k] for k in ("name", "kl", "perplexity", "accuracy", "train_seconds")}), flush=True)
