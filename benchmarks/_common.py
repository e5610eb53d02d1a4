"""Shared helpers for the benchmark scripts: machine info, peak-RSS sampling, timing, tables.

Only the standard library, torch and (optionally) psutil at import time, so
``benchmarks/gpu.py`` can use it on a machine without the project's pipeline
dependencies.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024


def _rss_now() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Samples this process's resident set size in a thread while a block runs.

    ``start`` is the RSS when the block began, ``peak`` the highest sample
    (every ``interval`` seconds plus once at each end). Without psutil it falls
    back to ``getrusage`` max RSS, which only ever grows in a process, so the
    delta is then a lower bound (0 unless the block set a new high).
    """

    def __init__(self, interval: float = 0.003) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.sampled = _rss_now() is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _maxrss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)

    def _loop(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            rss = proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        if self.sampled:
            self.start = self.peak = _rss_now() or 0
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        else:
            self.start = self.peak = self._maxrss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_now() or 0)
        else:
            self.peak = self._maxrss()

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)


@dataclass
class Measure:
    """One timed run of one method."""

    method: str
    seconds: float
    texts: int = 0
    tokens: int = 0
    peak_rss: int = 0
    rss_delta: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def measured(method: str, sink: list[Measure]) -> Iterator[Measure]:
    """Time a block and sample its peak RSS; the block fills ``texts``/``tokens``/``extra``."""
    m = Measure(method=method, seconds=0.0)
    print(f"  [{time.strftime('%H:%M:%S')}] {method} ...", file=sys.stderr, flush=True)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        yield m
        m.seconds = time.perf_counter() - t0
    m.peak_rss, m.rss_delta = rss.peak, rss.delta
    sink.append(m)


def median_measure(runs: Sequence[Measure]) -> Measure:
    """The run with the median wall time (lower median), peak RSS = max over runs."""
    ordered = sorted(runs, key=lambda m: m.seconds)
    pick = ordered[(len(ordered) - 1) // 2]
    out = Measure(**{**pick.__dict__})
    out.peak_rss = max(m.peak_rss for m in runs)
    out.rss_delta = max(m.rss_delta for m in runs)
    out.extra = dict(pick.extra, runs=len(runs), all_seconds=[round(m.seconds, 3) for m in runs])
    return out


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS and library versions, torch threads, load average."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or "?"
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    for name in ("transformers", "numpy", "safetensors", "tokenizers", "steering_vectors", "repeng", "psutil"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages (repeng also fails on numpy 2 without a shim)
            try:
                from importlib.metadata import version

                info[name] = version(name.replace("_", "-"))
            except Exception:  # noqa: BLE001
                info[name] = None
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) + " |"
              for r in cells[1:]]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return bool(text) and text.replace(".", "", 1).replace(",", "").replace("x", "").replace("-", "", 1) \
        .replace("%", "").isdigit()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
