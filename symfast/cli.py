"""Command line: ``symfast <command>`` (also ``python -m symfast <command>``).

Commands:
  demo   Figure 1-left of the paper: learning-rate-induced sparsity from the
         rescaling symmetry theta = w * u (symfast.dcs), against vanilla SGD.

More commands (e.g. ``repro`` for the other experiments, ``train``) plug in by
adding a ``_add_<name>(subparsers)`` function to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


def _fmt(x: Optional[float]) -> str:
    return "diverged" if x is None else f"{x:.3f}"


def _print_table(per_lr: list[dict], out=None) -> None:
    out = out if out is not None else sys.stdout
    head = f"{'lr':>10} {'lr/edge':>8} | {'vanilla ==0':>11} {'vanilla <1e-6':>13} | {'DCS ==0':>9} {'DCS <1e-6':>9}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for p in per_lr:
        v, d = p["vanilla"], p["dcs"]
        print(
            f"{p['lr']:>10.4g} {p['lr_over_vanilla_edge']:>8.3f} | {_fmt(v['zero_frac']):>11} "
            f"{_fmt(v['small_frac']):>13} | {_fmt(d['zero_frac']):>9} {_fmt(d['small_frac']):>9}",
            file=out,
        )


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments import fig1_left  # the library never imports experiments; the CLI may

    res = fig1_left.run(args.out, quick=not args.full, seed=args.seed, progress=not args.progress_off)
    m, cfg = res["metrics"], res["config"]
    print(f"symfast demo: {res['experiment']} ({'full' if args.full else 'quick'}, seed {args.seed})")
    print(f"claim: {res['claim']}")
    print()
    print(
        f"sparsity = fraction of the d={cfg['d']} entries of theta exactly 0 ('==0') or with |theta| < "
        f"{cfg['zero_tol']:g} ('<1e-6'), after {cfg['steps']:,} SGD steps, {cfg['dtype']}; "
        f"lr/edge = lr * (d+2) (vanilla SGD is unstable above 1)"
    )
    levels = [(m["noise_std"], m["per_lr"], m["summary"], res["verdict"], True)]
    levels += [(float(k), v["per_lr"], v["summary"], v["verdict"], False) for k, v in m["other_noise_levels"].items()]
    for sigma, per_lr, summ, verdict, primary in levels:
        print()
        print(f"label noise std {sigma:g}{' (primary: judged)' if primary else ' (sensitivity)'}:")
        _print_table(per_lr)
        top = summ["top_stable_lr"]
        if top is not None:
            print(
                f"  largest lr where both train stably: {top:.4g}; DCS exactly 0 there: "
                f"{_fmt(summ['dcs_zero_frac_at_top_stable_lr'])}; max vanilla exactly-0 fraction over its "
                f"stable lrs: {_fmt(summ['vanilla_max_zero_frac'])}"
            )
        print(f"  criterion -> {verdict}")
    print()
    print(f"criterion: {res['criterion']}")
    print(f"verdict: {res['verdict'].upper()}")
    print(f"figure: {res['figure']}")
    print(f"record: {res['json']}")
    print(f"time: {res['seconds']:.1f} s")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="reproduce Figure 1-left (sparsity vs learning rate, vanilla vs DCS)",
        description="Train vanilla and DCS (theta = w * u) linear regressions with batch-size-1 SGD "
        "over a sweep of learning rates; write fig1_left.png and fig1_left.json.",
    )
    p.add_argument("--out", default="results", help="output directory (default: results/)")
    p.add_argument("--full", action="store_true", help="finer lr grid, 3 replicates, 3 noise levels (slower)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", dest="progress_off", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_demo)


_COMMANDS: list[Callable] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symfast", description="symfast: structured constraints from symmetry.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
