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


def _front(text: str) -> str:
    from bench.detect import select_front_cases

    try:
        select_front_cases(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _images(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


DEFAULT_OUT = Path("bench-results")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run all benchmarks, or just NAME, side by side with their baselines; print tables and write "
                    "OUT/results.json (every figure, machine, packages) and OUT/results.md (the tables).")
    ap.add_argument("name", nargs="?", choices=[*BENCHMARKS, "all"], default="all", help="benchmark (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="smaller inputs, one timed run per case, the slowest baselines run once (under 5 minutes "
                         "on a 2-core CPU); full-size models, so the ratios stay real")
    ap.add_argument("--repeats", type=_repeats, default=None,
                    help="timed runs per case after one warm-up (default 3; 1 with --quick)")
    ap.add_argument("--size", type=_size, default=None, metavar="WxH",
                    help="image size (default per benchmark: detect 1024x768, enhance 1024x1024, smaller with "
                         "--quick or --tiny; large: the large photo, 8000x6000)")
    ap.add_argument("--images", type=_images, default=None, metavar="N",
                    help="images per kind for warm (default 4 product and 40 no-product images; 2 and 12 with "
                         "--quick) and for daemon (default 200; 100 with --quick)")
    ap.add_argument("--points-per-side", type=_repeats, default=None, metavar="N",
                    help="detect: the baseline's SAM-everything grid (default 32, the seed's 32x32 = 1,024 prompts; "
                         "fewer understate the baseline, which the report says)")
    ap.add_argument("--front", type=_front, default=None, metavar="CASES",
                    help="detect: only these front-end / segmenter cases, comma-separated as the table names them "
                         "(e.g. guided+edgetam,guided+sam2.1-tiny; 'none' for none; default: all)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                    help="ops: runtime.dtype of the models (default auto: the product's choice, bf16 diffusion "
                         "models on a CPU with native bf16, fp16 on CUDA)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                    help=f"where results.json and results.md go (default {DEFAULT_OUT}/)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON report to PATH")
    ap.add_argument("--docs", nargs="?", const="", default=None, metavar="SECTION",
                    help="also replace the generated table in docs/performance.md (with SECTION: that section's "
                         "block, e.g. --docs gpu)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random-weight models instead of full size (a fast smoke run; ratios mean nothing)")
    ap.add_argument("--stock-malloc", action="store_true",
                    help="glibc's default allocator instead of the product's setting (runtime.keep_freed_memory; "
                         "slower and noisier on VMs, see pipeline/models/allocator.py)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parser().parse_args(argv)
    # Benchmarks build their models in-process; nothing may be fetched from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steady_malloc(enabled=not opts.stock_malloc)
    from bench.detect import BenchError
    from bench.report import build_report, update_docs, write_outputs

    names = list(BENCHMARKS) if opts.name == "all" else [opts.name]
    results = {}
    for name in names:
        module, func = BENCHMARKS[name].split(":")
        try:
            results[name] = getattr(importlib.import_module(module), func)(opts)
        except BenchError as e:
            print(f"bench {name}: {e}", file=sys.stderr)
            return 2
    mode = "tiny" if opts.tiny else "quick" if opts.quick else "full"
    report = build_report(results, mode=mode, argv=argv)
    j, m = write_outputs(report, opts.out)
    print(f"results written to {j} and {m}", file=sys.stderr)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results written to {opts.json}", file=sys.stderr)
    if opts.docs is not None:
        try:
            print(f"updated {update_docs(report, DOCS, opts.docs or None)}", file=sys.stderr)
        except (OSError, ValueError) as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
