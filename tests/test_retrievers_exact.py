import pytest
import torch

from hetero import HeteroConfig, LayerCache
from hetero.retrieval.base import topk_group


def _layer(retriever="exact", group_rule="union", n=(60, 25), hkv=2, d=8):
    cfg = HeteroConfig(window=3, sinks=1, retriever=retriever, group_rule=group_rule, block_tokens=5)
    layer = LayerCache(cfg)
    gen = torch.Generator().manual_seed(3)
    t = max(n)
    layer.append(torch.randn(len(n), hkv, t, d, generator=gen), torch.randn(len(n), hkv, t, d, generator=gen),
                 torch.tensor(n))
    return layer


@pytest.mark.parametrize("rule", ["union", "sum"])
def test_exact_topk_matches_brute_force(rule):
    layer = _layer(group_rule=rule)
    g = 4
    q = torch.randn(2, 2 * g, 8)
    sel = layer.retriever.search(q, [5, 3])
    for b, k in enumerate([5, 3]):
        keys = layer.host.keys(b)  # [Hkv, N, D]
        for h in range(2):
            s = q[b, h * g:(h + 1) * g] @ keys[h].T  # [G, N]
            if rule == "sum":
                want = set(s.sum(0).topk(k).indices.tolist())
            else:
                want = set(s.topk(k, dim=-1).indices.flatten().tolist())
            got = [i for i in sel.indices[b, h].tolist() if i >= 0]
            assert sorted(got) == got and set(got) == want and len(got) == len(want)


def test_topk_group_union_deduplicates_and_per_head_marks_membership():
    scores = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 0.0, 4.0, 0.0]])
    ids, member = topk_group(scores, 2, "union")
    assert ids.tolist() == [0, 1, 2] and member is None
    ids, member = topk_group(scores, 2, "per-head")
    assert ids.tolist() == [0, 1, 2] and member.tolist() == [[True, True, False], [True, False, True]]
    ids, _ = topk_group(scores, 2, "sum")
    assert ids.tolist() == [0, 1]


def test_per_head_rule_attends_each_head_to_its_own_topk():
    from hetero.reference import sparse_attention as ref_sparse

    layer = _layer(group_rule="per-head")
    q = torch.randn(2, 8, 8)
    sel = layer.retriever.search(q, [5, 3])
    assert sel.log_weight is not None
    out = ref_sparse(q.double(), layer.host.view(), sel, compute_dtype=torch.float64)
    for b, k in enumerate([5, 3]):
        keys, vals = layer.host.keys(b).double(), layer.host.values(b).double()
        for hq in range(8):
            h = hq // 4
            s = q[b, hq].double() @ keys[h].T / 8 ** 0.5
            top = s.topk(k).indices
            want = torch.softmax(s[top], 0) @ vals[h, top]
            assert torch.allclose(out.out[b, hq], want, atol=1e-10)


def test_per_kv_head_budgets():
    layer = _layer()
    sel = layer.retriever.search(torch.randn(2, 8, 8), torch.tensor([[2, 6], [0, 1]]))
    valid = (sel.indices >= 0).sum(-1)
    assert int(valid[1, 0]) == 0 and int(valid[0, 0]) <= 4 * 2 and int(valid[0, 1]) >= 6


def test_budget_clamped_to_ntotal_and_zero():
    layer = _layer()
    sel = layer.retriever.search(torch.randn(2, 8, 8), [1000, 0])
    assert (sel.indices[1] == -1).all()
    assert sorted(set(sel.indices[0, 0].tolist()) - {-1}) == list(range(layer.host.length[0]))


def test_all_retriever_selects_every_host_token():
    layer = _layer(retriever="all")
    sel = layer.retriever.search(torch.randn(2, 8, 8), [0, 0])
    assert sel.indices.shape == (2, 2, max(layer.host.length))
    assert (sel.indices[1, :, layer.host.length[1]:] == -1).all()


def test_budget_fraction_rounds_up():
    cfg = HeteroConfig(budget=0.02)
    assert cfg.budget_for(1000) == 20 and cfg.budget_for(1001) == 21 and cfg.budget_for(0) == 0
    assert HeteroConfig(budget=50).budget_for(10) == 10
