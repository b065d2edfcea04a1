"""How much of the label the synthetic cohort's images carry: visibility of each sign and the ceilings
of issue 14 (label model, radiomics reader, size rule), written to DIR/cohort_study.json and .md.

Renders about 2,500 nodes and simulates 200,000 sign draws with the defaults (minutes on two cores).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from m2anet.cli.args import int_at_least, interruptible, make_parser, non_negative_int, output_dir
from m2anet.cohort_study import study, write_report
from m2anet.data import FRESH_NODES, FRESH_SEED

PROG = "python -m m2anet.cli.cohort_study"


def parser() -> argparse.ArgumentParser:
    ap = make_parser(PROG, __doc__)
    ap.add_argument("--out", type=output_dir, required=True, help="folder for cohort_study.json/.md")
    ap.add_argument(
        "--nodes",
        type=int_at_least(20),
        default=1000,
        help="train nodes the radiomics reader is fitted on (the split's first N)",
    )
    ap.add_argument(
        "--seed", type=non_negative_int, default=14_014, help="seed of the label-model simulation"
    )
    ap.add_argument("--sim-nodes", type=int_at_least(1000), default=200_000, help="simulated sign draws")
    ap.add_argument("--fresh-seed", type=non_negative_int, default=FRESH_SEED)
    ap.add_argument("--fresh-nodes", type=int_at_least(20), default=FRESH_NODES)
    ap.add_argument("--val-nodes", type=int_at_least(20), default=None, help="default: the whole split")
    ap.add_argument("--test-nodes", type=int_at_least(20), default=None, help="default: the whole split")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


@interruptible(PROG)
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = study(
        train_nodes=args.nodes,
        sim_nodes=args.sim_nodes,
        seed=args.seed,
        fresh_seed=args.fresh_seed,
        fresh_nodes=args.fresh_nodes,
        val_nodes=args.val_nodes,
        test_nodes=args.test_nodes,
        progress=not args.quiet,
    )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([PROG, *(shlex.quote(a) for a in given if a != "--quiet")])
    paths = write_report(Path(args.out), report, command)
    flagged = [row["sign"] for row in report["visibility"]["signs"] if row["flagged"]]
    print(f"signs the image does not carry (logit SD >= 1, |r| < 0.6): {', '.join(flagged) or 'none'}")
    print(f"-> {paths['json']}, {paths['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
