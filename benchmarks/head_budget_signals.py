"""Which signal should split a layer's host budget over KV heads? An offline probe on real SmolLM2 attention.

For each layer and decode position (8K capture, host tier = everything but 4 sinks and a 256-token window), every
KV head's group selects the union of its query heads' exact top-k host keys, with k per KV head chosen by:

* ``flat``: the same k for every KV head (the baseline);
* ``share``: proportional to the host tier's share of attention mass in the previous step (what hetero's
  ``head_budget="adaptive"`` falls back to when the retriever cannot report the mass it missed);
* ``missed``, ``missed_sqrt``: proportional to (the square root of) the previous step's attention mass on host
  keys outside the flat top-k, i.e. what the flat split left out (``missed_sqrt`` is hetero's
  ``head_budget="adaptive"``);
* ``oracle_missed``: ``missed`` measured at the current step (not available online).

Weights are floored at 1/4 of their mean, and every split sums to the flat total. Prints one JSON line per budget
with the mean relative output error of each rule against full attention (float32). The missed-mass signals need
the mass of unselected host keys, which an exact scan has and an ANN retriever does not.

Usage: python benchmarks/head_budget_signals.py [--layers 1,3,...] [--positions 32]
"""
import argparse
import json
import math

import hetero  # noqa: F401  (before torch: it sets OMP_WAIT_POLICY so torch's OpenMP threads do not spin)
import torch

from hetero.tools.workloads.real import capture

SINKS, WINDOW = 4, 256


def _union_error(scores, v_host, win_scores, v_win, k):
    """Relative output error of attending over the union of each query's top-k host keys plus the window.
    scores [G, N] and win_scores [G, W] are scaled logits; v_host [N, D], v_win [W, D]."""
    m = torch.cat([scores, win_scores], 1).max(1, keepdim=True).values
    p_host, p_win = torch.exp(scores - m), torch.exp(win_scores - m)
    full = (p_host @ v_host + p_win @ v_win) / (p_host.sum(1, keepdim=True) + p_win.sum(1, keepdim=True))
    sel = torch.unique(scores.topk(k, dim=1).indices)
    ps = p_host[:, sel]
    out = (ps @ v_host[sel] + p_win @ v_win) / (ps.sum(1, keepdim=True) + p_win.sum(1, keepdim=True))
    return (out - full).norm(dim=1) / full.norm(dim=1)


def _split(weights, k, floor=0.25):
    w = torch.tensor(weights, dtype=torch.float64)
    w = torch.maximum(w, floor * w.mean()) + 1e-12
    return [int(round(x)) for x in (len(weights) * k * w / w.sum()).tolist()]


def run(budgets, layers, positions):
    cap = capture(8192)
    steps = list(range(8192 - positions - 1, 8192))
    for frac in budgets:
        errs = {r: [] for r in ("flat", "share", "missed", "missed_sqrt", "oracle_missed")}
        for layer in layers:
            q_all, k_all, v_all = cap.q[layer].float(), cap.k[layer].float(), cap.v[layer].float()
            hkv, d = k_all.shape[0], k_all.shape[2]
            g = q_all.shape[0] // hkv
            prev = None
            for t in steps:
                host, win = slice(SINKS, t - WINDOW + 1), list(range(SINKS)) + list(range(t - WINDOW + 1, t + 1))
                n = host.stop - host.start
                k = max(1, math.ceil(frac * n))
                parts, share, missed = [], [], []
                for h in range(hkv):
                    q = q_all[h * g:(h + 1) * g, t] / math.sqrt(d)
                    sh, sw = q @ k_all[h, host].T, q @ k_all[h, win].T
                    parts.append((sh, v_all[h, host], sw, v_all[h, win]))
                    lse = torch.logsumexp(torch.cat([sh, sw], 1), 1)
                    host_mass = torch.exp(torch.logsumexp(sh, 1) - lse)
                    top_mass = torch.exp(torch.logsumexp(sh.topk(k, 1).values, 1) - lse)
                    share.append(host_mass.mean().item())
                    missed.append((host_mass - top_mass).mean().item())

                def error(alloc):
                    return torch.cat([_union_error(sh, vh, sw, vw, max(1, min(n, kh)))
                                      for (sh, vh, sw, vw), kh in zip(parts, alloc)]).mean().item()

                flat = error([k] * hkv)
                errs["flat"].append(flat)
                errs["oracle_missed"].append(error(_split(missed, k)))
                if prev is None:
                    for r in ("share", "missed", "missed_sqrt"):
                        errs[r].append(flat)
                else:
                    errs["share"].append(error(_split(prev[0], k)))
                    errs["missed"].append(error(_split(prev[1], k)))
                    errs["missed_sqrt"].append(error(_split([x ** 0.5 for x in prev[1]], k)))
                prev = (share, missed)
        row = {"budget": frac, "layers": len(layers), "positions": positions}
        row.update({r: sum(v) / len(v) for r, v in errs.items()})
        print(json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.01,0.02,0.05")
    p.add_argument("--layers", default=",".join(str(i) for i in range(1, 30, 2)))
    p.add_argument("--positions", type=int, default=32)
    a = p.parse_args()
    run([float(x) for x in a.budgets.split(",")], [int(x) for x in a.layers.split(",")], a.positions)


if __name__ == "__main__":
    main()
