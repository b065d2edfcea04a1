"""`m2a-triton`: an `m2a-export` folder -> a Triton Inference Server model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m2anet.cli.args import interruptible, make_parser, non_negative_int, output_dir, positive_int
from m2anet.triton import PRECISION_MODE, write_repository


def parser() -> argparse.ArgumentParser:
    ap = make_parser("m2a-triton", __doc__)
    ap.add_argument("folder", type=Path, help="artifact folder written by m2a-export (holds manifest.json)")
    ap.add_argument(
        "--out",
        type=output_dir,
        required=True,
        help="model repository to write (Triton's --model-repository)",
    )
    ap.add_argument("--precision", default="fp16", choices=list(PRECISION_MODE))
    ap.add_argument("--format", dest="fmt", default="auto", choices=["auto", "plan", "onnx"])
    ap.add_argument("--name", default="m2anet", help="model name in the repository")
    ap.add_argument(
        "--queue-delay-us", type=non_negative_int, default=100, help="dynamic batcher max queue delay"
    )
    ap.add_argument("--instances", type=positive_int, default=1, help="model instances per GPU")
    ap.add_argument("--allow-parity-fail", action="store_true")
    ap.add_argument(
        "--engine-cache",
        help="ONNX form: where the server may cache ONNX Runtime's TensorRT engines "
        "(default /models/NAME/ort-trt-cache, the repository mounted at /models)",
    )
    return ap


@interruptible("m2a-triton")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        model_dir = write_repository(
            args.folder,
            args.out,
            precision=args.precision,
            fmt=args.fmt,
            name=args.name,
            queue_delay_us=args.queue_delay_us,
            instances=args.instances,
            allow_parity_fail=args.allow_parity_fail,
            engine_cache=args.engine_cache,
        )
    except (ValueError, OSError) as e:  # ArtifactError is a ValueError
        print(f"m2a-triton: error: {e}", file=sys.stderr)
        return 2
    print(f"model repository: {model_dir.parent} (model {args.name!r}; see docs/embedding.md to serve it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
