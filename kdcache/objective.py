"""What a training run's loss is made of, and the forward passes that feed it.

:class:`Objective` decides, before training, from the flags, the cache and the data::

    (1 - α)·CE + α·T²·KL + Σ weight·feature term + w_d·RKD distance + w_a·RKD angle

and computes it on each batch: the student's logits are read only when CE or KD is on, its layers
are tapped (:class:`kdcache.features.FeatureTap`) only for the feature and RKD terms, and each
feature term has its own lazy projector between the student's and the teacher's widths.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from typing import Any

import torch

from kdcache.capture.outputs import call_model, extract_logits, extract_token_logits
from kdcache.config import FeatureMap, TrainConfig
from kdcache.errors import ConfigError, KDCacheError, ModelOutputError
from kdcache.features import FeatureTap, layer_names, parse_features, pool, pseudo_index
from kdcache.loader.multi import TEACHERS
from kdcache.loader.targets import response_kind
from kdcache.sources.tokens import MASK
from kdcache.losses import (Projector, attention_loss, ce_loss, feature_loss, response_terms, rkd_angle, rkd_distance,
                            soft_kl)
from kdcache.toolkit import Toolkit

ONE_ROW_BATCHNORM = "Expected more than 1 value per channel when training"  # torch's error


# --- forward passes -----------------------------------------------------------------------------

def teacher_targets(batch: dict[str, Any], teacher: torch.nn.Module | None, x: Any, shape: torch.Size,
             device: torch.device, at: str) -> Any:
    """The teacher's targets for a batch: the cached ones (dense, top-k or sampled), or (online)
    the live teacher's logits."""
    if teacher is None:
        if TEACHERS in batch:  # several caches: their (B, N, C) logits, combined by the toolkit
            return batch[TEACHERS].to(device, non_blocking=True)
        return batch["targets"].to(device, non_blocking=True)
    with torch.no_grad():
        return model_logits(teacher, x, shape, "--teacher", f"the teacher's forward pass failed {at}")


def model_logits(model: torch.nn.Module, x: Any, shape: torch.Size, flag: str, failed: str) -> torch.Tensor:
    """``model(x)`` as logits of the batch's ``shape``: [B, C], or [B, L, V] for token data. An
    exception of the model's own code is the user's input at fault, not a kdcache bug: it
    becomes one line, ``flag: failed: Error: message``."""
    return _as_logits(_call(lambda: call_model(model, x), flag, failed), shape, flag)


def _call(forward, flag: str, failed: str) -> Any:
    """``forward()``; an exception of the model's own code becomes one line naming ``flag``."""
    try:
        return forward()
    except KDCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any exception of the user's model
        if ONE_ROW_BATCHNORM in str(e):
            raise ConfigError(f"{flag}: {failed}: BatchNorm cannot train on a batch of one row; pass --drop-last "
                              "to drop each epoch's last partial batch") from None
        raise ConfigError(f"{flag}: {failed}: {one_line(e)}") from None


def _as_logits(output: Any, shape: torch.Size, flag: str) -> torch.Tensor:
    if len(shape) == 2:
        return extract_token_logits(output, shape[0], flag)
    return extract_logits(output, shape[0], flag)


def one_line(e: Exception, limit: int = 400) -> str:
    """``Type: message`` on one line (torch's messages span several), at most ``limit`` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the objective: response terms, feature terms, RKD -------------------------------------------
FEATURES = "features/"


def cached_features(cache) -> dict[str, str]:
    """The cache's features: NAME → POOL, for every array ``features/NAME``, with the pool its
    capture entry records (kind ``features``, settings ``layers``: ``NAME[:POOL]`` strings)."""
    recorded: dict[str, str] = {}
    for spec in cache.manifest.capture:
        if spec.kind == "features":
            for request in parse_features(list(spec.settings.get("layers", [])), flag="the cache's manifest"):
                recorded[request.name] = request.pool
    names = [a.name[len(FEATURES):] for a in cache.manifest.arrays if a.name.startswith(FEATURES)]
    return {name: recorded.get(name, "none") for name in names}


@dataclass

class _FeatureTerm:
    """One --feature-map term: the student's layer, pooled like the cached feature, against it."""

    map: FeatureMap
    pool: str  # the cached feature's
    per_token: bool  # the teacher's tensor is [B, L, ...] with the batch's mask
    key: str  # its name in metrics.jsonl
    projector: Projector | None  # None for attention maps


@dataclass

class _RKD:
    teacher: str  # the cached feature
    student: str  # the student's layer
    pool: str


class Objective:
    """What a run's loss is made of, decided before training from the flags, the cache and the data::

        (1 - α)·CE + α·T²·KL + Σ weight·feature term + w_d·RKD distance + w_a·RKD angle

    * KD, ``loss/kd``: on when the cache holds response targets (logits, top-k or sampled; or the
      teacher runs live) and α > 0;
    * CE, ``loss/ce``: on when α < 1 and the data has labels (a sample cache whose label array
      holds one >= 0; token data always has next-token labels);
    * ``loss/feature/S=T`` per --feature-map S=T (``loss/attention/S=T`` for attentions.N);
    * ``loss/rkd_distance``, ``loss/rkd_angle`` when their weights are > 0.

    The student's output is read as logits only when KD or CE is on: a student with no logits (a
    sentence encoder) trains on feature terms alone.
    """

    def __init__(self, cfg: TrainConfig, cache, student: torch.nn.Module, online: bool) -> None:
        self.cfg, self.alpha, self.temperature, self.online = cfg, cfg.alpha, cfg.temperature, online
        self.token = cache is not None and cache.manifest.sequences is not None
        has_targets = online or (cache is not None and response_kind(cache.manifest) is not None)
        self.kit = Toolkit(cfg, cache, online)  # calibration, several teachers, class map, per-row rules
        self.kd = cfg.alpha > 0 and has_targets
        self.ce = cfg.alpha < 1 and _has_labels(cache)
        maps = cfg.feature_maps()
        features = cached_features(cache) if cache is not None and (maps or cfg.rkd) else {}
        self.features = [self._term(m, features, student) for m in maps]
        self.rkd = self._rkd(features, maps, student) if cfg.rkd else None
        if not (self.kd or self.ce or self.features or self.rkd):
            raise ConfigError(self._nothing_to_train(has_targets))
        self.layers = list(dict.fromkeys([t.map.student for t in self.features]
                                         + ([self.rkd.student] if self.rkd else [])))
        self.keys = (["loss/ce"] * self.ce + ["loss/kd"] * self.kd + [t.key for t in self.features]
                     + ["loss/rkd_distance"] * (self.rkd is not None and cfg.rkd_distance > 0)
                     + ["loss/rkd_angle"] * (self.rkd is not None and cfg.rkd_angle > 0))
        self.needs_logits = self.kd or self.ce

    def arrays(self, cache) -> tuple[str, ...]:
        """The cached arrays the terms read (the loader reads nothing else): the teacher's response
        when KD is on from the cache, and each feature a term compares with."""
        if cache is None:
            return ()
        response = [a.name for a in cache.manifest.row_arrays if self.kd and not self.online
                    and not a.name.startswith(("inputs/", FEATURES)) and a.name not in ("index", "label")]
        features = [FEATURES + t.map.teacher for t in self.features] + ([FEATURES + self.rkd.teacher] if self.rkd else [])
        return tuple(dict.fromkeys(response + features))

    # --- deciding ------------------------------------------------------------------------------
    def _nothing_to_train(self, has_targets: bool) -> str:
        cfg = self.cfg
        why = []
        if not has_targets:
            why.append(f"--cache {cfg.cache} holds no response targets (dumped with --logits none), so there is no "
                       "KD term")
        elif cfg.alpha == 0:
            why.append("--alpha 0 turns the KD term off")
        if cfg.alpha == 1:
            why.append("--alpha 1 turns CE off")
        elif not self.ce:
            why.append("the data has no labels, so there is no CE term")
        return ("nothing to train: " + "; ".join(why) + "; give --feature-map STUDENT_LAYER=TEACHER_LAYER or "
                "--rkd-distance/--rkd-angle W to train on the cache's features")

    def _term(self, m: FeatureMap, features: dict[str, str], student: torch.nn.Module) -> _FeatureTerm:
        if m.teacher not in features:
            held = ", ".join(features) if features else "none (dump with --features NAME[:POOL] to store some)"
            close = difflib.get_close_matches(m.teacher, list(features), n=3, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ConfigError(f"--feature-map {m.text}: the cache has no feature {m.teacher!r}{hint}; its "
                              f"features: {held}")
        _check_layer(student, m.student, f"--feature-map {m.text}", self.cfg.student)
        pooled = features[m.teacher]
        if m.attention:
            if pooled != "none":
                raise ConfigError(f"--feature-map {m.text}: the cache's {m.teacher} was pooled ({pooled}); the "
                                  "attention loss needs the maps as the layer gave them (dump it with pool none)")
            return _FeatureTerm(m, pooled, self.token, f"loss/attention/{m.student}={m.teacher}", None)
        per_token = self.token and pooled == "none"
        projector = Projector(m.student, m.teacher, axis=-1 if per_token else None)
        return _FeatureTerm(m, pooled, per_token, f"loss/feature/{m.student}={m.teacher}", projector)

    def _rkd(self, features: dict[str, str], maps: list[FeatureMap], student: torch.nn.Module) -> _RKD:
        cfg = self.cfg
        embeddings = [n for n, p in features.items() if not n.startswith("attentions.")
                      and not (self.token and p == "none")]  # one vector per sample or sequence
        name = cfg.rkd_feature
        if name is None:
            if len(embeddings) != 1:
                found = ", ".join(embeddings) if embeddings else "none"
                raise ConfigError(f"--rkd-feature: RKD compares one cached embedding per sample; the cache holds "
                                  f"{len(embeddings)} ({found}): name it with --rkd-feature TEACHER_LAYER")
            name = embeddings[0]
        name = name.removeprefix(FEATURES)
        if name not in features:
            held = ", ".join(features) if features else "none (dump with --features NAME[:POOL] to store some)"
            raise ConfigError(f"--rkd-feature {name}: the cache has no feature {name!r}; its features: {held}")
        if name not in embeddings:
            raise ConfigError(f"--rkd-feature {name}: RKD needs one embedding per sample; the cache's {name} is "
                              f"{'an attention map' if name.startswith('attentions.') else 'a feature per token'} "
                              "(dump it pooled, e.g. --features NAME:mean)")
        layer = cfg.rkd_student_layer
        if layer is None:
            paired = [m.student for m in maps if m.teacher == name]
            if len(paired) != 1:
                how = "no --feature-map pairs a student layer with it" if not paired else \
                    f"--feature-map pairs {len(paired)} student layers with it ({', '.join(paired)})"
                raise ConfigError(f"--rkd-feature {name}: {how}; name the student's layer with --rkd-student-layer")
            layer = paired[0]
        _check_layer(student, layer, f"--rkd-student-layer {layer}", cfg.student)
        return _RKD(name, layer, features[name])

    # --- running -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tap(self, student: torch.nn.Module):
        """A FeatureTap on the student's layers the terms read (None when there are none)."""
        if not self.layers:
            yield None
            return
        flag = "--feature-map" if self.features else "--rkd-student-layer"
        tap = FeatureTap(student, self.layers, flag=flag)
        try:
            tap.__enter__()
        except KDCacheError:
            raise
        except Exception as e:  # noqa: BLE001 - torch refusing hooks on the user's model
            hint = ": a TorchScript student has no hooks, give it as a Python module" \
                if isinstance(student, torch.jit.ScriptModule) else ""
            raise ConfigError(f"{flag}: cannot tap the student's layers ({one_line(e)}){hint}") from None
        try:
            yield tap
        finally:
            tap.__exit__(None, None, None)

    def forward(self, student: torch.nn.Module, tap: FeatureTap | None, x: Any,
                failed: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """The student's output and its tapped layers' tensors (un-pooled)."""
        if tap is None:
            return _call(lambda: call_model(student, x), "--student", failed), {}
        output = _call(lambda: tap.call(x), "--student", failed)
        return output, tap.take(output)

    def logits(self, output: Any, shape: torch.Size) -> torch.Tensor | None:
        """The student's logits when a response term reads them, else None (never looked for)."""
        if not self.needs_logits:
            return None
        try:
            return _as_logits(output, shape, "--student")
        except ModelOutputError as e:
            why = "the KD term" if self.kd else f"the CE term (--alpha {self.alpha:g} < 1 and the data has labels)"
            raise ModelOutputError(f"{e}; {why} reads the student's logits: a student without logits trains on "
                                   "feature terms with --alpha 1 and a cache without response targets") from None

    def _student(self, term_layer: str, pool_how: str, feats: dict[str, torch.Tensor],
                 mask: torch.Tensor | None, flag: str = "--feature-map") -> torch.Tensor:
        """The student's layer pooled as the cache's feature was, by the dump's own rule: the
        padding mask counts where the layer's first two axes are the batch's (B, L)."""
        x = feats[term_layer]
        tokens = mask is not None and x.ndim >= 2 and tuple(x.shape[:2]) == tuple(mask.shape)
        return pool(x, pool_how, mask if tokens else None, flag=flag, name=term_layer)

    @staticmethod
    def pool_mask(batch: dict[str, Any], x: Any, device: torch.device) -> torch.Tensor | None:
        """(B, L) bool, False at padding: the token batch's mask, or the attention_mask of padded
        token items (a sequence classifier's cache, a row per item); None for other inputs."""
        mask = batch.get("mask")
        if mask is None and isinstance(x, dict) and isinstance(x.get(MASK), torch.Tensor):
            mask = x[MASK]
        return None if mask is None else mask.to(device, non_blocking=True).bool()

    def _attention(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return attention_maps(t, s.shape[-1]) if self.token else t

    def terms(self, s: torch.Tensor | None, t: Any, y: torch.Tensor, mask: torch.Tensor | None,
              feats: dict[str, torch.Tensor], batch: dict[str, Any], device: torch.device,
              x: Any = None) -> dict[str, torch.Tensor]:
        """Each term's unweighted value on this batch, by its metrics key. ``mask``: the token
        batch's (the response terms'); pooling also reads padded token items' attention_mask."""
        out: dict[str, torch.Tensor] = {}
        pool_mask = self.pool_mask(batch, x, device) if feats else None
        soft = None
        if self.kit.active and self.needs_logits:  # per-row rules: labels, rows that count, rows with KD
            y, mask, soft = self.kit.rows(batch, y, mask, device)
        if self.ce and self.kd and not self.kit.active:  # one student log-softmax for both at T = 1
            out["loss/ce"], out["loss/kd"] = response_terms(s, t, y, self.temperature, mask=mask)
        else:
            if self.ce and soft is not None and self.kd:  # rows without a soft term: CE as at α = 0
                out["loss/ce"] = self.kit.hard_term(s, y, mask, soft, self.alpha)
            elif self.ce:
                out["loss/ce"] = ce_loss(s, y, mask=mask)
            if self.kd and not self.kit.active:
                out["loss/kd"] = soft_kl(s, t, self.temperature, mask=mask)
            elif self.kd:
                teacher = self.kit.teacher(t, self.temperature, device)
                out["loss/kd"] = self.kit.soft_term(s, teacher, self.temperature, mask, soft)
        for term in self.features:
            out[term.key] = self._term_loss(term, feats, batch[term.map.array].to(device, non_blocking=True),
                                            pool_mask)
        if self.rkd is not None:
            teacher = batch[FEATURES + self.rkd.teacher].to(device, non_blocking=True)
            student = self._student(self.rkd.student, self.rkd.pool, feats, pool_mask, "--rkd-student-layer")
            if self.cfg.rkd_distance > 0:
                out["loss/rkd_distance"] = rkd_distance(student, teacher)
            if self.cfg.rkd_angle > 0:
                out["loss/rkd_angle"] = rkd_angle(student, teacher)
        return out

    def _term_loss(self, term: _FeatureTerm, feats: dict[str, torch.Tensor], teacher: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        student = feats[term.map.student]
        if term.projector is None:
            if student.ndim != 4:
                raise ValueError(f"the student's {term.map.student} has shape {tuple(student.shape)}; the attention "
                                 "loss needs attention maps (B, heads, L, L), e.g. a layer attentions.N")
            keys = mask if mask is not None and tuple(mask.shape) == (student.shape[0], student.shape[-1]) else None
            return attention_loss(student, self._attention(student, teacher), keys)
        student = term.projector(self._student(term.map.student, term.pool, feats, mask), teacher)
        return feature_loss(student, teacher, self.cfg.feature_loss, mask if term.per_token else None,
                            dim=term.projector._axis(student.ndim))

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum: (1-α)·CE + α·KD + Σ weight·feature term + the RKD weights' terms."""
        weights = {"loss/ce": 1 - self.alpha, "loss/kd": self.alpha, "loss/rkd_distance": self.cfg.rkd_distance,
                   "loss/rkd_angle": self.cfg.rkd_angle, **{t.key: t.map.weight for t in self.features}}
        return sum(weights[key] * value for key, value in terms.items())

    def build(self, feats: dict[str, torch.Tensor], batch: dict[str, Any], x: Any, device: torch.device) -> None:
        """The first batch through every feature term: builds the projectors from its shapes, and
        turns a shape that does not fit into an error naming the flag, both layers and shapes."""
        mask = self.pool_mask(batch, x, device)
        for term in self.features:
            teacher = batch[term.map.array].to(device)
            try:
                self._term_loss(term, feats, teacher, mask)  # builds the projector on the way
            except KDCacheError:
                raise
            except ValueError as e:
                pooled = f" (the student's layer pooled {term.pool}, as the cache's feature was)" \
                    if term.pool != "none" else ""
                raise ConfigError(f"--feature-map {term.map.text}: {e}{pooled}") from None
        if self.rkd is not None:
            teacher = batch[FEATURES + self.rkd.teacher]
            student = self._student(self.rkd.student, self.rkd.pool, feats, mask, "--rkd-student-layer")
            if student.shape[0] != teacher.shape[0]:
                raise ConfigError(f"--rkd-student-layer {self.rkd.student}: {tuple(student.shape)} has another batch "
                                  f"size than the cache's {FEATURES + self.rkd.teacher} {tuple(teacher.shape)}")

    # --- projectors ----------------------------------------------------------------------------
    @property
    def projectors(self) -> list[_FeatureTerm]:
        return [t for t in self.features if t.projector is not None]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.projectors for p in t.projector.parameters()]

    def projector_state(self) -> dict[str, Any]:
        """What projectors.pt holds: a list of plain dicts and tensors (``weights_only`` loads it)."""
        return {"format": 1, "projectors": [
            {"student_layer": t.map.student, "teacher_layer": t.map.teacher, "pool": t.pool,
             "student_width": t.projector.widths[0], "teacher_width": t.projector.widths[1],
             "axis": t.projector.axis,
             "state_dict": {k: v.detach().cpu() for k, v in t.projector.state_dict().items()}}
            for t in self.projectors]}


def attention_maps(cached: torch.Tensor, length: int) -> torch.Tensor:
    """A token cache's attention maps as ``[B, H, L, L]``: the dump stores a row per query token,
    ``[heads, longest]`` (its attention over the keys, zero-padded to the dataset's longest
    sequence), so a batch holds ``[B, L, H, longest]``: the queries go behind the heads and the keys
    are cut to the batch's ``L``."""
    if cached.ndim != 4 or cached.shape[1] != length or cached.shape[-1] < length:
        return cached  # not that layout: attention_loss names the shapes
    return cached.transpose(1, 2)[..., :length]


def load_projectors(path: str | os.PathLike) -> dict[tuple[str, str], Projector]:
    """A run's projectors.pt as ``{(student_layer, teacher_layer): Projector}``, built and loaded
    (the identity where the widths were equal)."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    out = {}
    for entry in state["projectors"]:
        proj = Projector(entry["student_layer"], entry["teacher_layer"], axis=entry["axis"])
        proj.widths = (entry["student_width"], entry["teacher_width"])
        if entry["state_dict"]:
            proj.linear = torch.nn.Linear(*proj.widths)
            proj.load_state_dict(entry["state_dict"])
        out[(entry["student_layer"], entry["teacher_layer"])] = proj
    return out


def _has_labels(cache) -> bool:
    """Whether the data has a label for the CE term: token data always (the next token); a
    sample cache when its label array holds one >= 0 (read a chunk at a time, until one does)."""
    if cache is None or cache.manifest.sequences is not None or "label" not in cache.arrays:
        return True
    for chunk in cache.committed_chunks():
        start, stop = cache.chunk_bounds(chunk)
        if (cache.read("label", start, stop) >= 0).any():
            return True
    return False


def _check_layer(student: torch.nn.Module, name: str, where: str, spec: str) -> None:
    """Refuse a layer the student does not have, listing close matches (or some of its layers)."""
    if name in dict(student.named_modules()) and name != "" or pseudo_index(name) is not None:
        return  # hidden_states.N / attentions.N: FeatureTap checks the model returns them
    known = layer_names(student)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        hint = f"close matches: {', '.join(close)}"
    else:
        hint = f"its layers: {', '.join(known[:12])}{', …' if len(known) > 12 else ''}" if known else "it has none"
    raise ConfigError(f"{where}: the student (--student {spec}) has no layer {name!r}; {hint}")
