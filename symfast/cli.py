"""Command line: ``symfast <command>`` (also ``python -m symfast <command>``).

Commands:
  demo   the main job: the curated quick set of paper reproductions (Figure
         1-left's sparsity table first), a summary table of claims and
         verdicts, and the combined report results/report.md.
  repro  one experiment, several, or --all; --list lists them
         (symfast.experiments.EXPERIMENTS).
  train  sparse training of a real model (lm | digits) against a same-budget
         magnitude-pruning baseline (symfast.train); DDP under torchrun.

More commands (e.g. ``train``) plug in by adding a ``_add_<name>(subparsers)``
function to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

#: ``--seed`` of demo and repro: what ``torch.manual_seed`` takes, with room for the experiments' offsets.
SEED_LIMIT = 2 ** 63
#: ``symfast train --seed``: step k's batch is drawn with the seed ``seed * 1_000_003 + k`` (the fine-tunes use
#: ``seed + 1``), which must stay below 2**64 for ``torch.Generator.manual_seed``.
TRAIN_SEED_LIMIT = 2 ** 44
#: ``symfast train --context``: attention time grows with its square (4096 bytes: ~12 s a step on 2 cores).
CONTEXT_MAX = 4096


# ------------------------------------------------------------------ flag values (argparse ``type=``)
def _float_list(text: str) -> list:
    """An argparse ``type``: comma-separated finite numbers > 0 (``3e-3,1e-2``)."""
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated finite numbers > 0, got {text!r}")
    return vals


def _baseline_list(text: str) -> list:
    """An argparse ``type``: comma-separated distinct names of :data:`symfast.train.task.BASELINES`, or ``all``."""
    from .train.task import BASELINES

    if text == "all":
        return list(BASELINES)
    names = [] if text == "none" else text.split(",")
    if any(n not in BASELINES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected 'all', 'none' or distinct comma-separated names from "
                                         f"{', '.join(BASELINES)}, got {text!r}")
    return names


def _unit_list(text: str) -> list:
    """An argparse ``type``: comma-separated distinct numbers strictly between 0 and 1 (``0.5,0.9``)."""
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if not vals or not all(0 < v < 1 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated numbers S with 0 < S < 1, got {text!r}")
    return vals


def _seed_list(text: str) -> list:
    """An argparse ``type``: ``N`` (the seeds 0 .. N-1, N >= 1) or distinct comma-separated seeds (``3,7``; one seed:
    ``7,``), each 0 <= seed < 2**44."""
    want = f"N >= 1 (the seeds 0..N-1) or distinct comma-separated seeds 0 <= s < 2**44 (one seed: 's,'), got {text!r}"
    try:
        if "," in text:
            parts = text.split(",")
            vals = [int(x) for x in (parts[:-1] if parts[-1] == "" else parts)]  # "7," is the one seed 7
        else:
            vals = list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}") from None
    if not vals or not all(0 <= v < TRAIN_SEED_LIMIT for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected {want}")
    return vals


def _open_unit(text: str) -> float:
    """An argparse ``type``: a number strictly between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number with 0 < S < 1, got {text!r}")
    return v


def _int_in(lo: int, hi: Optional[int] = None, hi_text: Optional[str] = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``lo <= n`` (``< hi`` when given, said as ``hi_text``); otherwise argparse's
    error naming the flag, the range and the value (exit status 2)."""
    if hi is None:
        want = f"an integer >= {lo}"
    else:
        want = f"an integer with {lo} <= N " + (f"< {hi_text}" if hi_text else f"<= {hi - 1}")

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if v < lo or (hi is not None and v >= hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v

    return parse


def _float_from(lo: float, *, inclusive: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``> lo`` (``>= lo`` when ``inclusive``); otherwise exit 2."""
    want = f"a finite number {'>=' if inclusive else '>'} {lo:g}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (v == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v

    return parse


def _out_dir(text: str) -> str:
    """An argparse ``type`` for ``--out``: a directory, or a path where one can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a directory, got {text!r}, which is an existing file")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make the directory {text!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {str(parent)!r} (no permission) for {text!r}")
    return text


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


def _print_fig1_left(res: dict, out_dir: Path) -> None:
    """The Figure 1-left table: sparsity per learning rate, vanilla against DCS, every noise level."""
    m, cfg = res["metrics"], res["config"]
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
    for f in res["figures"]:
        print(f"figure: {out_dir / f}")
    print(f"record: {out_dir / 'result.json'}")
    print(f"time: {res['seconds']:.1f} s")


def _run_set(names: Sequence[str], args: argparse.Namespace, *, show_fig1_left_table: bool) -> list[dict]:
    from . import experiments  # the library never imports experiments; the CLI may

    out = Path(args.out)
    quick = not args.full
    records = []
    for i, name in enumerate(names, 1):
        exp = experiments.get(name)
        print(f"[{i}/{len(names)}] {name}: {exp.title} ({'quick' if quick else 'full'}, seed {args.seed}; expected "
              f"~{_minutes(exp.minutes[0 if quick else 1])} on 2 idle cores)", flush=True)
        config = getattr(args, "configs", {}).get(name)  # repro --model/--data
        rec = experiments.run(name, out, quick=quick, seed=args.seed, progress=not args.progress_off, config=config)
        if name == "fig1-left" and show_fig1_left_table:
            _print_fig1_left(rec, out / name)
        print(f"    -> {rec['verdict'].upper()} in {rec['seconds']:.1f} s: {rec['headline']}", flush=True)
        print(f"       {out / name / 'report.md'}", flush=True)
        records.append(rec)
    return records


def _finish(records: list[dict], out: Path, command: str, report_records: Optional[list] = None) -> None:
    from .experiments import report

    path = report.write_report(out, command=command, records=report_records)
    print()
    print(report.summary_text(records))
    print(f"combined report: {path}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import experiments

    names = list(experiments.MAIN_JOB)
    mode = "full" if args.full else "quick"
    print(f"symfast demo: the main job, {len(names)} reproductions of the paper ({mode}, seed {args.seed}) "
          f"-> {args.out}/")
    records = _run_set(names, args, show_fig1_left_table=True)
    cmd = "symfast demo" + (" --full" if args.full else "") + (f" --seed {args.seed}" if args.seed else "")
    _finish(records, Path(args.out), cmd, report_records=records)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: the curated quick set of paper reproductions, with a combined report",
        description="Run the curated reproductions (" + ", ".join(_main_job_names()) + "), print Figure 1-left's "
        "table and a summary table of claims and verdicts, and write OUT/NAME/{result.json,report.md,*.png} "
        "and the combined OUT/report.md.",
    )
    p.add_argument("--out", type=_out_dir, default="results", help="output directory (default: results/)")
    p.add_argument("--full", action="store_true", help="the paper's appendix settings (much slower)")
    p.add_argument("--seed", type=_int_in(0, SEED_LIMIT, "2**63"), default=0,
                   help="random seed, 0 <= N < 2**63 (default: 0)")
    p.add_argument("--no-progress", dest="progress_off", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_demo)


def _main_job_names() -> list[str]:
    from . import experiments

    return list(experiments.MAIN_JOB)


def _minutes(m: float) -> str:
    return f"{m * 60:.0f} s" if m < 1 else f"{m:.0f} min"


def _print_list() -> None:
    from . import experiments

    print(f"{'name':<16} {'main job':<9} {'quick':>6} {'full':>7}  what")
    for e in experiments.EXPERIMENTS:
        print(f"{e.name:<16} {'yes' if e.main_job else '':<9} {_minutes(e.minutes[0]):>6} {_minutes(e.minutes[1]):>7}  "
              f"{e.title}")
    print(f"(expected times on 2 idle cores; --all: ~{_minutes(sum(e.minutes[0] for e in experiments.EXPERIMENTS))} "
          f"quick, ~{_minutes(sum(e.minutes[1] for e in experiments.EXPERIMENTS))} full)")
    print()
    print("symfast repro NAME [NAME ...] [--quick | --full] [--out DIR] [--seed N]; --all runs every one; "
          "symfast demo runs the main job.")
    print("fig1-right and dcs-cnn also take --model resnet18 --data PATH: the paper's ResNet18 on CIFAR-10.")


def _cmd_repro(args: argparse.Namespace) -> int:
    from . import experiments

    if args.list:
        if args.names or args.all:
            given = " ".join(args.names) or "--all"
            args.repro_parser.error(f"argument --list: takes no experiment names or --all, got {given!r}")
        _print_list()
        return 0
    if args.all and args.names:
        print("symfast repro: give experiment names or --all, not both", file=sys.stderr)
        return 2
    if not args.all and not args.names:
        print("symfast repro: name an experiment (see --list) or use --all", file=sys.stderr)
        return 2
    known = experiments.names()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"symfast repro: unknown experiment(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    names = known if args.all else list(dict.fromkeys(args.names))
    args.configs = _model_data_configs(names, args)
    records = _run_set(names, args, show_fig1_left_table=False)
    cmd = "symfast repro " + ("--all" if args.all else " ".join(names)) + (" --full" if args.full else "")
    cmd += f" --seed {args.seed}" if args.seed else ""
    if args.model is not None:
        cmd += f" --model {args.model}"
    if args.data is not None:
        cmd += f" --data {args.data}"
    _finish(records, Path(args.out), cmd)  # the combined report covers every record found in OUT
    return 0


def _model_data_configs(names: Sequence[str], args: argparse.Namespace) -> dict:
    """``{name: {'model': ..., 'data': ...}}`` from ``repro --model/--data``, checked before anything runs.

    Only experiments whose module lists ``MODEL_CHOICES`` take the flags (fig1-right, dcs-cnn); any other, an unknown
    model, a bad combination or a path without CIFAR-10 is an argparse error naming the flag (exit status 2).
    """
    from . import experiments

    if args.model is None and args.data is None:
        return {}
    parser = args.repro_parser
    flags = " and ".join(f for f, v in (("--model", args.model), ("--data", args.data)) if v is not None)
    arg = "--model" if args.model is not None else "--data"
    mods = {n: experiments.get(n).load() for n in names}
    refused = [n for n, m in mods.items() if not hasattr(m, "MODEL_CHOICES")]
    if refused:
        takers = [e.name for e in experiments.EXPERIMENTS if hasattr(e.load(), "MODEL_CHOICES")]
        verb = "apply" if " and " in flags else "applies"
        parser.error(f"argument {arg}: {flags} {verb} only to {', '.join(takers)}, not to {', '.join(refused)}")
    configs = {}
    for n, m in mods.items():
        if args.model is not None and args.model not in m.MODEL_CHOICES:
            parser.error(f"argument --model: invalid choice for {n}: {args.model!r} (choose from "
                         f"{', '.join(m.MODEL_CHOICES)})")
        cfg = {k: v for k, v in (("model", args.model), ("data", args.data)) if v is not None}
        try:
            m.make_config(not args.full, args.seed, **cfg)  # the model/data combination and the data path
        except (ValueError, FileNotFoundError) as exc:
            msg = str(exc)
            if msg.startswith("--data "):  # the data path's own error: "--data PATH: what is wrong"
                parser.error(f"argument --data: {msg[len('--data '):]}")
            parser.error(f"argument {arg}: {msg}")
        configs[n] = cfg
    return configs


def _add_repro(sub) -> None:
    p = sub.add_parser(
        "repro",
        help="reproduce one or more experiments of the paper (see --list)",
        description="Each run writes OUT/NAME/result.json (claim, verdict computed by a stated criterion, metrics, "
        "config, seconds), PNG figure(s) and report.md, then rebuilds the combined OUT/report.md from every "
        "record in OUT.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="experiment(s) to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--all", action="store_true", help="run every ready experiment (quick unless --full)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about a minute each on 2 CPU cores (default)")
    mode.add_argument("--full", action="store_true", help="the paper's appendix settings (slower)")
    p.add_argument("--out", type=_out_dir, default="results", help="output directory (default: results/)")
    p.add_argument("--seed", type=_int_in(0, SEED_LIMIT, "2**63"), default=0,
                   help="random seed, 0 <= N < 2**63 (default: 0)")
    p.add_argument("--no-progress", dest="progress_off", action="store_true", help="hide the progress bars")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="fig1-right and dcs-cnn only: 'resnet18' runs the paper's ResNet18 on CIFAR-10 (needs --data; "
                   "on the GPU when there is one); default: the CPU-scale model on scikit-learn's digits")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="fig1-right and dcs-cnn only, with --model resnet18: the CIFAR-10 python-version directory "
                   "(cifar-10-batches-py/, or its parent); nothing is downloaded")
    p.set_defaults(func=_cmd_repro, repro_parser=p)


def _check_train_flags(args: argparse.Namespace, world: int) -> None:
    """The checks of ``symfast train`` flags that depend on other flags: each is a parser error (exit status 2)."""
    from .train.task import LM_HEADS, LM_ONLY, defaults

    parser = args.train_parser
    if args.task != "lm":
        given = [f"--{k.replace('_', '-')}" for k in LM_ONLY if getattr(args, k) is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            parser.error(f"argument {given[0]}: {' and '.join(given)} {verb} only to --task lm, not to --task "
                         f"{args.task}")
    d = defaults(args.task, args.structure, quick=args.quick)
    if args.task == "lm":
        width = d["width"] if args.width is None else args.width
        if width % LM_HEADS:
            parser.error(f"argument --width: --task lm needs a width divisible by its {LM_HEADS} attention heads, "
                         f"got {width}")
    batch = d["batch_size"] if args.batch_size is None else args.batch_size
    if batch % world:
        parser.error(f"argument --batch-size: the global batch must be divisible by the number of processes "
                     f"({world}), got {batch}")
    if args.parallel == "fsdp" and world > 1:
        from .train.task import MASK_IN_TRAINING

        masked = [b for b in (args.baselines if args.baselines is not None else MASK_IN_TRAINING)
                  if b in MASK_IN_TRAINING]
        if masked:
            parser.error(f"argument --baselines: {', '.join(masked)} cannot run under --parallel fsdp (they mask the "
                         "weights between steps, which FSDP2 shards); use --baselines one_shot_magnitude")
        if args.target_sparsity is not None:
            parser.error("argument --target-sparsity: cannot run under --parallel fsdp (it adapts the optimizer, "
                         "which FSDP2 builds on the shards)")
    if args.sweep:
        from .train.sweep import SWEEP_STRUCTURES

        clash = [flag for flag, v in (("--target-sparsity", args.target_sparsity), ("--seed", args.seed),
                                      ("--resume", args.resume or None), ("--stop-after", args.stop_after))
                 if v is not None]
        if clash:
            parser.error(f"argument {clash[0]}: not with --sweep (it sets each run's target and seed from "
                         "--targets and --seeds, reuses finished runs and resumes interrupted ones itself)")
        if args.structure not in SWEEP_STRUCTURES:
            parser.error(f"argument --structure: --sweep needs one of {', '.join(SWEEP_STRUCTURES)} (it sweeps "
                         f"target sparsities; lowrank zeroes nothing), got {args.structure}")
        if world > 1:
            parser.error("argument --sweep: runs in one process; start it without torchrun")
        if args.alpha == 0:
            parser.error("argument --alpha: --sweep steers a starting alpha, which must be > 0, got 0")
    else:
        given = [flag for flag, v in (("--targets", args.targets), ("--seeds", args.seeds)) if v is not None]
        if given:
            parser.error(f"argument {given[0]}: applies only with --sweep")
    if args.warmup_steps is not None:
        from .train.task import TrainConfig, split_budget

        steps = d["steps"] if args.steps is None else args.steps
        ft, main = split_budget(steps, TrainConfig.finetune_fraction)
        if args.warmup_steps > main:
            parser.error(f"argument --warmup-steps: expected at most the training phase's {main} steps (--steps "
                         f"{steps} less the {ft}-step fine-tune), got {args.warmup_steps}")
    if args.target_sparsity is not None and args.alpha == 0:
        parser.error("argument --alpha: --target-sparsity scales a starting alpha, which must be > 0, got 0")
    if args.parallel is not None and world == 1:
        print(f"symfast train: warning: --parallel {args.parallel} has no effect in one process; it applies under "
              "torchrun (torchrun --nproc_per_node N -m symfast train ...). Training in one process.",
              file=sys.stderr, flush=True)


def _interrupted_line(exc: KeyboardInterrupt, out: str) -> str:
    """One line for Ctrl-C: where the run stopped and how ``--resume`` continues it."""
    from .train import Interrupted

    resume = f"continue with: symfast train --resume --out {out} (and the same flags)"
    if not isinstance(exc, Interrupted):
        return f"symfast train: interrupted outside a training phase (every finished phase is checkpointed); {resume}"
    if exc.checkpoint_step is None:
        kept = "no checkpoint of it yet, so --resume redoes it from step 0"
    else:
        kept = f"its checkpoint {exc.checkpoint} holds step {exc.checkpoint_step}"
    return f"symfast train: interrupted in the {exc.desc} phase after step {exc.step} of {exc.steps} ({kept}); {resume}"


def _print_train_metrics(m: dict, args: argparse.Namespace) -> None:
    if args.resume and not any(m["trained_now"].values()):
        print(f"symfast train --resume: the run in {args.out} had finished: nothing was retrained (the results are "
              "recomputed from its checkpoints)")

    def acc(d: dict, prefix: str = "") -> str:
        a = d.get(f"{prefix}val_accuracy")
        b = d.get(f"{prefix}val_byte_accuracy")
        return "" if a is None and b is None else \
            f", accuracy {a:.3f}" if a is not None else f", byte accuracy {b:.3f}"

    procs = f"{m['world_size']} process(es)" + (f", {m['parallel']}" if m["world_size"] > 1 else "")
    alpha = f"alpha {m['alpha']:g}" if m["target_sparsity"] is None else \
        f"target sparsity {m['target_sparsity']:g}, alpha {m['alpha']:g} -> {m['alpha_final']:.3g}"
    print(f"symfast train {m['task']} ({m['structure']}, {alpha}, {m['steps']} steps each arm incl. "
          f"{m['finetune_steps']} masked fine-tune, {procs}, {m['seconds']:.0f} s)")
    kept = "" if m["ranks"] is None else \
        f"rank {sum(r for r, _ in m['ranks'].values())}/{sum(f for _, f in m['ranks'].values())}, "
    print(f"  DCS exported:       {kept}sparsity {m['sparsity']:.3f}, val loss {m['val_loss']:.4f}{acc(m)} "
          f"(before fine-tune {m['val_loss_before_finetune']:.4f}), lr {m['lr']:g}; params {m['params_before']} -> "
          f"{m['params_after']} ({m['nonzero_params_after']} nonzero)")
    if "svd_truncation_val_loss" in m:
        ranks = sum(r for r, _ in m["svd_truncation_ranks"].values())
        print(f"  SVD truncation:     same ranks (sum {ranks}), val loss {m['svd_truncation_val_loss']:.4f}"
              f"{acc(m, 'svd_truncation_')}; params {m['svd_truncation_params_after']}")
    for arm, b in m["baselines"].items():
        same = "same sparsity" if abs(b["sparsity"] - m["sparsity"]) < 5e-3 else \
            f"sparsity {b['sparsity']:.3f}, NOT the DCS model's {m['sparsity']:.3f}"
        print(f"  {arm + ':':<27} {same}, val loss {b['val_loss']:.4f}{acc(b)}, lr {b['lr']:g}")
    if m["dense_val_loss"] is not None:
        print(f"  dense (unpruned):   val loss {m['dense_val_loss']:.4f} (the one-shot arm's model before pruning)")
    if m["inference"] is not None:
        s = m["inference"]
        print(f"  inference: dense {s['dense_ms']:.2f} ms, exported {s['exported_ms']:.2f} ms "
              f"(x{s['speedup']:.2f})")
    print(f"  {args.out}/metrics.json, {args.out}/training.png, {args.out}/exported.pt")


def _cmd_train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .train import TrainConfig, run
    from .train.task import NonFiniteMetrics, ResumeMismatch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    _check_train_flags(args, world)
    if args.out is None:
        args.out = "results/train-sweep" if args.sweep else "results/train"
    device = None
    if world > 1:  # launched by torchrun: DistributedDataParallel, gloo on CPU, nccl on GPU
        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = TrainConfig(task=args.task, structure=args.structure, alpha=args.alpha, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, threshold=args.threshold,
                      width=args.width, depth=args.depth, context=args.context, quick=args.quick,
                      seed=0 if args.seed is None else args.seed, eval_every=args.eval_every,
                      baseline_lr=args.baseline_lr, one_shot_lr=args.one_shot_lr, baselines=args.baselines, lr_grid=args.lr_grid,
                      target_sparsity=args.target_sparsity, clip_grad=args.clip_grad, warmup_steps=args.warmup_steps,
                      embedding_lr_scale=args.embedding_lr_scale)
    if args.sweep:
        return _cmd_train_sweep(cfg, args, device)
    clean = False  # whether the processes may still meet at a barrier before the group is destroyed
    try:
        m = run(cfg, args.out, resume=args.resume, stop_after=args.stop_after, progress=not args.progress_off,
                device=device, parallel=args.parallel or "ddp")
        clean = True
        if rank == 0:
            if "stopped_at" in m:
                print(f"symfast train: stopped after step {m['stopped_at']} of {m['steps']} (checkpoint "
                      f"{m['checkpoint']}); continue with --resume --out {args.out}")
            else:
                _print_train_metrics(m, args)
        return 0
    except ResumeMismatch as exc:
        clean = True
        if rank == 0:
            print(exc, file=sys.stderr)
        return 2
    except NonFiniteMetrics as exc:
        clean = True
        if rank == 0:
            print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if rank == 0:
            print(file=sys.stderr)
            print(_interrupted_line(exc, args.out), file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_initialized():
            # Drain outstanding gloo work first: torch's ProcessGroupGloo
            # teardown can deadlock on the GIL while a worker thread still
            # holds an AsyncWork (seen on torch 2.13 in tests).
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def _cmd_train_sweep(cfg, args: argparse.Namespace, device) -> int:
    from .train.sweep import DEFAULT_TARGETS, sweep
    from .train.task import NonFiniteMetrics

    try:
        cfg.resolved()  # a bad combination fails before the first run
        summary = sweep(cfg, args.out, targets=args.targets or DEFAULT_TARGETS,
                        seeds=args.seeds if args.seeds is not None else [0, 1, 2], progress=not args.progress_off,
                        device=device)
    except NonFiniteMetrics as exc:
        print(exc, file=sys.stderr)
        print(f"symfast train --sweep: the finished runs in {args.out} are kept; rerunning the same command reuses "
              "them", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsymfast train --sweep: interrupted; rerunning the same command reuses the finished runs in "
              f"{args.out} and resumes the interrupted one", file=sys.stderr, flush=True)
        return 130
    print(_sweep_table(summary))
    print(f"  {args.out}/pareto.json, {args.out}/pareto.png")
    return 0


def _sweep_table(summary: dict) -> str:
    """The sweep's result as text: per target, each arm's mean sparsity, val loss (and accuracy) +- the standard
    deviation over seeds, and the paired DCS - baseline val-loss difference."""
    def pm(d: dict, fmt: str) -> str:
        return f"{d['mean']:{fmt}}" + ("" if d["std"] is None else f" ± {d['std']:{fmt.lstrip('+')}}")

    seeds = summary["seeds"]
    lines = [f"symfast train --sweep {summary['task']} ({summary['structure']}): {len(seeds)} seed(s) "
             f"{','.join(map(str, seeds))}; mean ± standard deviation over seeds"]
    for t in (f"{t:g}" for t in summary["targets"]):
        lines.append(f"  target {t}:")
        for arm in summary["arms_order"]:
            a = summary["arms"][arm][t]
            acc = next((pm(a[k], ".3f") for k in ("val_accuracy", "val_byte_accuracy") if k in a), None)
            line = f"    {arm + ':':<27} sparsity {pm(a['sparsity'], '.3f')}, val loss {pm(a['val_loss'], '.4f')}" + (
                "" if acc is None else f", accuracy {acc}")
            if arm != "dcs":
                d = summary["paired"][arm][t]["val_loss"]
                line += f"; DCS - it {pm(d, '+.4f')} (DCS better in {d['dcs_better']}/{d['n']})"
            lines.append(line)
    missed = [f"{t:g} ({summary['arms']['dcs'][f'{t:g}']['sparsity']['mean']:.3f})" for t in summary["targets"]
              if abs(summary["arms"]["dcs"][f"{t:g}"]["sparsity"]["mean"] - t) > 0.05]
    if missed:
        lines.append(f"  note: DCS ended more than 0.05 from the target at {', '.join(missed)}; the alpha controller "
                     "keeps alpha between 1% and 10x --alpha, so a target below the sparsity that 1% of --alpha "
                     "reaches is missed from above, and one beyond what 10x reaches from below (scale --alpha)")
    return "\n".join(lines)


def _train_defaults_text(key: str) -> str:
    """``lm A, digits B; --quick: lm C, digits D`` for one setting of :func:`symfast.train.task.defaults`."""
    from .train.task import TASKS, defaults

    def per(quick: bool) -> str:
        vals = {t: defaults(t, "elementwise", quick=quick)[key] for t in TASKS}
        vals = {t: v for t, v in vals.items() if v is not None}
        if len(vals) > 1 and len(set(vals.values())) == 1:
            return f"{next(iter(vals.values())):g}"  # the same for every task
        return ", ".join(f"{t} {v:g}" for t, v in vals.items())

    full, quick = per(False), per(True)
    return f"default: {full}" + ("" if quick == full else f"; with --quick: {quick}")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="sparse training of a real model (lm | digits) against same-budget magnitude-pruning baselines",
        description="Convert the task's model to DCS layers, train it on loss + penalty, export it (threshold) and "
        "fine-tune it with its mask for the last 10% of the budget. In the same run, the baselines with the same "
        "total steps, from the same initialization, at the DCS model's sparsity: one-shot global magnitude pruning "
        "of the dense model, gradual magnitude pruning (Zhu & Gupta's cubic schedule) with a global and with a "
        "per-layer-uniform threshold, and gradual magnitude pruning of the unpenalized w*u (each with the same "
        "masked fine-tune). Writes OUT/metrics.json, OUT/training.png, OUT/exported.pt and OUT/checkpoints/. "
        "For --structure lowrank it also fine-tunes the dense model truncated by SVD to the DCS model's ranks. "
        "Under torchrun (torchrun --nproc_per_node N -m symfast train ...) it runs DistributedDataParallel, or "
        "FSDP2 with --parallel fsdp; --batch-size is the global batch. A run without --resume starts clean: it "
        "removes an earlier run's checkpoints and outputs from OUT. To run it from Python in a child process, "
        "start the child with spawn: a process forked after torch ran ops on several threads can hang in GNU "
        "OpenMP (libgomp), as any torch code does; or call torch.set_num_threads(1) before the ops and the fork.",
    )
    p.add_argument("--task", choices=["lm", "digits"], default="lm", help="lm (default): byte transformer on the "
                   "Python standard library's sources; digits: CNN on scikit-learn's digits")
    p.add_argument("--structure", choices=["elementwise", "group", "lowrank"], default="elementwise",
                   help="the DCS structure: elementwise (default; L1-like, single zeros), group (whole units "
                   "die and are removed at export) or lowrank (nuclear-norm-like; compared with truncated SVD)")
    p.add_argument("--alpha", type=_float_from(0, inclusive=True), default=None,
                   help=f"DCS weight decay, >= 0 ({_train_defaults_text('alpha')})")
    p.add_argument("--steps", type=_int_in(2), default=None,
                   help=f"training steps of every arm (DCS and each baseline), including its masked fine-tune "
                   f"(10%%), >= 2 ({_train_defaults_text('steps')})")
    p.add_argument("--batch-size", type=_int_in(1), default=None,
                   help=f"global batch size, >= 1 ({_train_defaults_text('batch_size')})")
    p.add_argument("--lr", type=_float_from(0, inclusive=False), default=None,
                   help=f"DCS's peak learning rate (also the w*u control's), > 0 (warm-up 5%%, cosine decay; "
                   f"{_train_defaults_text('lr')})")
    p.add_argument("--baseline-lr", type=_float_from(0, inclusive=False), default=None,
                   help=f"peak learning rate of the plain-weight GMP baselines (global and per-layer), > 0, and "
                   f"of one-shot unless --one-shot-lr is given ({_train_defaults_text('baseline_lr')})")
    p.add_argument("--one-shot-lr", type=_float_from(0, inclusive=False), default=None,
                   help=f"peak learning rate of the one-shot baseline's dense model, > 0 (default: --baseline-lr "
                   f"when given, else {_train_defaults_text('one_shot_lr').removeprefix('default: ')})")
    p.add_argument("--lr-grid", type=_float_list, default=None, metavar="LR,LR,...",
                   help="train every arm at each of these learning rates and keep, per arm, the one with the "
                   "lowest final loss on 10%% of the training data held out for it (not the reported val set); "
                   "replaces --lr, --baseline-lr and --one-shot-lr, and multiplies the run's time by their number")
    p.add_argument("--baselines", type=_baseline_list, default=None, metavar="NAMES",
                   help="comma-separated subset of one_shot_magnitude, gradual_magnitude, "
                   "gradual_magnitude_uniform, gradual_magnitude_wu, or 'all' (default) or 'none'")
    p.add_argument("--target-sparsity", type=_open_unit, default=None, metavar="S",
                   help="steer DCS's alpha during training so that its thresholded sparsity follows a cubic ramp "
                   "to S (0 < S < 1); alpha starts at 1%% of --alpha and is at most 10x --alpha; default: a fixed "
                   "--alpha")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (default) or sgd (momentum 0.9); both with the coupled decay that equals the penalty. "
                   "For sgd consider --clip-grad and --warmup-steps")
    p.add_argument("--clip-grad", type=_float_from(0, inclusive=False), default=None, metavar="NORM",
                   help="clip the loss gradient to this global L2 norm, > 0, before every optimizer step of every "
                   "arm (torch.nn.utils.clip_grad_norm_; the decay is added after it); default: no clipping")
    p.add_argument("--warmup-steps", type=_int_in(0), default=None, metavar="N",
                   help="linear lr warm-up steps of every arm's training phase, 0 <= N <= the phase's steps "
                   "(default: 5%% of them); the masked fine-tunes have none")
    p.add_argument("--embedding-lr-scale", type=_float_from(0, inclusive=False), default=None, metavar="K",
                   help="lm only: multiply the lr of the embeddings' parameters by K > 0 in every arm (they start at "
                   "N(0, 1), so the same Adam step moves them relatively less than the Linear weights); default: 1")
    p.add_argument("--threshold", type=_float_from(0, inclusive=True), default=None,
                   help="export threshold, >= 0: factor-product entries (groups, singular values) of size <= it "
                   f"become exact zeros ({_train_defaults_text('threshold')})")
    p.add_argument("--width", type=_int_in(1), default=None,
                   help=f"lm: model width, divisible by 4 (the heads); digits: conv channels "
                   f"({_train_defaults_text('width')})")
    p.add_argument("--depth", type=_int_in(1), default=None,
                   help=f"lm only: number of blocks, >= 1 ({_train_defaults_text('depth')})")
    p.add_argument("--context", type=_int_in(1, CONTEXT_MAX + 1), default=None,
                   help=f"lm only: context length in bytes, 1 to {CONTEXT_MAX} (attention time grows with its "
                   f"square; {_train_defaults_text('context')})")
    p.add_argument("--quick", action="store_true",
                   help="a smaller, shorter run (lm: width 64, context 32, 200 steps; digits: 300 steps) for "
                   "every arm; with all four baselines it trains about 2.4 times the steps of DCS and one baseline")
    p.add_argument("--seed", type=_int_in(0, TRAIN_SEED_LIMIT, "2**44"), default=None,
                   help="random seed of the initialization, the batches and the digits split, 0 <= N < 2**44 "
                   "(default: 0; a sweep takes --seeds)")
    p.add_argument("--eval-every", type=_int_in(1), default=None,
                   help="validate (and checkpoint) every N steps, N >= 1 (default: steps/10)")
    p.add_argument("--out", type=_out_dir, default=None,
                   help="output directory (default: results/train; with --sweep results/train-sweep)")
    p.add_argument("--sweep", action="store_true",
                   help="the Pareto front: one run per target sparsity (--targets) and seed (--seeds), DCS steered "
                   "to the target by the --target-sparsity controller and every baseline at the sparsity DCS "
                   "reached in that run; OUT/target<S>-seed<N>/ hold the runs (a finished run with the same "
                   "settings is reused, an interrupted one resumed), OUT/pareto.json the per-seed values, their "
                   "mean and spread, and the paired DCS - baseline differences, OUT/pareto.png the figure. "
                   "Elementwise or group structure, one process")
    p.add_argument("--targets", type=_unit_list, default=None, metavar="S,S,...",
                   help="--sweep only: target sparsities, distinct, each 0 < S < 1 (default: "
                   "0.5,0.75,0.9,0.95)")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="N|S,S,...",
                   help="--sweep only: N seeds (0..N-1) or a comma-separated list of distinct seeds (one seed: "
                   "'7,'); default: 3")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints (same result as one run). The settings must be those the run "
                   "started with (OUT/checkpoints/config.json; a difference is an error naming it): only "
                   "--eval-every may differ (it changes which steps are validated and checkpointed, not the "
                   "result), and so may --no-progress, --stop-after, --parallel and the number of processes "
                   "(checkpoints hold full states). A phase checkpoint written with other settings is not reused")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                   help="under torchrun: ddp (default, DistributedDataParallel) or fsdp (FSDP2 fully_shard, for "
                   "models that do not fit one device; checkpoints are gathered to full states, written by rank 0 "
                   "in the single-process format). In one process it has no effect (a warning says so)")
    p.add_argument("--stop-after", type=_int_in(1), default=None,
                   help="stop the DCS phase after its step N, N >= 1, checkpointed, as an interruption would; then "
                   "--resume. N counts from the run's start: resumed at a later step, it stops after one more step")
    p.add_argument("--no-progress", dest="progress_off", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_train, train_parser=p)


_COMMANDS: list[Callable] = [_add_demo, _add_repro, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symfast", description="symfast: structured constraints from symmetry.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside what a command reports itself (train says where it stopped)
        print(f"\nsymfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
