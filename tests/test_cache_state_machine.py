"""Model-based test of a LayerCache and a HeteroAttention over it: random sequences of prefills (ragged), decode
tokens, decode steps, runs, chunk attention, crops, resets and refused calls, checked after every step against a
plain model (per sequence, the list of (key, value) tokens stored so far).

Invariants (DESIGN.md, "Tiered cache", "Chunk attention"): the tiers hold the model's tokens in order, nothing lost
or duplicated; sinks + window on the fast tier and the rest on the host tier; the retriever indexes exactly the host
tokens; a refused call changes nothing; with an exact retriever ("all", or "exact" / "ivf-group" / faiss "ivf" /
"ivf-pq" with budget 1.0, which after crops probes past emptied lists) every output equals float64 dense attention
over the model's tokens within 1e-5 relative; "lsh" (it ignores the budget) keeps the storage invariants.
"""
import os

import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hetero import HeteroAttention, HeteroConfig, HeteroError, InvalidValueError, LayerCache
from hetero.chunk import chunk_attention
from hetero.reference import dense_attention
from hetero.worker import Worker

from helpers import rel_err

TOL = 1e-5
# sequences of steps run here; HETERO_STATE_EXAMPLES=300 (about 30 s on two cores) searches further
EXAMPLES = int(os.environ.get("HETERO_STATE_EXAMPLES", "40"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 attention of ``q [Hq, D]`` over ``k, v [Hkv, N, D]`` (N >= 1)."""
    part = dense_attention(q[None].double(), k[None].double(), v[None].double(), compute_dtype=torch.float64)
    return part.out[0]


class CacheMachine(RuleBasedStateMachine):
    """One LayerCache, one HeteroAttention, and the model ``self.model[b] = [(k [Hkv, D], v [Hkv, D]), ...]``."""

    @initialize(window=st.integers(3, 8), sinks=st.integers(0, 2), block=st.integers(2, 5),
                head_dim=st.sampled_from([8, 12, 16]), hkv=st.integers(1, 2), group=st.integers(1, 3),
                batch=st.integers(1, 3), dtype=st.sampled_from(sorted(DTYPES)),
                retriever=st.sampled_from(["all", "exact", "ivf-group", "ivf", "ivf-pq", "lsh"]),
                full_budget=st.booleans(),
                sparse_chunk=st.integers(0, 6), staged=st.booleans(), background=st.booleans(),
                group_rule=st.sampled_from(["union", "per-head", "sum"]), overlap=st.sampled_from(["auto", True]),
                dense=st.booleans(), steering=st.sampled_from(["fixed", "adaptive", "balance"]))
    def setup(self, window, sinks, block, head_dim, hkv, group, batch, dtype, retriever, full_budget, sparse_chunk,
              staged, background, group_rule, overlap, dense, steering):
        # indexes trained within a few steps (ivf-pq's product quantizer takes 16 keys at least), so that crops
        # empty their lists
        options = {"min_train": 16 if retriever == "ivf-pq" else 6} if retriever.startswith("ivf") else {}
        self.cfg = HeteroConfig(window=window, sinks=sinks, block_tokens=block, retriever=retriever,
                                retriever_options=options, budget=1.0 if full_budget else 2, kv_dtype=dtype,
                                sparse_chunk_tokens=sparse_chunk, threads=1, group_rule=group_rule, overlap=overlap,
                                dense_layers=(0,) if dense else (), head_budget=
                                "adaptive" if steering == "adaptive" else "flat",
                                balance="auto" if steering == "balance" else "fixed")
        # exact: every token attended (a dense layer; "all"; a budget covering the host tier, which the adaptive
        # split and the balancer may move)
        self.exact = dense or retriever == "all" or (full_budget and steering == "fixed" and retriever != "lsh")
        self.dtype = DTYPES[dtype]
        self.batch, self.hkv, self.hq, self.d = batch, hkv, hkv * group, head_dim
        self.worker = Worker("state-machine-index") if background else None
        self.layer = LayerCache(self.cfg, indexer=self.worker)
        self.layer.staged_evictions = staged  # the CUDA append path, run on the CPU
        self.attn = HeteroAttention(self.cfg)
        self.plan = None
        self.model = [[] for _ in range(batch)]
        self.log = [f"setup {self.cfg} staged={staged} background={background}"]

    def teardown(self):
        if hasattr(self, "attn"):
            self.attn.close()
        if getattr(self, "worker", None) is not None:
            self.worker.close()

    # ---- helpers -------------------------------------------------------------------------------------
    def _gen(self, data):
        return torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))

    def _kv(self, gen, t):
        k = torch.randn(self.batch, self.hkv, t, self.d, generator=gen)
        v = torch.randn(self.batch, self.hkv, t, self.d, generator=gen)
        return k, v

    def _q(self, gen, *extra):
        return torch.randn(self.batch, self.hq, *extra, self.d, generator=gen)

    def _store(self, k, v, lengths):
        """Model: sequence b takes ``k[b, :, :lengths[b]]`` (stored as the cache's dtype)."""
        for b, n in enumerate(lengths):
            for j in range(n):
                self.model[b].append((k[b, :, j].to(self.dtype), v[b, :, j].to(self.dtype)))

    def _model_kv(self, b):
        toks = self.model[b]
        if not toks:
            return (torch.empty(self.hkv, 0, self.d, dtype=self.dtype),) * 2
        return torch.stack([t[0] for t in toks], 1), torch.stack([t[1] for t in toks], 1)

    def _plan(self):
        if self.plan is None:
            self.plan = self.attn.plan(self.layer, self.hq, torch.float32)
        return self.plan

    def _check_output(self, q, out, what):
        """``out [B, Hq, D]`` of decode queries ``q`` over the model's tokens."""
        assert out.shape == q.shape and out.dtype == q.dtype, what
        assert torch.isfinite(out).all(), what
        for b in range(self.batch):
            k, v = self._model_kv(b)
            if k.shape[1] == 0:
                continue
            if self.exact:
                err = rel_err(out[b], _attend(q[b], k, v))
                assert err < TOL, f"{what}: sequence {b} off by {err:.3g} relative ({len(self.model[b])} tokens)"
            else:  # any convex combination of the values
                vf = v.float()
                lo, hi = vf.amin(dim=1).repeat_interleave(self.hq // self.hkv, 0), \
                    vf.amax(dim=1).repeat_interleave(self.hq // self.hkv, 0)
                assert bool(((out[b] >= lo - 1e-4) & (out[b] <= hi + 1e-4)).all()), what

    # ---- appends -------------------------------------------------------------------------------------
    @rule(data=st.data())
    def prefill(self, data):
        """A chunk of T tokens (0 included; lengths crossing sinks, window and blocks), ragged or not."""
        span = self.cfg.window + self.cfg.sinks + self.cfg.block_tokens
        t = data.draw(st.integers(0, 2 * span + 1), label="T")
        ragged = data.draw(st.booleans(), label="ragged")
        lengths = data.draw(st.lists(st.integers(0, t), min_size=self.batch, max_size=self.batch), label="lengths") \
            if ragged else [t] * self.batch
        k, v = self._kv(self._gen(data), t)
        if ragged:  # padding beyond lengths may hold anything
            for b, n in enumerate(lengths):
                k[b, :, n:] = float("nan")
                v[b, :, n:] = float("inf")
        self.log.append(f"prefill T={t} lengths={lengths if ragged else None}")
        self.layer.append(k, v, lengths if ragged else None)
        self._store(k, v, lengths)

    @rule(data=st.data())
    def decode_token(self, data):
        """One token per sequence, ``[B, Hkv, D]`` or ``[B, Hkv, 1, D]``, in the storage dtype or float32."""
        k, v = self._kv(self._gen(data), 1)
        if data.draw(st.booleans(), label="as storage dtype"):
            k, v = k.to(self.dtype), v.to(self.dtype)
        if data.draw(st.booleans(), label="3-d"):
            k, v = k[:, :, 0], v[:, :, 0]
        if data.draw(st.booleans(), label="strided rows"):  # rows of a wider tensor: contiguous rows, other strides
            kw, vw = torch.zeros(*k.shape[:-1], 2 * self.d, dtype=k.dtype), torch.zeros(*v.shape[:-1], 2 * self.d,
                                                                                         dtype=v.dtype)
            kw[..., :self.d], vw[..., :self.d] = k, v
            k, v = kw[..., :self.d], vw[..., :self.d]
        self.log.append(f"decode_token {tuple(k.shape)} {k.dtype}")
        self.layer.append(k, v)
        self._store(k.reshape(self.batch, self.hkv, 1, self.d), v.reshape(self.batch, self.hkv, 1, self.d),
                    [1] * self.batch)

    @rule(data=st.data(), n=st.integers(2, 70))
    def decode_tokens(self, data, n):
        """A run of single-token appends (one C++ call each on the CPU): long enough to fill ivf-group's tail list
        (64 tokens) and to bring its index to a retrain."""
        k, v = self._kv(self._gen(data), n)
        self.log.append(f"decode_tokens {n}")
        for j in range(n):
            self.layer.append(k[:, :, j], v[:, :, j])
        self._store(k, v, [n] * self.batch)

    # ---- steps ---------------------------------------------------------------------------------------
    @precondition(lambda self: self.layer.initialized)
    @rule(data=st.data())
    def decode(self, data):
        """``decode(q, k, v, layer, plan)``: the token appended, then the step over every token."""
        gen = self._gen(data)
        k, v = self._kv(gen, 1)
        q = self._q(gen)
        self.log.append("decode")
        out = self.attn.decode(q, k[:, :, 0], v[:, :, 0], self.layer, self._plan())
        self._store(k, v, [1] * self.batch)
        self._check_output(q, out, "decode")

    @precondition(lambda self: self.layer.initialized)
    @rule(data=st.data(), details=st.booleans(), strided=st.booleans(), into=st.booleans())
    def run(self, data, details, strided, into):
        """``run(q, layer, plan)``; q possibly with strided rows, the output possibly into ``out``."""
        gen = self._gen(data)
        q = torch.randn(self.batch, self.d, self.hq, generator=gen).transpose(1, 2) if strided else self._q(gen)
        out = torch.full(q.shape, float("nan")) if into else None
        self.log.append(f"run details={details} strided={strided} out={into}")
        res = self.attn.run(q, self.layer, self._plan(), out=out, return_details=details)
        res = res.out if details else res
        if into:
            assert res.data_ptr() == out.data_ptr() or torch.equal(res, out)
        self._check_output(q, res, "run")

    @rule(data=st.data())
    def chunk(self, data):
        """``chunk_attention`` of C queries (left-padded per sequence, or not), then the chunk appended."""
        c = data.draw(st.integers(1, 9), label="C")
        padded = data.draw(st.booleans(), label="padded")
        lengths = data.draw(st.lists(st.integers(0, c), min_size=self.batch, max_size=self.batch), label="lengths") \
            if padded else [c] * self.batch
        gen = self._gen(data)
        k, v = self._kv(gen, c)
        q = self._q(gen, c)
        for b, n in enumerate(lengths):  # padded rows may hold anything
            q[b, :, :c - n] = float("nan")
            k[b, :, :c - n] = float("nan")
            v[b, :, :c - n] = float("nan")
        self.log.append(f"chunk C={c} lengths={lengths if padded else None}")
        out = chunk_attention(self.attn, self.layer, q, k, v, lengths if padded else None)
        assert out.shape == q.shape
        for b, n in enumerate(lengths):
            assert torch.equal(out[b, :, :c - n], torch.zeros_like(out[b, :, :c - n])), "padded rows are 0"
            mk, mv = self._model_kv(b)
            for i in range(n):  # real token i sits at column c - n + i
                col = c - n + i
                # the chunk's own keys as the cache stores them (decode is C = 1: a step reads its own token stored)
                kk = torch.cat([mk.double(), k[b, :, c - n:col + 1].to(self.dtype).double()], 1)
                vv = torch.cat([mv.double(), v[b, :, c - n:col + 1].to(self.dtype).double()], 1)
                got = out[b, :, col]
                assert torch.isfinite(got).all(), f"chunk: sequence {b} row {i} not finite"
                if self.exact:
                    ref = _attend(q[b, :, col], kk, vv)
                    err = rel_err(got, ref)
                    assert err < TOL, f"chunk: sequence {b} row {i} off by {err:.3g} relative"
        # the chunk's K/V enter the tiers: right-aligned for append
        ka, va = torch.zeros_like(k), torch.zeros_like(v)
        for b, n in enumerate(lengths):
            ka[b, :, :n], va[b, :, :n] = k[b, :, c - n:], v[b, :, c - n:]
        self.layer.append(ka, va, lengths)
        self._store(ka, va, lengths)

    # ---- rolling back --------------------------------------------------------------------------------
    @rule(data=st.data())
    def crop(self, data):
        """Keep the first ``keep[b]`` tokens (more than a sequence holds keeps it whole)."""
        keep = [data.draw(st.integers(0, len(toks) + 2), label=f"keep[{b}]") for b, toks in enumerate(self.model)]
        self.log.append(f"crop {keep}")
        self.layer.crop(keep)
        for b, n in enumerate(keep):
            del self.model[b][n:]

    @rule(data=st.data())
    def reset(self, data):
        if data.draw(st.integers(0, 3), label="skip unless 0"):  # rarer than the other rules
            return
        self.log.append("reset")
        self.layer.reset()
        self.model = [[] for _ in range(self.batch)]

    # ---- refused calls -------------------------------------------------------------------------------
    @rule(data=st.data(), kind=st.sampled_from(["append_not_finite", "append_overflow", "append_shape", "decode",
                                                 "run", "crop", "chunk"]))
    def refused(self, data, kind):
        """A call the cache or the runtime must refuse; the invariants then check that it changed nothing."""
        if kind in ("append_shape", "decode", "run", "crop") and not self.layer.initialized:
            return
        gen = self._gen(data)
        if kind in ("append_not_finite", "append_overflow"):  # the staged path: undone as it lands
            if kind == "append_overflow" and self.dtype == torch.float32:
                return
            t = data.draw(st.integers(1, 6), label="T")
            k, v = self._kv(gen, t)
            b, h, j, i = (data.draw(st.integers(0, n - 1)) for n in (self.batch, self.hkv, t, self.d))
            if kind == "append_not_finite":
                bad = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
            else:  # finite in float32, inf once stored (bfloat16 rounds 3.4e38 up to inf; float16 holds < 65520)
                bad = 3.4e38 if self.dtype == torch.bfloat16 else 7e4
                bad *= data.draw(st.sampled_from([1, -1]))
            (k if data.draw(st.booleans(), label="in keys") else v)[b, h, j, i] = bad

            def call():
                self.layer.append(k if t > 1 else k[:, :, 0], v if t > 1 else v[:, :, 0])
                if self.layer.staged_evictions:
                    self.layer.host_lengths()  # lands the append: the device's verdict
            what, errors = f"an append of {bad} (T={t}) stored as {self.dtype}", InvalidValueError
        elif kind == "append_shape":
            t = data.draw(st.integers(1, 3))
            which = data.draw(st.sampled_from(["batch", "heads", "dim", "values", "lengths"]))
            shape, lengths = [self.batch, self.hkv, t, self.d], None
            vshape = list(shape)
            if which == "batch":
                shape[0] = vshape[0] = self.batch + 1
            elif which == "heads":
                shape[1] = vshape[1] = self.hkv + 1
            elif which == "dim":
                shape[3] = vshape[3] = self.d + 1
            elif which == "values":
                vshape[2] = t + 1
            else:
                lengths = [t + 1] * self.batch
            k, v = torch.randn(shape, generator=gen), torch.randn(vshape, generator=gen)

            def call():
                self.layer.append(k, v, lengths)
            what, errors = f"an append with a wrong {which}", HeteroError
        elif kind == "decode":  # a step whose query, key or value holds NaN appends nothing
            k, v = self._kv(gen, 1)
            q = self._q(gen)
            where = data.draw(st.sampled_from(["q", "k", "v"]))
            {"q": q, "k": k, "v": v}[where].view(-1)[data.draw(st.integers(0, 7))] = float("nan")

            def call():
                self.attn.decode(q, k[:, :, 0], v[:, :, 0], self.layer, self._plan())
            what, errors = f"a decode with NaN in {where}", InvalidValueError
        elif kind == "run":
            q = self._q(gen)
            q[data.draw(st.integers(0, self.batch - 1)), 0, 0] = float("inf")

            def call():
                self.attn.run(q, self.layer, self._plan())
            what, errors = "a run with inf in q", InvalidValueError
        elif kind == "crop":
            which = data.draw(st.sampled_from(["negative", "count", "float"]))
            keep = {"negative": [-1] * self.batch, "count": [0] * (self.batch + 1), "float": [0.5] * self.batch}[which]

            def call():
                self.layer.crop(keep)
            what, errors = f"a crop with {which} lengths", HeteroError
        else:
            c = data.draw(st.integers(1, 4))
            k, v = self._kv(gen, c)
            q = self._q(gen, c)
            q[data.draw(st.integers(0, self.batch - 1)), 0, c - 1, 0] = float("nan")

            def call():
                chunk_attention(self.attn, self.layer, q, k, v)
            what, errors = "a chunk with NaN in a real query row", InvalidValueError
        self.log.append(f"refused {what}")
        try:
            call()
        except errors:
            return
        raise AssertionError(f"{what} was not refused")

    # ---- invariants ----------------------------------------------------------------------------------
    @invariant()
    def tiers_equal_the_model(self):
        if not hasattr(self, "layer"):
            return
        layer = self.layer
        if not layer.initialized:
            assert all(not toks for toks in self.model)
            return
        layer.wait_indexed()
        totals = [len(toks) for toks in self.model]
        assert layer.seq_lengths() == totals, (layer.seq_lengths(), totals)
        valid = [layer.fast.valid(n) for n in totals]
        assert layer.fast.lengths.tolist() == valid
        assert layer.host_lengths() == [n - f for n, f in zip(totals, valid)]
        per_token = self.hkv * self.d * layer.fast.k.element_size() * 2
        mem = layer.memory()
        assert mem["fast_bytes"] == sum(valid) * per_token and mem["host_bytes"] == sum(totals[b] - valid[b] for b in
                                                                                          range(self.batch)) * per_token
        for b in range(self.batch):
            k, v = layer.tokens(b)
            mk, mv = self._model_kv(b)
            assert k.dtype == self.dtype and k.shape == mk.shape, (b, k.shape, mk.shape)
            assert torch.equal(k, mk) and torch.equal(v, mv), f"sequence {b}: stored tokens differ from the model"

    @invariant()
    def index_covers_the_host_tier(self):
        if not hasattr(self, "layer") or not self.layer.initialized:
            return
        layer = self.layer
        layer.wait_indexed()
        host = layer.host_lengths()
        assert layer.retriever.ntotal == host, (layer.retriever.ntotal, host)
        if self.cfg.retriever != "ivf-group":
            return
        r = layer.retriever
        for b, n in enumerate(host):
            index = r._seqs[b]
            if index is None:
                assert n < r.min_train or r.trained_on[b] == 0
                continue
            keys = layer.host.keys(b).float()
            for h in range(self.hkv):
                ids, ksum = [], []
                for lst in range(index.nlist + 1):
                    s, c = int(index.start[h, lst]), int(index.count[h, lst])
                    members = index.ids[h, s:s + c].tolist()
                    ids += members
                    if c:
                        ref = keys[h, members].sum(0)
                        assert torch.allclose(torch.from_numpy(index.ksum[h, lst]), ref, atol=1e-3, rtol=1e-3), \
                            f"sequence {b} head {h} list {lst}: key sum out of step with its members"
                assert sorted(ids) == list(range(n)), f"sequence {b} head {h}: index ids {sorted(ids)} vs {n} host"


CacheMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                                          database=None, suppress_health_check=[HealthCheck.too_slow])
test_layer_cache_state_machine = CacheMachine.TestCase
