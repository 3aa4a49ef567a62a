"""What every benchmark measures the same way: run statistics and peak memory per case.

- :func:`stats`: min / median / max over a case's timed runs (the JSON keeps every run too).
- :class:`PeakMemory`: the peak resident memory of this process *during one case* (Linux: the
  kernel's high-water mark ``VmHWM``, reset before the case through ``/proc/self/clear_refs``) and,
  on CUDA, the peak allocated VRAM (``torch.cuda.max_memory_allocated``, reset before the case).
  Where the reset is not possible (not Linux, no permission) the process-wide peak so far is
  reported and ``scope`` says so.
"""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

_CLEAR_REFS = Path("/proc/self/clear_refs")


def stats(runs: Iterable[float], unit: str = "s") -> dict[str, Any]:
    """``{"runs_s": [...], "min_s", "median_s", "max_s"}`` (keys end in ``_{unit}``)."""
    vals = [float(v) for v in runs]
    if not vals:
        raise ValueError("no runs to summarise")
    return {f"runs_{unit}": vals, f"min_{unit}": min(vals), f"median_{unit}": statistics.median(vals),
            f"max_{unit}": max(vals)}


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A ``/proc/PID/status`` figure in KiB (``VmHWM``, ``VmRSS``), or None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (or since the last reset), MiB."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def current_rss_mib() -> float | None:
    kib = status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark to the current RSS (Linux >= 4.0). Returns
    whether it worked."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak RSS (and CUDA VRAM) while the block runs. Accumulates over several
    ``with`` blocks (a case's repeats): :attr:`peak_rss_mib` is the largest seen.

    ``peak_rss_mib`` includes everything resident (the models loaded before the case, the heap the
    allocator kept); ``rise_rss_mib`` is how far the peak rose above the RSS at the block's start,
    i.e. what the case itself needed on top.
    """

    def __init__(self, device: Any = None):
        self.device = device
        self.peak_rss_mib = 0.0
        self.rise_rss_mib = 0.0
        self.peak_vram_mib: float | None = None
        self.scope = "case"
        self._start = 0.0

    def _cuda(self) -> Any:
        dev = self.device
        if dev is None or getattr(dev, "type", str(dev).split(":")[0]) != "cuda":
            return None
        torch = sys.modules.get("torch")
        return torch if torch is not None and torch.cuda.is_available() else None

    def __enter__(self) -> "PeakMemory":
        if not reset_peak_rss():
            self.scope = "process (the high-water mark could not be reset)"
        self._start = current_rss_mib() or 0.0
        torch = self._cuda()
        if torch is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = process_peak_rss_mib()
        self.peak_rss_mib = max(self.peak_rss_mib, peak)
        self.rise_rss_mib = max(self.rise_rss_mib, peak - self._start)
        torch = self._cuda()
        if torch is not None:
            torch.cuda.synchronize(self.device)
            vram = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            self.peak_vram_mib = max(self.peak_vram_mib or 0.0, vram)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_rss_mib": round(self.peak_rss_mib, 1),
                               "rise_rss_mib": round(self.rise_rss_mib, 1), "memory_scope": self.scope}
        if self.peak_vram_mib is not None:
            out["peak_vram_mib"] = round(self.peak_vram_mib, 1)
        return out


class Rounds:
    """Timed runs of several cases, interleaved round by round (A, B, A, B, ...) so that a machine
    slowing down affects every case alike.

    ``run(case, warmup)`` runs one case once and returns ``(seconds, details)``. Each case in
    ``warm`` gets one untimed warm-up first, in ``cases`` order. ``slow`` names the expensive case
    (a baseline): if its warm-up took more than ``slow_s`` seconds (0: always), that run is counted
    and the case is not repeated, since its models are warm from the other cases by then. Then
    ``repeats`` rounds. :attr:`times` / :attr:`details` hold the counted runs per case and
    :attr:`warmups` the warm-up details; :attr:`note` says how the slow case was run."""

    def __init__(self, cases: Any, run: Any, *, repeats: int, warm: Any = None, slow: str | None = None,
                 slow_s: float = 60.0, say: Any = None):
        say = say or (lambda _m: None)
        self.times: dict[str, list[float]] = {c: [] for c in cases}
        self.details: dict[str, list[Any]] = {c: [] for c in cases}
        self.warmups: dict[str, Any] = {}
        warm = list(cases) if warm is None else [c for c in cases if c in set(warm)]
        single = False
        if warm:
            say("warm-up round (not counted)")
        for c in warm:
            dt, out = run(c, True)
            self.warmups[c] = out
            if c == slow and dt > slow_s:
                single = True
                self.times[c].append(dt)
                self.details[c].append(out)
        if slow is None:
            self.note = f"median of {repeats} run(s)" + (" after a warm-up" if warm else "")
        elif single:
            why = "quick mode" if slow_s <= 0 else f"its first run took {self.times[slow][0]:.1f} s (> {slow_s:.0f} s)"
            self.note = (f"{slow} ran once ({why}); its models were already warm from the other cases, so that run "
                         "is counted")
            say("  " + self.note)
        else:
            self.note = f"{slow}: median of {repeats} run(s)" + (" after a warm-up" if slow in warm else "")
        for r in range(repeats):
            say(f"round {r + 1}/{repeats}")
            for c in cases:
                if c == slow and single:
                    continue
                dt, out = run(c, False)
                self.times[c].append(dt)
                self.details[c].append(out)


def run_with_models(tiny: bool, roles: list[str], fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` on the full-size random-weight models (the default), or with ``tiny`` on a
    tiny model set of ``roles`` built in a temporary folder (``fn(tiny_dir=..., **kwargs)``);
    ``kwargs["log"]``, when given, hears about the build."""
    if not tiny:
        return fn(**kwargs)
    import tempfile

    from pipeline.models.tiny import make_tiny_set

    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as d:
        if kwargs.get("log") is not None:
            kwargs["log"](f"building the tiny model set ({', '.join(roles)}) ...")
        make_tiny_set(d, roles=roles)
        return fn(tiny_dir=d, **kwargs)


def tiny_registry(tiny_dir: str | Path, device: str, roles: Sequence[str]) -> Any:
    """A :class:`~pipeline.models.registry.ModelRegistry` over a tiny set written by
    :func:`pipeline.models.tiny.make_tiny_set` (smoke runs, tests) on ``device``, with ``roles`` loaded
    before any timing."""
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import load_settings

    settings = load_settings(Path(tiny_dir) / "settings.yaml")
    settings.runtime.device = device
    registry = ModelRegistry(settings)
    for role in roles:
        registry.get(role)
    return registry
