"""The `preftune` command: parse, build, call. No logic lives here.

Each command is a function in COMMANDS. The ones that train import their module when they run
(preftune/api.py), as do `losses`, `data`, `compare` and `claim`: they bring torch,
transformers or matplotlib, which `preftune --help` should not wait for.
"""

from __future__ import annotations

import argparse
import sys

from preftune import api
from preftune.config import help_text
from preftune.errors import UserError

# the names of preftune/claims.py's CLAIMS, for --help without importing it (a test checks them)
CLAIM_NAMES = ("dpop", "ipo", "beta_dpo")


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """[config.yaml] key=value ... plus the options, as (config path, overrides)."""
    overrides = list(args.overrides)
    config = overrides.pop(0) if overrides and "=" not in overrides[0] else None
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.quiet:
        overrides.append("quiet=true")
    if args.skip_invalid:
        overrides.append("skip_invalid=true")
    return config, overrides


def _run(entry):
    def run(args) -> int:
        entry(*_config_and_overrides(args))
        return 0

    return run


def _losses(args) -> int:
    from preftune.losses import loss_table

    rows = loss_table()
    cols = ["name", "hyper-parameters", "log-probs", "reference", "paper"]
    keys = ["name", "hyperparameters", "reduction", "needs_reference", "paper"]
    table = [
        [str(r[k]) if k != "needs_reference" else ("yes" if r[k] else "no") for k in keys]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


def _data(args) -> int:
    from preftune.data.build import build_arithmetic

    if args.what == "arithmetic":
        build_arithmetic(args.out, onpolicy=not args.no_onpolicy, model=args.model)
        return 0
    if args.what == "rso":
        from preftune.data.build_rso import main as rso_main

        return rso_main(args.overrides)
    raise SystemExit(f"unknown data builder {args.what!r}")


def _compare(args) -> int:
    from preftune.report import compare_runs

    out = compare_runs(args.runs, args.out)
    print(f"[preftune] comparison written to {out}")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="an optional config.yaml, then key=value overrides")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar; the one-line summary only"
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="drop invalid records and report them"
    )


def _claim(args) -> int:
    from preftune.claims import cli

    return cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preftune", description="Tune language models on preference data."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="offline preference training (no arguments: the embedded default job)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML file or key=value):\n" + help_text(),
    )
    _add_run_arguments(t)
    t.set_defaults(func=_run(api.train))

    sub.add_parser(
        "losses", help="list every loss with its paper and hyper-parameters"
    ).set_defaults(func=_losses)

    d = sub.add_parser(
        "data", help="build data sets: arithmetic (the bundled set), rso (rejection-sampled pairs)"
    )
    d.add_argument("what", choices=["arithmetic", "rso"])
    d.add_argument("overrides", nargs="*", help="key=value options (rso)")
    d.add_argument(
        "--out", default=None, help="output folder (default: the package's bundled folder)"
    )
    d.add_argument(
        "--model", default="default", help="model whose greedy mistakes become on-policy rejections"
    )
    d.add_argument("--no-onpolicy", action="store_true", help="only the model-free parts")
    d.set_defaults(func=_data)

    c = sub.add_parser("compare", help="plot several runs' curves side by side")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="compare.html")
    c.set_defaults(func=_compare)

    k = sub.add_parser(
        "claim",
        help="reproduce a paper's claim at controlled settings "
        "(preftune/claims.py): runs, compare.html, result.md",
    )
    k.add_argument("name", metavar="NAME", help=f"one of: {', '.join(CLAIM_NAMES)}")
    k.add_argument("overrides", nargs="*", help="key=value, applied to every run of the claim")
    k.add_argument("--out", default=None, help="output folder (default claims/NAME)")
    k.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    k.add_argument("--small", action="store_true", help="a few steps on a few pairs (a smoke test)")
    k.set_defaults(func=_claim)

    for name, entry, text in (
        ("reward", api.train_reward, "train a Bradley-Terry reward model"),
        ("online", api.train_online, "online DPO, IPO-MD, RSO, ReMax, RLOO, GRPO"),
    ):
        s = sub.add_parser(name, help=text)
        _add_run_arguments(s)
        s.set_defaults(func=_run(entry))
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and key=value overrides in any order (`train lr=1e-5 --quiet beta=0.2`):
    argparse ends a positional list at the first option, so what follows it comes back unknown
    and joins the overrides; anything else unknown is an error as usual."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # an unknown '--key=value' is an override too: build_config strips the dashes
    strays = [a for a in extra if a.startswith("-") and "=" not in a]
    if strays or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "preftune: interrupted; resume with --resume RUN_DIR (from the newest checkpoint)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
