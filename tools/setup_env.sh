#!/usr/bin/env bash
# Idempotent environment set-up for resnext_det (called by `make setup`).
#
# Creates .venv/ (Python 3.11) in the repo root and installs torch, torchvision,
# detectron2, its run-time dependencies and this package in editable mode.
#
# detectron2 is not on PyPI under its own name. Two routes:
#   1. You already have detectron2 (built from source) importable by $PYTHON:
#      the venv is created with --system-site-packages and your detectron2 and
#      torch are kept, never replaced.
#   2. Otherwise: torch==2.14.1 / torchvision==0.29.1, then the PyPI wheel
#      sal-detectron2==0.7.2 (upstream detectron2's Python code, April 2024),
#      of which only the `detectron2/` package and its dist-info are kept (the
#      wheel also ships a top-level `tools` package that would shadow ours).
#
# Every step checks first whether its work is already done, so a second run
# takes a few seconds. A run killed half way is resumed by running it again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
D2_WHEEL="sal-detectron2==0.7.2"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
command -v "$PYTHON" >/dev/null 2>&1 || die "no python3.11 found; install Python 3.11 or run 'make setup PYTHON=/path/to/python3.11'"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 9) else 1)' \
  || die "$PYTHON is older than Python 3.9; run 'make setup PYTHON=/path/to/python3.11'"

# Route 1: a detectron2 the user already has.
HOST_HAS_D2=0
if "$PYTHON" -c 'import detectron2' >/dev/null 2>&1; then
  HOST_HAS_D2=1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$HOST_HAS_D2" = 1 ]; then
    log "found an existing detectron2 for $PYTHON: creating $VENV with --system-site-packages to keep it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

have() { PYTHONWARNINGS=ignore "$PY" -c "import $1" >/dev/null 2>&1; }

if ! have torch || ! have torchvision; then
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (several GB; pip takes them from this machine's disk where they lie there)"
  "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
else
  log "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: kept"
fi

# Run-time dependencies of detectron2 and of this project (requirements.txt).
# Re-installed whenever requirements.txt changes (its hash is kept in the venv).
REQ_HASH="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$REQ_HASH" ]; then
  log "installing the run-time dependencies of requirements.txt"
  "${PIP[@]}" install -r "$ROOT/requirements.txt"
  echo "$REQ_HASH" > "$VENV/.requirements.sha256.tmp" && mv "$VENV/.requirements.sha256.tmp" "$VENV/.requirements.sha256"
else
  log "requirements.txt unchanged since the last install: skipped"
fi

if have detectron2; then
  log "detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)') already importable: kept"
else
  log "installing detectron2 from the PyPI wheel $D2_WHEEL (pure-Python part only)"
  SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  "${PIP[@]}" install --no-deps --only-binary=:all: --python-version 3.10 --target "$TMP" "$D2_WHEEL"
  [ -d "$TMP/detectron2" ] || die "the $D2_WHEEL wheel has no detectron2/ package"
  # Copy next to site-packages, then rename: a killed run never leaves half a package.
  rm -rf "$SITE/detectron2.partial" "$SITE"/sal_detectron2-*.dist-info
  cp -r "$TMP/detectron2" "$SITE/detectron2.partial"
  cp -r "$TMP"/sal_detectron2-*.dist-info "$SITE/"
  mv "$SITE/detectron2.partial" "$SITE/detectron2"
fi

if ! "$PY" -c 'import importlib.metadata as m; m.distribution("resnext_det")' >/dev/null 2>&1; then
  log "installing resnext_det in editable mode"
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
fi

PYTHONWARNINGS=ignore "$PY" - <<'PY'
import torch, detectron2, resnext_det
print(f"[setup] ready: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, "
      f"detectron2 {detectron2.__version__}, resnext_det {resnext_det.__version__}")
PY
