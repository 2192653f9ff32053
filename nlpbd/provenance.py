"""Per-stage wall time and peak memory (protocol.md §8), and the provenance of a record."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from nlpbd import __version__, progress
from nlpbd.cache import Artifact

PACKAGES = ("torch", "transformers", "peft", "datasets", "numpy", "pandas")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageTiming:
    seconds: float = 0.0
    cached: bool | None = None
    original_seconds: float | None = None
    peak_gpu_mb: float | None = None

    def cached_from(self, artifact: Artifact) -> None:
        self.cached = artifact.cached
        if artifact.cached:
            self.original_seconds = artifact.meta.get("seconds")


@dataclass
class StageClock:
    device: torch.device
    stages: dict[str, StageTiming] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str, accumulate: bool = False) -> Iterator[StageHandle]:
        timing = self.stages.get(name) if accumulate else None
        timing = timing or StageTiming()
        self.stages[name] = timing
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if not accumulate or name not in self.stages or not self.stages[name].seconds:
            progress.stage(name)
        start = time.perf_counter()
        try:
            yield StageHandle(timing)
        finally:
            timing.seconds += time.perf_counter() - start
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                timing.peak_gpu_mb = max(timing.peak_gpu_mb or 0.0, peak)

    def timings(self) -> dict:
        out: dict = {name: {k: v for k, v in vars(t).items() if k != "peak_gpu_mb"} for name, t in self.stages.items()}
        out["total_seconds"] = time.perf_counter() - self.started
        return out

    def memory(self) -> dict:
        return {"peak_rss_mb": round(peak_rss_mb(), 1),
                "peak_gpu_mb": {name: t.peak_gpu_mb for name, t in self.stages.items()}}


@dataclass
class StageHandle:
    timing: StageTiming

    def cached(self, artifact: Artifact) -> None:
        self.timing.cached_from(artifact)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"nlpbd": __version__, "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


RECORD_HOST = "NLPBD_RECORD_HOST"  # set to 1 to write the machine's host name into records


def provenance(device: torch.device) -> dict:
    """What produced a record. The host name is opt-in: committed and shared records should not carry it."""
    from nlpbd.training import training_precision, use_bf16

    host = {"hostname": socket.gethostname()} if os.environ.get(RECORD_HOST) == "1" else {}
    return {**package_versions(), "device": device.type, "device_name": device_name(device),
            "bf16": use_bf16(device), "training_precision": training_precision(device),
            "torch_threads": torch.get_num_threads(), "git_rev": git_revision(),
            **host, "platform": platform.platform(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
