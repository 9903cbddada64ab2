"""C++ kernels for the CPU hot path, compiled on first use for the CPU at hand and loaded with ctypes.

`-march=native` lets the compiler use what this CPU has (AVX-512, AVX2, ...), so the library is
compiled where it runs and cached under a key made of the source, the compiler and the CPU's flags:
a cache shared between machines never hands one CPU another's instructions. No compiler, or a failed
compile, leaves `library()` returning None and callers on their torch paths. ctypes releases the GIL
for the duration of a call.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "grok-serve" / "native"


def _compile(name: str) -> Path | None:
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found: %s stays on its torch path", name)
        return None
    source = (SOURCES / f"{name}.cpp").read_bytes()
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:20]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside the target and renamed into place: processes compiling at once never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCES / f"{name}.cpp"), "-o", tmp],
                              check=False, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            log.warning("compiling %s failed, it stays on its torch path:\n%s", name, done.stderr[-2000:])
            return None
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("compiling %s failed (%s), it stays on its torch path", name, exc)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def library(name: str) -> ctypes.CDLL | None:
    """kernels/csrc/<name>.cpp as a loaded library, or None where it cannot be built here."""
    try:
        path = _compile(name)
        return None if path is None else ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("loading %s failed (%s), it stays on its torch path", name, exc)
        return None
