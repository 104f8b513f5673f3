"""Command line: ``python -m sparge demo [--plot out.png]``, ``python -m sparge calibrate-demo [--out DIR]``
and ``python -m sparge info``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparge", description="sparge: training-free block-sparse attention")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="predict + sparse attention on a built-in video-like example")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when sparge runs there)")
    demo.add_argument("--plot", default=None, metavar="PNG", help="save one head's block mask and density per head")
    demo.add_argument("--frames", type=int, default=None, help="T of the T x S x S grid (default 8 CPU, 32 GPU)")
    demo.add_argument("--size", type=int, default=None, help="S of the T x S x S grid (default 24)")
    demo.add_argument("--heads", type=int, default=8)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--cdf-threshold", type=float, default=0.95)
    demo.add_argument("--sim-threshold", type=float, default=0.15)
    demo.add_argument("--repeats", type=int, default=5)
    cal = sub.add_parser("calibrate-demo", help="calibrate a small video-attention model; write config + plots")
    cal.add_argument("--out", default="sparge_calibration", help="output folder (config JSON and PNGs)")
    cal.add_argument("--device", default=None, help="cpu or cuda (default: cuda when sparge runs there)")
    cal.add_argument("--layers", type=int, default=4)
    cal.add_argument("--heads", type=int, default=4)
    cal.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), metavar=("T", "H", "W"))
    cal.add_argument("--target", type=float, default=0.05, help="error bound per head (default 0.05)")
    cal.add_argument("--metric", default="l1", choices=("l1", "rmse", "cosine"))
    sub.add_parser("info", help="print the build and device support")
    args = parser.parse_args(argv)

    if (args.command == "demo" and args.plot) or args.command == "calibrate-demo":
        from .viz import matplotlib_missing

        missing = matplotlib_missing(f"sparge {args.command}" + (" --plot" if args.command == "demo" else ""))
        if missing:  # one line, before any work
            print(missing, file=sys.stderr)
            return 1

    if args.command == "demo":
        from .demo import run_demo

        run_demo(device=args.device, plot=args.plot, T=args.frames, size=args.size, heads=args.heads,
                 head_dim=args.head_dim, cdf_threshold=args.cdf_threshold, sim_threshold=args.sim_threshold,
                 repeats=args.repeats)
        return 0

    if args.command == "calibrate-demo":
        from .demo import run_calibrate_demo

        run_calibrate_demo(args.out, device=args.device, layers=args.layers, heads=args.heads, grid=tuple(args.grid),
                           target=args.target, metric=args.metric)
        return 0

    import torch

    from . import __version__, _lib

    print(f"sparge {__version__} (C library {_lib._C.version()}, ABI {_lib._C.abi_version()})")
    print(f"  compiled module: {_lib.EXTENSION_PATH} ({_lib.EXTENSION_ORIGIN})")
    print(f"  CUDA backend compiled: {_lib.cuda_compiled()}")
    print(f"  cpu: {_lib.device_reason('cpu', 0) or 'supported'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}: {_lib.device_reason('cuda', i) or 'supported'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
