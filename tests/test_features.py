"""Intermediate features: the shared API (names, taps, pooling), dumps with --features, the loader."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kdcache
from kdcache.capture.dump import dump
from kdcache.cli import app
from kdcache.config import DumpConfig
from kdcache.errors import ConfigError, FingerprintMismatchError
from kdcache.features import FeatureRequest, FeatureTap, first_tensor, parse_features, pool
from kdcache.loader import CacheDataset
from kdcache.losses import DenseTargets
from kdcache.store import faults, schema
from kdcache.store.schema import CaptureSpec, capture_fingerprint
from kdcache.store.verify import open_for_verify, verify


class Tupled(nn.Module):
    """A module returning a tuple and one returning a dict, as LSTMs and HF blocks do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        h = self.fc1(x)
        return {"logits": self.fc2(torch.relu(h)), "aux": (h, None)}


def test_parse_features_names_pools_and_refuses_bad_ones():
    got = parse_features(["fc1", "encoder.layer.1:mean", "hidden_states.-1:cls"])
    assert got == [FeatureRequest("fc1"), FeatureRequest("encoder.layer.1", "mean"),
                   FeatureRequest("hidden_states.-1", "cls")]
    assert got[1].array == "features/encoder.layer.1" and str(got[1]) == "encoder.layer.1:mean"
    with pytest.raises(ConfigError, match="--features fc1:max: expected POOL one of none, mean, cls, flatten"):
        parse_features(["fc1:max"])
    with pytest.raises(ConfigError, match="layer 'fc1' is given twice"):
        parse_features(["fc1", "fc1:mean"])
    with pytest.raises(ConfigError, match="expected NAME"):
        parse_features([":mean"])


def test_tap_takes_only_the_requested_layers_and_removes_its_hooks():
    model = Tupled().eval()
    x = torch.randn(3, 8)
    with FeatureTap(model, ["fc1", "fc2"]) as tap:
        assert len(model.fc1._forward_hooks) == 1 and not model._forward_hooks
        out = tap.call(x)
        got = tap.take(out)
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks
    assert torch.equal(got["fc1"], model.fc1(x)) and torch.equal(got["fc2"], out["logits"])
    with pytest.raises(RuntimeError), FeatureTap(model, ["fc1"]):
        raise RuntimeError("boom")
    assert not model.fc1._forward_hooks  # removed on error too


def test_unknown_layer_lists_close_matches():
    with pytest.raises(ConfigError, match=r"--features fc3: the model has no layer of that name; close matches: "
                                          r"fc2, fc1"):
        FeatureTap(Tupled(), ["fc3"])
    with pytest.raises(ConfigError, match="takes no output_hidden_states"):
        FeatureTap(Tupled(), ["hidden_states.1"])


def test_first_tensor_rule():
    a, b = torch.zeros(1), torch.ones(1)
    assert first_tensor((None, a, b)) is a
    assert first_tensor({"x": None, "y": b}) is b
    assert first_tensor({"y": b, "last_hidden_state": a}) is a
    assert first_tensor("text") is None


def test_pool_rules_and_shapes():
    x = torch.randn(2, 5, 3)
    assert torch.equal(pool(x, "none"), x)
    assert torch.allclose(pool(x, "mean"), x.mean(1))
    assert torch.equal(pool(x, "cls"), x[:, 0])
    assert pool(x, "flatten").shape == (2, 15)
    conv = torch.randn(2, 4, 3, 3)
    assert torch.allclose(pool(conv, "mean"), conv.mean((2, 3)))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = x.clone()
    padded[0, 3:] = 1e4  # padding does not change a masked mean
    assert torch.allclose(pool(padded, "mean", mask), torch.stack([x[0, :3].mean(0), x[1].mean(0)]))
    with pytest.raises(ConfigError, match=r"--features fc1:cls: the layer's output has shape \[2, 6\]; cls needs"):
        pool(torch.zeros(2, 6), "cls", name="fc1")
    with pytest.raises(ConfigError, match="mean needs"):
        pool(torch.zeros(2, 6), "mean", name="fc1")


# --- dumps with --features -------------------------------------------------------------------------
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from kdcache.datasets import TensorPairs

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(6, 10)

        def forward(self, x):
            return self.head(self.pool(self.features(x)).flatten(1))

    def cnn():
        return CNN()

    def images():
        g = torch.Generator().manual_seed(0)
        return TensorPairs(torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g))

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    class ArgMax(nn.Module):
        def forward(self, h):
            return h.argmax(-1)

    class Odd(nn.Module):  # a layer whose width follows the batch size, and one of integers
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(64, 10)
            self.tap = nn.Identity()
            self.ids = ArgMax()

        def forward(self, x):
            h = self.fc(x)
            self.tap(h[:, : 4 + x.shape[0] % 2])
            self.ids(h)
            return h

    def odd():
        return Odd()

    V = 50

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, 16)
            self.mix = nn.Linear(16, 16)
            self.out = nn.Linear(16, V)

        def forward(self, input_ids, attention_mask=None):
            return self.out(torch.tanh(self.mix(self.emb(input_ids).cumsum(1))))  # causal

    def lm():
        return TinyLM()

    class Seqs(torch.utils.data.Dataset):
        def __init__(self, n=120, labels=False):
            g = torch.Generator().manual_seed(1)
            self.items = []
            for i in range(n):
                L = int(torch.randint(3, 30, (1,), generator=g))
                item = {"input_ids": torch.randint(1, V, (L,), generator=g)}
                if i % 5 == 0:  # some items left-padded: padding is removed, wherever it is
                    item = {"input_ids": torch.cat([torch.zeros(2, dtype=torch.long), item["input_ids"]]),
                            "attention_mask": torch.cat([torch.zeros(2, dtype=torch.long), torch.ones(L, dtype=torch.long)])}
                if labels:
                    item["label"] = i % 3
                self.items.append(item)

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def seqs():
        return Seqs()

    def labelled():
        return Seqs(labels=True)
    """
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "models.py"
    path.write_text(MODELS)
    return path


def _module(models):
    from kdcache.sources import resolve

    return sys.modules[resolve(f"{models}:cnn", "--teacher").__module__]


def _dump(models, out, teacher, data, features, **kw):
    base = dict(teacher=f"{models}:{teacher}", data=data if ":" in data else f"{models}:{data}", out=str(out),
                features=tuple(features), batch_size=64, chunk_rows=256)
    dump(DumpConfig(**{**base, **kw}), progress=False)
    return kdcache.open(out)


def _taps(model, names, x, batch_size):
    """The layers' outputs run directly with hooks, batch by batch as the dump runs them."""
    got = {n: [] for n in names}
    with FeatureTap(model, names) as tap, torch.no_grad():
        for a in range(0, len(x), batch_size):
            for n, t in tap.take(tap.call(x[a:a + batch_size])).items():
                got[n].append(t)
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.fixture(scope="module")
def cnn_cache(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "c.zarr"
    return _dump(models, out, "cnn", "images", ["features.0", "features.2:mean", "features.3:flatten", "pool"],
                 features_dtype="float32")


def test_sample_features_equal_the_layers_outputs_exactly(models, cnn_cache):
    m = _module(models)
    x = m.images().inputs[torch.from_numpy(cnn_cache.read("index"))]  # storage order
    direct = _taps(m.cnn().eval(), ["features.0", "features.2", "features.3", "pool"], x, 64)
    shapes = {a.name: (a.shape, a.axis, a.dtype) for a in cnn_cache.manifest.arrays}
    assert shapes["features/features.0"] == ((300, 4, 6, 6), "row", "float32")
    assert shapes["features/features.2"] == ((300, 6), "row", "float32")
    assert shapes["features/features.3"] == ((300, 6 * 4 * 4), "row", "float32")
    assert shapes["features/pool"] == ((300, 6, 1, 1), "row", "float32")
    np.testing.assert_array_equal(cnn_cache.read("features/features.0"), direct["features.0"].numpy())
    np.testing.assert_array_equal(cnn_cache.read("features/features.2"), direct["features.2"].mean((2, 3)).numpy())
    np.testing.assert_array_equal(cnn_cache.read("features/features.3"), direct["features.3"].flatten(1).numpy())
    assert {"kind": "features", "version": 1, "settings": {
        "layers": ["features.0", "features.2:mean", "features.3:flatten", "pool"], "dtype": "float32"}} in [
        c.to_dict() for c in cnn_cache.manifest.capture]
    assert verify(open_for_verify(str(cnn_cache.url))).ok


def test_features_in_float16_and_bfloat16(models, tmp_path, cnn_cache):
    want = cnn_cache.read("features/features.2")
    half = _dump(models, tmp_path / "h.zarr", "cnn", "images", ["features.2:mean"])
    assert half.arrays["features/features.2"].dtype == "float16"
    np.testing.assert_array_equal(half.read("features/features.2"), want.astype(np.float16))
    bf = _dump(models, tmp_path / "b.zarr", "cnn", "images", ["features.2:mean"], features_dtype="bfloat16")
    spec = bf.arrays["features/features.2"]
    assert (spec.dtype, spec.logical_dtype) == ("uint16", "bfloat16")
    got = bf.tensor("features/features.2", bf.read("features/features.2"))
    assert torch.equal(got, torch.from_numpy(want).to(torch.bfloat16))


@pytest.mark.parametrize("point, chunk", [("chunk-table", 0), ("chunk-commit", 1)])
def test_a_stopped_feature_dump_resumes_byte_identical(models, cnn_cache, tmp_path, point, chunk):
    out = tmp_path / "r.zarr"
    features = ["features.0", "features.2:mean", "features.3:flatten", "pool"]
    with faults.armed(point, chunk=chunk), pytest.raises(faults.Crash):
        _dump(models, out, "cnn", "images", features, features_dtype="float32")
    got = _dump(models, out, "cnn", "images", features, features_dtype="float32")
    for name in cnn_cache.arrays:
        np.testing.assert_array_equal(got.read(name), cnn_cache.read(name))
    for key in ("features/features.0/c/0/0/0/0", "features/features.2/c/1/0"):
        assert (Path(out) / key).read_bytes() == (Path(cnn_cache.url) / key).read_bytes()


def test_other_features_change_the_fingerprint_and_are_not_reused(models, cnn_cache, tmp_path):
    def fp(features, dtype="float16"):
        return DumpConfig(teacher="t:x", data="d:x", out="o", features=features, features_dtype=dtype)

    prints = {capture_fingerprint(tuple(k.spec() for k in fp(f, d).captures()))
              for f, d in [((), "float16"), (("a",), "float16"), (("a:mean",), "float16"), (("a",), "float32"),
                           (("a", "b"), "float16")]}
    assert len(prints) == 5
    # no features leaves the fingerprint of a cache dumped before features existed
    assert capture_fingerprint(tuple(k.spec() for k in fp(()).captures())) == capture_fingerprint(
        (CaptureSpec("logits", 1, {}),))
    with pytest.raises(FingerprintMismatchError, match="capture fingerprint differs"):
        _dump(models, cnn_cache.url, "cnn", "images", ["features.2:mean"], features_dtype="float32")


def test_the_loader_yields_sample_features(cnn_cache):
    ds = CacheDataset(cnn_cache, batch_size=32)
    batch = next(iter(ds))
    assert batch["features/features.0"].shape == (32, 4, 6, 6) and batch["features/features.2"].shape == (32, 6)
    assert batch["features/features.0"].dtype == torch.float32
    rows = batch["row"].numpy()
    np.testing.assert_array_equal(batch["features/features.2"].numpy(), cnn_cache.read("features/features.2")[rows])
    assert isinstance(batch["targets"], DenseTargets)  # the teacher's response object, as without features
    only = next(iter(CacheDataset(cnn_cache, batch_size=32, targets=("logits",))))
    assert "features/features.2" not in only and isinstance(only["targets"], DenseTargets)


# --- token data -----------------------------------------------------------------------------------
TOKEN_FEATURES = ["emb", "mix:mean", "out:cls"]


@pytest.fixture(scope="module")
def lm_cache(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "t.zarr"
    return _dump(models, out, "lm", "seqs", TOKEN_FEATURES, features_dtype="float32", values="float32",
                 batch_size=16, chunk_rows=512)


def _sequences(models, cache):
    """Each sequence's tokens (padding removed), in storage order."""
    data = _module(models).seqs()
    out = []
    for item in cache.sequence_array("index"):
        d = data[int(item)]
        mask = d.get("attention_mask", torch.ones_like(d["input_ids"])).bool()
        out.append(d["input_ids"][mask])
    return out


def test_token_features_a_row_per_token_or_one_per_sequence(models, lm_cache):
    arrays = {a.name: a for a in lm_cache.manifest.arrays}
    assert (arrays["features/emb"].axis, arrays["features/emb"].shape) == ("row", (lm_cache.rows, 16))
    assert (arrays["features/mix"].axis, arrays["features/mix"].shape, arrays["features/mix"].computed) == (
        "sequence", (120, 16), True)
    assert arrays["features/out"].shape == (120, 50)
    offsets = lm_cache.sequence_array("offsets")
    pooled = lm_cache.gather_sequences(["features/mix", "features/out"], np.arange(120))
    model = _module(models).lm().eval()
    for s, ids in enumerate(_sequences(models, lm_cache)):  # each alone: no padding at all
        d = _taps(model, ["emb", "mix", "out"], ids[None], 1)
        np.testing.assert_allclose(lm_cache.read("features/emb", offsets[s], offsets[s + 1]), d["emb"][0].numpy(),
                                   rtol=1e-6, atol=1e-6)
        # the dump ran it right-padded in a batch: the masked mean leaves the padding out
        np.testing.assert_allclose(pooled["features/mix"][s], d["mix"][0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pooled["features/out"][s], d["out"][0, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert verify(open_for_verify(str(lm_cache.url))).ok


@pytest.fixture()
def small_chunks(monkeypatch):
    """Per-sequence arrays in many chunks (8 or 2 sequences each), so chunks span row chunks."""
    monkeypatch.setattr(schema, "COMPUTED_CHUNK_BYTES", 512)


@pytest.mark.parametrize("point, chunk", [("chunk-commit", 3), ("chunk-data", 5), ("chunk-table", 0)])
def test_a_stopped_token_feature_dump_resumes_byte_identical(models, tmp_path, small_chunks, point, chunk):
    kw = dict(features_dtype="float32", values="float32", batch_size=16, chunk_rows=256)
    full = _dump(models, tmp_path / "full.zarr", "lm", "seqs", TOKEN_FEATURES, **kw)
    assert full.manifest.chunk_rows_of(full.arrays["features/mix"]) == 8 and full.num_chunks > 6
    out = tmp_path / "r.zarr"
    with faults.armed(point, chunk=chunk), pytest.raises(faults.Crash):
        _dump(models, out, "lm", "seqs", TOKEN_FEATURES, **kw)
    partial = kdcache.Cache(out, require_complete=False) if (out / "zarr.json").exists() else None
    if partial is not None:  # a partial cache yields the sequences whose features are committed
        ds = CacheDataset(partial, _module(models).seqs(), batch_size=8, shuffle=False)
        seqs = np.concatenate([b["sequence"].numpy() for b in ds])
        assert 0 < len(seqs) < 120 and set(seqs) <= set(partial.committed_sequences("features/out"))
    got = _dump(models, out, "lm", "seqs", TOKEN_FEATURES, **kw)
    for name in ("features/emb", "logits"):
        np.testing.assert_array_equal(got.read(name), full.read(name))
    for name in ("features/mix", "features/out"):
        np.testing.assert_array_equal(got.gather_sequences([name], np.arange(120))[name],
                                      full.gather_sequences([name], np.arange(120))[name])
        for k in range(-(-120 // got.manifest.chunk_rows_of(got.arrays[name]))):
            key = f"{name}/c/{k}/0"
            assert (Path(out) / key).read_bytes() == (Path(full.url) / key).read_bytes()
    assert verify(open_for_verify(str(out))).ok


def test_the_loader_yields_token_features(models, lm_cache):
    batch = next(iter(CacheDataset(lm_cache, _module(models).seqs(), batch_size=4)))
    longest = batch["mask"].shape[1]
    assert batch["features/emb"].shape == (4, longest, 16) and batch["features/mix"].shape == (4, 16)
    assert batch["features/out"].shape == (4, 50)
    assert not batch["features/emb"][~batch["mask"]].any()  # padding is 0
    seqs = batch["sequence"].numpy()
    np.testing.assert_array_equal(batch["features/mix"].numpy(),
                                  lm_cache.gather_sequences(["features/mix"], seqs)["features/mix"])
    assert isinstance(batch["targets"], DenseTargets)


# --- Hugging Face models ----------------------------------------------------------------------------
HF = textwrap.dedent(
    """
    import transformers

    def bert():
        return transformers.BertModel.from_pretrained({bert!r})

    def classifier():
        return transformers.BertForSequenceClassification.from_pretrained({classifier!r})
    """
)


@pytest.fixture(scope="module")
def hf(tmp_path_factory, models):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(root / "bert")
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "classifier")
    spec = root / "hf_models.py"
    spec.write_text(HF.format(bert=str(root / "bert"), classifier=str(root / "classifier")))
    return spec


def test_a_bert_model_without_logits_dumps_hidden_states_and_attentions(models, hf, tmp_path):
    import transformers

    out = tmp_path / "bert.zarr"
    dump(DumpConfig(teacher=f"{hf}:bert", data=f"{models}:seqs", out=str(out), logits="none", batch_size=16,
                    features=("hidden_states.1:mean", "attentions.0", "pooler"), features_dtype="float32"),
         progress=False)
    cache = kdcache.open(out)
    assert cache.manifest.classes is None and cache.manifest.columns == ("index", "tokens")
    assert [c.kind for c in cache.manifest.capture] == ["features"]
    longest = int(np.diff(cache.sequence_array("offsets")).max())
    arrays = cache.arrays
    assert arrays["features/attentions.0"].shape == (cache.rows, 2, longest)
    assert arrays["features/hidden_states.1"].axis == "sequence" and arrays["features/pooler"].shape == (120, 16)
    table = cache.table().to_pandas()
    assert sorted(table["index"]) == list(range(120))
    model = transformers.BertModel.from_pretrained(str(hf.parent / "bert"), attn_implementation="eager").eval()
    offsets = cache.sequence_array("offsets")
    pooled = cache.gather_sequences(["features/hidden_states.1", "features/pooler"], np.arange(120))
    for s, ids in list(enumerate(_sequences(models, cache)))[:40]:
        with torch.no_grad():
            o = model(input_ids=ids[None], output_hidden_states=True, output_attentions=True)
        n = len(ids)
        np.testing.assert_allclose(pooled["features/hidden_states.1"][s], o.hidden_states[1][0].mean(0).numpy(),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pooled["features/pooler"][s], o.pooler_output[0].numpy(), rtol=1e-4, atol=1e-5)
        att = cache.read("features/attentions.0", offsets[s], offsets[s + 1])  # (n, heads, longest)
        np.testing.assert_allclose(att[:, :, :n], o.attentions[0][0].transpose(0, 1).numpy(), rtol=1e-4, atol=1e-5)
        assert not att[:, :, n:].any()  # keys past the sequence are zero
    batch = next(iter(CacheDataset(cache, _module(models).seqs(), batch_size=4)))
    assert batch["features/attentions.0"].shape == (4, batch["mask"].shape[1], 2, longest)
    assert batch["features/pooler"].shape == (4, 16) and "targets" not in batch


def test_a_sequence_classifier_on_token_items_gets_a_row_per_item(models, hf, tmp_path):
    import transformers

    out = tmp_path / "cls.zarr"
    dump(DumpConfig(teacher=f"{hf}:classifier", data=f"{models}:labelled", out=str(out), values="float32",
                    batch_size=16, features=("bert.pooler", "hidden_states.-1:cls"), features_dtype="float32"),
         progress=False)
    cache = kdcache.open(out)
    assert cache.manifest.sequences is None and cache.rows == 120 and cache.manifest.classes == 3
    assert cache.arrays["features/bert.pooler"].shape == (120, 16)
    assert cache.arrays["features/hidden_states.-1"].shape == (120, 16)
    model = transformers.BertForSequenceClassification.from_pretrained(str(hf.parent / "classifier")).eval()
    data = _module(models).labelled()
    index = cache.read("index")
    np.testing.assert_array_equal(cache.read("label"), [data[int(i)]["label"] for i in index])
    for row in range(0, 120, 7):
        d = data[int(index[row])]
        ids = d["input_ids"][d.get("attention_mask", torch.ones_like(d["input_ids"])).bool()]
        with torch.no_grad():  # alone, unpadded; the dump ran it right-padded in a batch
            o = model(input_ids=ids[None], output_hidden_states=True)
        np.testing.assert_allclose(cache.read("logits", row, row + 1)[0], o.logits[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cache.read("features/hidden_states.-1", row, row + 1)[0],
                                   o.hidden_states[-1][0, 0].numpy(), rtol=1e-4, atol=1e-5)
    batch = next(iter(CacheDataset(cache, data, batch_size=8)))
    assert batch["input"]["input_ids"].shape[0] == 8 and batch["features/bert.pooler"].shape == (8, 16)


# --- the command line -------------------------------------------------------------------------------
def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def test_layers_lists_names_shapes_and_dtypes(models, hf):
    r = _cli("layers", "--teacher", f"{models}:cnn", "--data", f"{models}:images")
    assert r.exit_code == 0, r.stderr
    assert "features.0" in r.stdout and "[2, 4, 6, 6]" in r.stdout and "Conv2d" in r.stdout
    assert "[2, 6, 1, 1]" in r.stdout and "float32" in r.stdout
    r = _cli("layers", "--teacher", f"{hf}:bert", "--data", f"{models}:seqs", "--batch-size", "3")
    assert r.exit_code == 0, r.stderr
    for name in ("encoder.layer.1", "pooler", "hidden_states.2", "attentions.1"):
        assert name in r.stdout
    assert "[3, 2, " in r.stdout  # attention weights: [batch, heads, L, L]


def test_info_shows_bytes_per_sample_and_per_sequence(cnn_cache, lm_cache):
    r = _cli("info", cnn_cache.url)
    assert r.exit_code == 0 and "features/" in r.stdout and "bytes per sample (a row)" in r.stdout
    d = json.loads(_cli("info", cnn_cache.url, "--json").stdout)
    assert d["arrays"]["features/features.0"]["bytes_per_entry"] == 4 * 6 * 6 * 4
    assert d["arrays"]["features/features.0"]["bytes_per_row"] >= 4 * 6 * 6 * 4
    r = _cli("info", lm_cache.url)
    assert r.exit_code == 0 and "bytes per sample (a token)" in r.stdout and "bytes per sequence" in r.stdout
    d = json.loads(_cli("info", lm_cache.url, "--json").stdout)
    mix = d["arrays"]["features/mix"]
    assert mix["bytes_per_entry"] == 64 and mix["bytes_per_sequence"] == pytest.approx(mix["bytes"] / 120)
    assert d["committed_sequences"] == 120


def test_dry_run_projects_the_store_and_writes_nothing(models, tmp_path):
    out = tmp_path / "never.zarr"
    r = _cli("dump", "--teacher", f"{models}:lm", "--data", f"{models}:seqs", "--out", out, "--features", "emb",
             "--features", "mix:mean", "--chunk-rows", "512", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert not out.exists()
    assert "nothing written" in r.stdout and "chunks of 512 rows" in r.stdout and "features/" in r.stdout


def test_features_from_a_config_file(models, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'teacher = "{models}:cnn"\ndata = "{models}:images"\nout = "{tmp_path / "c.zarr"}"\n'
                      '[dump]\nfeatures = ["features.2:mean", "pool"]\nfeatures-dtype = "bfloat16"\n')
    r = _cli("dump", "--config", config, "-q")
    assert r.exit_code == 0, r.stderr
    cache = kdcache.open(tmp_path / "c.zarr")
    assert {"features/features.2", "features/pool"} <= set(cache.arrays)
    assert cache.arrays["features/pool"].logical_dtype == "bfloat16"


@pytest.mark.parametrize("teacher, data, flags, message", [
    ("cnn", "images", ["--features", "features.9"],
     "--features features.9: the model has no layer of that name; close matches: features.3, features.2"),
    ("cnn", "images", ["--features", "head:cls"],
     "--features head:cls: the layer's output has shape [1, 10]; cls needs [batch, positions, ...]"),
    ("cnn", "images", ["--features", "head:max"], "--features head:max: expected POOL one of none, mean, cls, flatten"),
    ("odd", "kdcache.datasets:digits_train", ["--features", "ids"],
     "--features ids: the layer's output is a torch.int64 tensor of shape [1]; features must be floating-point"),
    ("odd", "kdcache.datasets:digits_train", ["--features", "tap"],
     "--features tap: the layer's output is [256, 4] for the batch of dataset items"),
    ("lm", "seqs", ["--features", "emb:flatten"], "flattening [1, "),
    ("cnn", "images", ["--features", "hidden_states.1"], "takes no output_hidden_states argument"),
    ("cnn", "images", ["--features", "pool", "--features-dtype", "int8"], "--features-dtype must be one of"),
])
def test_bad_feature_input_is_one_line(models, tmp_path, teacher, data, flags, message):
    out = tmp_path / "bad.zarr"
    r = _cli("dump", "--teacher", f"{models}:{teacher}", "--data", data if ":" in data else f"{models}:{data}",
             "--out", out, "-q", *flags)
    assert r.exit_code != 0
    assert message in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 or "error:" in r.stderr.splitlines()[0]
    assert not (out / "zarr.json").exists() or not kdcache.Cache(out, require_complete=False).complete
