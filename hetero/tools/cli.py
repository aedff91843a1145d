"""The ``hetero`` command: ``hetero profile`` (default job) and friends.

User errors (bad flag values, invalid config) print one line and exit with code 2, no stack trace.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import List, Optional

from hetero.errors import HeteroError

from .argtypes import OneLineParser as _Parser, budget as _budget, nonneg_int as _nonneg_int, positive_int as _positive_int


def _json(obj) -> str:
    """``obj`` as one line of strict JSON: a figure that does not exist (NaN, as a step that is not fused has no
    fixed cost) is null, not the bare ``NaN`` that JSON parsers other than Python's refuse."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False)


def _build_parser() -> argparse.ArgumentParser:
    from hetero.config import KV_DTYPES
    from hetero.registry import HOST_BACKENDS, WINDOW_BACKENDS
    from hetero.retrieval import available_retrievers

    parser = _Parser(prog="hetero", description="Heterogeneous CPU-GPU attention for long-context decoding.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{profile,env,bench}",
                                help="'hetero profile' is the main job; '<command> --help' lists its options")
    from .profile import PRESETS

    p = sub.add_parser("profile", help="dense vs hetero on a decode workload: time per phase, error, memory")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="tokens already in the cache (default 32768; --model: 4096; --workload real: "
                        "8192 - steps - warmup)")
    p.add_argument("--batch", type=_positive_int, default=None, help="sequences decoded together (1)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="layer geometry of a known model (default llama3-8b: 32 q / 8 kv heads, head_dim 128)")
    p.add_argument("--heads", type=_positive_int, default=None, help="query heads (overrides the preset)")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="KV heads (overrides the preset)")
    p.add_argument("--head-dim", type=_positive_int, default=None, help="head dim (overrides the preset)")
    p.add_argument("--workload", choices=["synthetic", "real"], default=None,
                   help="synthetic (structured keys, any size; the default) or real (captured SmolLM2 attention, "
                        "<= 8192 tokens)")
    p.add_argument("--layer", type=_nonneg_int, default=None, help="real workload: the layer profiled (15)")
    p.add_argument("--model", default=None,
                   help="profile a HuggingFace model end to end instead ('smollm2' or a local model folder)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the fast tier and the dense baseline run (auto: CUDA when present); the host tier "
                        "is always in CPU memory")
    p.add_argument("--trace", default=None, metavar="OUT.json",
                   help="write a Chrome/Perfetto trace (one track per thread)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a PNG of phases per step and accuracy")
    p.add_argument("--window", type=_nonneg_int, default=1024, help="recent tokens on the fast tier (1024)")
    p.add_argument("--sinks", type=_nonneg_int, default=4, help="attention-sink tokens on the fast tier (4)")
    p.add_argument("--budget", type=_budget, default=0.02,
                   help="host keys read per KV head and step (the default budget_per='kv_head'; a group's query heads "
                        "share them): a fraction of the host tier (default 0.02) or a count of keys (e.g. 500)")
    p.add_argument("--retriever", choices=available_retrievers(), default="ivf-group",
                   help="how the host keys that matter are found (ivf-group); 'all' reads every host key (exact)")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default=None, help="dtype of the stored K/V (bfloat16)")
    p.add_argument("--steps", type=_positive_int, default=5, help="decode steps measured (5)")
    p.add_argument("--warmup", type=_nonneg_int, default=None,
                   help="decode steps run first and reported apart, not in the medians (2)")
    p.add_argument("--seed", type=int, default=None, help="seed of the synthetic workload (0)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (all cores)")
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                   help="the two sides of a step side by side on threads of their own (on) or on the same threads "
                        "(off); auto: side by side when the fast tier is on CUDA")
    p.add_argument("--window-backend", choices=["auto"] + WINDOW_BACKENDS.names(), default="auto",
                   help="kernel of the fast tier's window attention (auto: the first that supports the inputs; "
                        "'hetero env' shows why each can or cannot)")
    p.add_argument("--host-backend", choices=["auto"] + HOST_BACKENDS.names(), default="auto",
                   help="kernel of the host tier's sparse attention (auto: cpp, then numba, then torch)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e = sub.add_parser("env", help="versions, CPU features, threads, and which backends are usable and why not")
    e.add_argument("--kernels", action="store_true",
                   help="also compile the Triton kernels for sm_80/sm_90 and show registers, shared memory, spills")
    e.add_argument("--calibrate", action="store_true",
                   help="measure the C++ kernels' prefetch policies on this CPU (a few seconds) and keep the best")
    e.add_argument("--json", action="store_true")
    bench = sub.add_parser("bench", help="benchmarks: sweep, cpu-sparse, retrieval, needle, e2e, chat")
    bench.add_argument("name", choices=["sweep", "cpu-sparse", "retrieval", "needle", "e2e", "chat"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark (see --help after its name)")
    return parser


def _profile(ns: argparse.Namespace) -> int:
    from hetero.config import HeteroConfig
    from .preflight import check_profile, resolve_device
    from .profile import PRESETS, ProfileArgs, run_profile
    from .report import print_model_profile, print_profile, progress

    workload = ns.workload or "synthetic"
    preset = ns.preset or ("smollm2" if workload == "real" else "llama3-8b")
    heads, kv_heads, head_dim = PRESETS[preset]
    heads, kv_heads, head_dim = ns.heads or heads, ns.kv_heads or kv_heads, ns.head_dim or head_dim
    if heads % kv_heads:
        raise HeteroError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    if workload == "real" and (heads, kv_heads, head_dim) != PRESETS["smollm2"]:
        raise HeteroError("--workload real is SmolLM2's attention: use --preset smollm2 (9 q / 3 kv heads, head_dim 64)")
    config = HeteroConfig(window=ns.window, sinks=ns.sinks, budget=ns.budget, retriever=ns.retriever,
                          threads=ns.threads, window_backend=ns.window_backend, host_backend=ns.host_backend,
                          overlap={"auto": "auto", "on": True, "off": False}[ns.overlap])
    device = resolve_device(ns.device)
    check_profile(ns, config, device, None if ns.model else (heads, kv_heads, head_dim))
    if workload != "real" and ns.layer is not None:
        raise HeteroError("--layer picks a layer of the real workload: use it with --workload real")
    log = (lambda s: None) if ns.json else _stderr
    if ns.model:
        from .profile_model import profile_model

        result = profile_model(ns.model, config, ns.context or 4096, ns.steps, log=log)
        print(_json(result)) if ns.json else print_model_profile(result)
        return 0
    warmup = 2 if ns.warmup is None else ns.warmup
    decoded = ns.steps + warmup
    context = ns.context or (8192 - decoded if workload == "real" else 32768)
    if workload == "real" and context + decoded > 8192:
        raise HeteroError(f"the real workload has 8192 tokens: --context {context} + --steps {ns.steps} + --warmup "
                          f"{warmup} is too long")
    args = ProfileArgs(context=context, batch=ns.batch or 1, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       steps=ns.steps, warmup=warmup, seed=ns.seed or 0, kv_dtype=ns.kv_dtype or "bfloat16",
                       workload=workload, layer=15 if ns.layer is None else ns.layer, native_threads=bool(ns.trace),
                       device=device.type)
    try:
        result = run_profile(config, args, log=log, progress=None if ns.json else progress)
    except ValueError as e:
        raise HeteroError(str(e)) from None
    spans = result.pop("_spans")
    if ns.trace:
        from .trace import write_trace

        result["trace_events"] = write_trace(ns.trace, spans)
        log(f"trace: {ns.trace} ({result['trace_events']} events; open in ui.perfetto.dev)")
    if ns.plot:
        from .plots import plot_profile

        plot_profile(result, ns.plot)
        log(f"plot: {ns.plot}")
    if ns.json:
        print(_json(result))
    else:
        print_profile(result)
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:  # bare `hetero`: what there is to run, not an error
        parser.print_help()
        return 0
    with warnings.catch_warnings():  # (restores the handler after the command)
        # a warning is one line on stderr here, not the library source line Python shows beside it
        warnings.showwarning = lambda message, category, *rest, **kw: print(
            f"hetero {ns.command}: warning: {str(message).removeprefix('hetero: ')}", file=sys.stderr)
        return _run_command(parser, ns)


def _run_command(parser, ns: argparse.Namespace) -> int:
    try:
        if ns.command == "profile":
            return _profile(ns)
        if ns.command == "env":
            from .envinfo import collect, print_env

            if ns.calibrate:
                from hetero.cpu.prefetch_calibrate import calibrate

                calibrate(log=(lambda s: None) if ns.json else _stderr)
            info = collect(kernels=ns.kernels)
            print(json.dumps(info)) if ns.json else print_env(info)
            return 0
        if ns.command == "bench":
            import importlib

            module = importlib.import_module(f".bench.{ns.name.replace('-', '_')}", __package__)
            return module.main(ns.args)
    except (HeteroError, FileNotFoundError) as e:
        print(f"hetero {ns.command}: error: {e}".splitlines()[0] if "\n" not in str(e) else
              f"hetero {ns.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
