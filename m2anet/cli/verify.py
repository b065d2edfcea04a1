"""`m2a-verify`: is a deployed artifact clinically equivalent to the PyTorch FP32 reference?

Exit 0 on pass, 1 on fail (failing criteria first), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from m2anet.cli.args import (
    int_at_least,
    interruptible,
    make_parser,
    non_negative_int,
    output_dir,
    positive_int,
    probability,
)
from m2anet.data import SPLITS
from m2anet.engines.spec import SPEC_HELP
from m2anet.model import list_models
from m2anet.parity import TIERS
from m2anet.verify import VerifyOptions, render_text, verify, write_report


def parser() -> argparse.ArgumentParser:
    ap = make_parser("m2a-verify", __doc__)
    ap.add_argument("backend", metavar="BACKEND_SPEC", help=SPEC_HELP)
    ap.add_argument("--reference", default="torch:cpu")
    ap.add_argument(
        "--model", choices=list_models(), help="for torch specs (default m2anet_base); artifacts know theirs"
    )
    ap.add_argument("--heads", choices=["both", "cls"], help="for torch specs (default both)")
    ap.add_argument("--split", default="test", choices=list(SPLITS))
    ap.add_argument(
        "--n",
        type=int_at_least(2),
        default=None,
        help="first N nodes of the split (default: all; AUC needs 2)",
    )
    ap.add_argument("--tier", default="auto", choices=["auto", *TIERS])
    ap.add_argument("--threshold", type=probability, default=None)
    ap.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed")
    ap.add_argument("--no-stress", dest="stress", action="store_false")
    ap.add_argument(
        "--stress-batch", type=positive_int, default=None, help="default: the profile's max batch"
    )
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    ap.add_argument(
        "--report", type=output_dir, default=None, help="write verify.json/.md/.png here (a folder)"
    )
    ap.add_argument("--diagnose", action="store_true", help="INT8: find the layers to keep in FP32")
    return ap


@interruptible("m2a-verify")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = VerifyOptions(**{f.name: getattr(args, f.name) for f in fields(VerifyOptions)})
    try:
        result = verify(options)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        print(f"m2a-verify: error: {e}", file=sys.stderr)
        return 2
    report = result.report
    if args.report:
        write_report(result, args.report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report))
        if "diagnosis" in report:
            print(report["diagnosis"]["advice"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
