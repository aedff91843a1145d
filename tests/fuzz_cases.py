"""The fuzz suite's cases, run in a child process (``python tests/fuzz_cases.py``, one JSON case per stdin line, one
JSON verdict per stdout line) so that a crash in native code is a failed case, not a dead test session.

A verdict is ``{"outcome": "ok" | "refused", "error": class name, "violations": [...]}``. A violation is anything
the public API promises against: an error that is not a ``HeteroError``, an accepted input the float64 oracle
finds invalid (it would read outside the pools), a result off the oracle, a rejected call that changed the cache
or the index, an index that does not hold every host token once the faults are over.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hetero  # noqa: E402
import hetero.reference  # noqa: E402
import hetero.worker  # noqa: E402
from hetero import HeteroAttention, HeteroConfig, HeteroError, HostView, LayerCache, PartialAttention, Selection  # noqa: E402,E501
from hetero.merge import merge_reference  # noqa: E402
from hetero.registry import RETRIEVERS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import oracle, rel_err, same_snapshot, snapshot  # noqa: E402

torch.set_num_threads(1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # vs float64 over the same stored values


class Verdict:
    def __init__(self):
        self.violations = []
        self.outcome = "ok"
        self.error = None

    def call(self, fn, *args, **kwargs):
        """Run ``fn``; a ``HeteroError`` is a refusal, any other exception a violation. Returns (ok, result)."""
        try:
            return True, fn(*args, **kwargs)
        except HeteroError as e:
            self.outcome, self.error = "refused", type(e).__name__
            return False, e
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            self.violations.append(f"untyped {type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-300:]}")
            return False, e

    def check(self, cond: bool, what: str) -> None:
        if not cond:
            self.violations.append(what)

    def json(self):
        return {"outcome": self.outcome, "error": self.error, "violations": self.violations}


# ---- host views and selections ----------------------------------------------------------------------------------
def _layer(spec, gen, retriever="all"):
    dtype = DTYPES[spec["dtype"]]
    lengths = spec["lengths"]
    layer = LayerCache(HeteroConfig(window=spec.get("window", 2), sinks=spec.get("sinks", 1),
                                    block_tokens=spec["block_tokens"], retriever=retriever))
    t = max(lengths) + 3
    shape = (len(lengths), spec["hkv"], t, spec["d"])
    layer.append(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype),
                 torch.tensor(lengths) + 3)
    return layer


def _oracle_sparse(q, view: HostView, sel: Selection, scale):
    """Float64 attention over the selected rows, reading through the block table with bounds checks; None where
    the view or selection does not describe rows inside the pools (the call should have been refused)."""
    kp, vp = view.k_pool.double(), view.v_pool.double()
    table, lengths, bt = view.block_table.long(), view.lengths.long(), view.block_tokens
    blocks = kp.shape[1] // bt
    b_, hq, d = q.shape
    hkv = kp.shape[0]
    g = hq // hkv
    out = torch.zeros(b_, hq, d, dtype=torch.float64)
    lse = torch.full((b_, hq), -math.inf, dtype=torch.float64)
    idx = sel.indices.long()
    for b in range(b_):
        for h in range(hkv):
            pos = [int(p) for p in idx[b, h] if int(p) != -1]
            if any(p < 0 or p >= int(lengths[b]) for p in pos):
                return None
            rows = []
            for p in pos:
                j = p // bt
                if j >= table.shape[1] or not 0 <= int(table[b, j]) < blocks:
                    return None
                rows.append(int(table[b, j]) * bt + p % bt)
            if not rows:
                continue
            cols = [i for i, p in enumerate(idx[b, h].tolist()) if p != -1]
            k, v = kp[h, rows], vp[h, rows]
            for gi in range(g):
                s = (q[b, h * g + gi].double() @ k.T) * scale
                if sel.log_weight is not None:
                    s = s + sel.log_weight[b, h * g + gi, cols].double()
                m = torch.logsumexp(s, 0)
                lse[b, h * g + gi] = m
                if torch.isfinite(m):
                    out[b, h * g + gi] = torch.softmax(s, 0) @ v
    return out, lse


def _mutate_view(view: HostView, m) -> HostView:
    kind, a, b = m["kind"], m.get("a", 0), m.get("b", 0)
    table, lengths = view.block_table.clone(), view.lengths.clone()
    if kind == "table_entry":
        if table.numel():
            table[a % table.shape[0], b % table.shape[1]] = m["value"]
        return dataclasses.replace(view, block_table=table)
    if kind == "table_empty":
        return dataclasses.replace(view, block_table=table[:, :0])
    if kind == "table_narrow":
        return dataclasses.replace(view, block_table=table[:, : max(0, table.shape[1] - 1 - a)])
    if kind == "table_dtype":
        return dataclasses.replace(view, block_table=table.to(getattr(torch, m["value"])))
    if kind == "table_rank":
        return dataclasses.replace(view, block_table=table.reshape(-1))
    if kind == "lengths_set":
        lengths[a % lengths.shape[0]] = m["value"]
        return dataclasses.replace(view, lengths=lengths)
    if kind == "lengths_dtype":
        return dataclasses.replace(view, lengths=lengths.to(getattr(torch, m["value"])))
    if kind == "lengths_list":
        return dataclasses.replace(view, lengths=lengths.tolist())
    if kind == "block_tokens":
        return dataclasses.replace(view, block_tokens=m["value"])
    if kind == "pool_strided":
        return dataclasses.replace(view, k_pool=view.k_pool[..., ::2], v_pool=view.v_pool[..., ::2])
    if kind == "pool_short":
        return dataclasses.replace(view, v_pool=view.v_pool[:, : max(0, view.v_pool.shape[1] - 1 - a)])
    if kind == "pools_cut":
        r = max(0, view.k_pool.shape[1] - 1 - a)
        return dataclasses.replace(view, k_pool=view.k_pool[:, :r], v_pool=view.v_pool[:, :r])
    if kind == "pool_dtype":
        dt = getattr(torch, m["value"])
        return dataclasses.replace(view, k_pool=view.k_pool.to(dt), v_pool=view.v_pool.to(dt))
    if kind == "pool_meta":
        return dataclasses.replace(view, k_pool=view.k_pool.to("meta"), v_pool=view.v_pool.to("meta"))
    if kind == "pool_swap_strides":
        return dataclasses.replace(view, v_pool=view.v_pool.contiguous())
    raise ValueError(kind)


def _mutate_selection(sel: Selection, m, hq) -> Selection:
    kind, a = m["kind"], m.get("a", 0)
    idx = sel.indices.clone()
    if kind == "index_value":
        if idx.numel():
            idx.view(-1)[a % idx.numel()] = m["value"]
        return Selection(idx, sel.log_weight)
    if kind == "index_dtype":
        return Selection(idx.to(getattr(torch, m["value"])), sel.log_weight)
    if kind == "index_shape":
        return Selection(idx[:, :1] if a % 2 else idx[:1], sel.log_weight)
    if kind == "index_rank":
        return Selection(idx.reshape(idx.shape[0], -1), sel.log_weight)
    if kind == "weight":
        k = idx.shape[-1]
        lw = torch.full((idx.shape[0], hq, k), float(m["value"]))
        return Selection(idx, lw if a % 3 else lw[:, :, : max(0, k - 1)])
    if kind == "estimate":
        b, d = idx.shape[0], m["d"]
        est = PartialAttention(torch.zeros(b, hq, d + a % 2), torch.full((b, hq), float(m["value"])))
        return Selection(idx, sel.log_weight, est)
    if kind == "not_selection":
        return idx
    raise ValueError(kind)


def _composed(mutate, x, *args):
    """``mutate(x, *args)``, or ``x`` when an earlier mutation left nothing this one can apply to (a rank-1 block
    table cannot be narrowed, a meta pool not converted): only the harness fails there, not the API."""
    try:
        return mutate(x, *args)
    except (IndexError, RuntimeError, TypeError, NotImplementedError, AttributeError, ZeroDivisionError):
        return x


def case_sparse(spec):
    v = Verdict()
    gen = torch.Generator().manual_seed(spec["seed"])
    layer = _layer(spec, gen)
    view = layer.host.view()  # its pools end at the rows blocks hold (the room after them is not in a view)
    lengths = layer.host_lengths()
    b, hkv, d, g, k = len(lengths), spec["hkv"], spec["d"], spec["g"], spec["k"]
    idx = torch.full((b, hkv, k), -1, dtype=torch.int32)
    for s in range(b):
        for h in range(hkv):
            m = min(k, lengths[s])
            idx[s, h, :m] = torch.randperm(lengths[s], generator=gen)[:m].sort().values.to(torch.int32)
    lw = -2 * torch.rand(b, hkv * g, k, generator=gen) if spec["weights"] else None
    sel = Selection(idx, lw)
    for m in spec["view_mutations"]:
        view = _composed(_mutate_view, view, m)
    for m in spec["selection_mutations"]:
        if isinstance(sel, Selection):  # "not_selection" ends the chain
            sel = _composed(_mutate_selection, sel, dict(m, d=d), hkv * g)
    q = torch.randn(b, hkv * g, d, generator=gen)
    before = snapshot(layer)
    ok, res = v.call(hetero.sparse_attention, q, view, sel, None, spec["backend"])
    v.check(same_snapshot(before, snapshot(layer)), "sparse_attention changed the cache it read")
    if ok:
        if not isinstance(sel, Selection) or not isinstance(view, HostView):
            v.check(False, "accepted a selection or view of the wrong type")
            return v
        want = _oracle_sparse(q, view, sel, 1.0 / math.sqrt(d)) if sel.estimate is None else None
        if sel.estimate is not None:
            return v  # estimates are merged: their checks are the merge cases'
        if want is None:
            v.check(False, "accepted a view/selection that addresses rows outside the pools or lengths")
            return v
        out, lse = want
        v.check(torch.equal(torch.isinf(res.lse), torch.isinf(lse)), "empty rows differ from the oracle")
        fin = torch.isfinite(lse)
        err = float((res.out.double() - out).abs().max()) if out.numel() else 0.0
        scale = float(out.abs().max()) if out.numel() else 0.0
        v.check(err <= TOL[view.k_pool.dtype] * max(1.0, scale) * 10, f"out off the oracle by {err:.3g}")
        if fin.any():
            lerr = float((res.lse.double()[fin] - lse[fin]).abs().max())
            v.check(lerr <= 1e-4, f"lse off the oracle by {lerr:.3g}")
    return v


# ---- window attention -------------------------------------------------------------------------------------------
def _mutate_window(state, m):
    q, k, val, lengths = state["q"], state["k"].clone(), state["v"], state["lengths"]
    kind = m["kind"]
    b, slots = k.shape[0], k.shape[2] if k.dim() == 4 else 0
    if kind == "poison_valid":
        k[m["a"] % b, :, m["a"] % slots] = float(m["value"])
    elif kind == "poison_padding" and slots:
        k[:, :, -1] = float("nan")
        lengths = [min(n, slots - 1) for n in lengths] if isinstance(lengths, list) else [slots - 1] * b
    elif kind == "v_strided":
        val = val.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "lengths":
        lengths = m["value"]
    elif kind == "q_meta":
        q = q.to("meta")
    elif kind == "q_nan":
        q = q.clone()
        q[0, 0, 0] = float("nan")
    elif kind == "q_int":
        q = q.to(torch.int32)
    elif kind == "kv_rank":
        k, val = k.sum(2), val.sum(2)
    return {"q": q, "k": k, "v": val, "lengths": lengths}


def case_window(spec):
    v = Verdict()
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype = DTYPES[spec["dtype"]]
    b, hkv, g, d, slots = spec["batch"], spec["hkv"], spec["g"], spec["d"], spec["slots"]
    k = torch.randn(b, hkv, slots, d, generator=gen).to(dtype)
    val = torch.randn(b, hkv, slots, d, generator=gen).to(dtype)
    q = torch.randn(b, hkv * g, d, generator=gen)
    lengths = spec["lengths"]
    state = {"q": q, "k": k, "v": val, "lengths": lengths}
    for m in spec["mutations"]:
        state = _composed(_mutate_window, state, m)
    q, k, val, lengths = state["q"], state["k"], state["v"], state["lengths"]
    ok, res = v.call(hetero.window_attention, q, k, val, lengths, None, spec["backend"])
    if ok:
        n = torch.as_tensor(lengths if lengths is not None else [slots] * b)
        ref = hetero.reference.window_attention(q.double(), k.double(), val.double(), n, compute_dtype=torch.float64)
        bad_valid = any(not torch.isfinite(k[s, :, :int(n[s])]).all() for s in range(b))
        v.check(not bad_valid, "accepted NaN/inf in the valid slots of k")
        if not bad_valid:
            err = rel_err(res.out, ref.out)
            v.check(err <= 1e-4, f"window out off the oracle by {err:.3g}")
    return v


# ---- merge -----------------------------------------------------------------------------------------------------
def case_merge(spec):
    v = Verdict()
    gen = torch.Generator().manual_seed(spec["seed"])
    b, h, d = spec["batch"], spec["heads"], spec["d"]
    parts = []
    for p in spec["parts"]:
        if p == "none":
            parts.append(None)
            continue
        out = torch.randn(b, h, d, generator=gen)
        lse = torch.randn(b, h, generator=gen) * 3
        if p == "nan_lse":
            lse[0, 0] = float("nan")
        elif p == "empty":
            out, lse = torch.zeros_like(out), torch.full_like(lse, -math.inf)
        elif p == "posinf":
            lse[0, 0] = math.inf
        elif p == "big":
            lse = lse + 1e30
        elif p == "shape":
            out = out[:, :1]
        elif p == "half":
            out, lse = out.half(), lse.half()
        elif p == "tensor":
            parts.append(out)
            continue
        parts.append(PartialAttention(out, lse))
    arg = parts if spec["container"] == "list" else tuple(parts) if spec["container"] == "tuple" else \
        (x for x in parts) if spec["container"] == "generator" else (parts[0] if parts else None)
    ok, res = v.call(hetero.merge, arg)
    if ok:
        if not all(isinstance(p, PartialAttention) for p in parts):
            v.check(False, "merge accepted something that is not a PartialAttention")
            return v
        ref = merge_reference(parts, torch.float64)
        v.check(not any(bool(torch.isnan(p.lse).any()) for p in parts), "merge accepted a NaN lse")
        v.check(not bool(torch.isnan(res.out).any()), "merge returned NaN")
        err = float((res.out.double() - ref.out).abs().max()) if ref.out.numel() else 0.0
        v.check(err <= 1e-4, f"merge out off the reference by {err:.3g}")
    return v


# ---- configs ---------------------------------------------------------------------------------------------------
def case_config(spec):
    v = Verdict()
    kwargs = spec["kwargs"]
    if spec.get("as_dict"):
        ok, _ = v.call(LayerCache, kwargs)
        v.check(not ok, "LayerCache accepted a dict as its config")
        ok, _ = v.call(HeteroAttention, kwargs)
        v.check(not ok, "HeteroAttention accepted a dict as its config")
        return v
    ok, config = v.call(HeteroConfig, **kwargs)
    if not ok:
        return v
    gen = torch.Generator().manual_seed(spec["seed"])
    layer = LayerCache(config)
    k = torch.randn(2, 2, 37, 16, generator=gen)
    ok, _ = v.call(layer.append, k, torch.randn_like(k), [37, 20])
    if not ok:
        v.check(not layer.initialized or layer.host is not None, "a refused first append left a half-built layer")
        return v
    attn = HeteroAttention(config)
    q = torch.randn(2, 4, 16, generator=gen)
    ok, res = v.call(attn.run, q, layer)
    if ok:
        v.check(bool(torch.isfinite(res).all()), "a valid config produced a non-finite output")
    attn.close()
    return v


# ---- append / run / crop sequences with faults -----------------------------------------------------------------
class _Faults:
    """Makes the n-th call of the retriever class's ``add`` (counted from arming) raise."""

    def __init__(self, cls):
        self.cls, self.countdown, self.kind, self.fired = cls, None, None, 0
        original = cls.add
        faults = self

        def add(retriever, seq, keys):
            if faults.countdown is not None:
                faults.countdown -= 1
                if faults.countdown < 0:
                    faults.countdown = None
                    faults.fired += 1
                    raise KeyboardInterrupt("injected") if faults.kind == "interrupt" else RuntimeError("injected")
            return original(retriever, seq, keys)

        cls.add = add
        self.original = original

    def arm(self, after: int, kind: str):
        self.countdown, self.kind = after, kind

    def disarm(self):
        self.countdown = None
        self.cls.add = self.original


def _index_in_step(layer) -> bool:
    return layer.retriever.ntotal == layer.host_lengths()


def case_sequence(spec):
    v = Verdict()
    gen = torch.Generator().manual_seed(spec["seed"])
    name = spec["retriever"]
    cls = RETRIEVERS.load(name)
    options = {"ivf": {"nlist": 4, "min_train": 16}, "ivf-group": {"min_train": 16}}.get(name, {})
    config = HeteroConfig(window=spec["window"], sinks=spec["sinks"], block_tokens=spec["block_tokens"],
                          retriever=name, retriever_options=options, budget=spec["budget"])
    indexer = hetero.worker.Worker("fuzz-indexer") if spec["indexer"] else None
    layer = LayerCache(config, indexer=indexer)
    attn = HeteroAttention(config)
    b, hkv, g, d = spec["batch"], spec["hkv"], spec["g"], spec["d"]
    dtype = DTYPES[spec["dtype"]]
    faults = _Faults(cls)
    try:
        for op in spec["ops"]:
            kind = op["kind"]
            if kind == "fault":
                faults.arm(op["after"], op["fault"])
                continue
            if kind == "run":
                q = torch.randn(b, hkv * g, d, generator=gen)
                try:
                    ok, res = v.call(attn.run, q, layer)
                except KeyboardInterrupt:
                    continue
                if ok:
                    v.check(bool(torch.isfinite(res).all()), "run: not finite")
                    if name == "all":
                        err = rel_err(res, oracle(q, layer))
                        v.check(err <= 1e-3, f"exact retriever off the oracle by {err:.3g} after {op}")
                elif v.error not in ("IndexSyncError", "ShapeError", "InvalidValueError"):
                    v.check(False, f"run refused with {v.error}")
                continue
            if indexer is not None:  # queued adds land first: the snapshot must not race the background indexer
                indexer.submit(lambda: None).result()
            before = snapshot(layer)
            try:
                if kind == "append":
                    t = max(op["lengths"]) if op["lengths"] else 0
                    keys = torch.randn(b, hkv, max(t, 1), d, generator=gen).to(dtype)
                    vals = torch.randn(b, hkv, max(t, 1), d, generator=gen).to(dtype)
                    if op.get("poison"):
                        keys[op["poison"] % b, 0, 0] = float("nan")
                        lengths = [max(1, n) for n in op["lengths"]]
                    else:
                        lengths = op["lengths"]
                    ok, _ = v.call(layer.append, keys, vals, lengths if op.get("ragged", True) else None)
                elif kind == "decode":
                    keys = torch.randn(b, hkv, d, generator=gen).to(dtype)
                    if op.get("poison"):
                        keys[0, 0, 0] = float("inf")
                    ok, _ = v.call(layer.append, keys, torch.randn(b, hkv, d, generator=gen).to(dtype))
                elif kind == "bad_shape":
                    if not layer.initialized:
                        continue  # a first append may fix any batch
                    ok, _ = v.call(layer.append, torch.randn(b + 1, hkv, 2, d), torch.randn(b + 1, hkv, 2, d))
                    v.check(not ok, "accepted keys of another batch")
                elif kind == "crop":
                    ok, _ = v.call(layer.crop, op["lengths"][:b] + [0] * (b - len(op["lengths"])))
                else:
                    raise ValueError(kind)
            except KeyboardInterrupt:
                ok = True  # an interrupt inside an add: the tiers hold the tokens, the index heals at the next wait
            if not ok and v.error != "IndexSyncError":
                v.check(same_snapshot(before, snapshot(layer)), f"rejected {kind} changed the cache or index")
        faults.disarm()
        for _ in range(2):  # the first wait may report (and heal) a failed add; the second must be quiet
            try:
                layer.wait_indexed()
            except HeteroError:
                continue
            break
        else:
            v.check(False, "the index did not heal")
        if layer.initialized:
            v.check(_index_in_step(layer), f"index {layer.retriever.ntotal} != host tier {layer.host_lengths()}")
            q = torch.randn(b, hkv * g, d, generator=gen)
            ok, res = v.call(attn.run, q, layer)
            v.check(ok, f"run after healing refused: {res}")
    finally:
        faults.disarm()
        attn.close()
        if indexer is not None:
            indexer.close()
    v.fired = faults.fired
    return v


CASES = {"sparse": case_sparse, "window": case_window, "merge": case_merge, "config": case_config,
         "sequence": case_sequence}


def main():
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            verdict = CASES[spec["case"]](spec)
            out = verdict.json()
            out["fired"] = getattr(verdict, "fired", 0)
        except Exception as e:  # noqa: BLE001 - a bug of the harness or an escape outside Verdict.call
            out = {"outcome": "harness", "error": type(e).__name__,
                   "violations": [f"escaped: {type(e).__name__}: {e} | {traceback.format_exc()[-800:]}"]}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
