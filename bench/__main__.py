"""``python -m bench [NAME] [options]``: run all benchmarks, or just NAME (e.g. ``detect``)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from bench import BENCHMARKS, steady_malloc


def _size(text: str) -> tuple[int, int]:
    from bench.detect import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _repeats(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench",
                                 description="Run all benchmarks, or just NAME (e.g. detect).")
    ap.add_argument("name", nargs="?", choices=[*BENCHMARKS, "all"], default="all", help="benchmark (default: all)")
    ap.add_argument("--repeats", type=_repeats, default=3, help="timed runs per case after one warm-up (default 3)")
    ap.add_argument("--size", type=_size, default=None, metavar="WxH",
                    help="test image size (default 1024x768; 256x192 with --tiny)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random-weight models instead of full size (a fast smoke run; ratios mean nothing)")
    ap.add_argument("--stock-malloc", action="store_true",
                    help="keep glibc's default allocator (noisier on VMs; see bench.steady_malloc)")
    return ap


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    # Benchmarks build their models in-process; nothing may be fetched from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not opts.stock_malloc:
        steady_malloc()
    from bench.detect import BenchError

    names = list(BENCHMARKS) if opts.name == "all" else [opts.name]
    results = {}
    for name in names:
        module, func = BENCHMARKS[name].split(":")
        try:
            results[name] = getattr(importlib.import_module(module), func)(opts)
        except BenchError as e:
            print(f"bench {name}: {e}", file=sys.stderr)
            return 2
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {opts.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
