#!/usr/bin/env bash
# What a GPU machine without network needs to run bench/ (and the GPU tests), built where there is
# network, into one folder to copy there with the checkout:
#
#   bash bench/offline_carry.sh [COMFYUI_TREE] [PYTHON_VERSION]     # -> .carry/ (about 50 MB)
#   # on the GPU machine, from the checkout's root (torch, numpy, transformers already there):
#   source .carry/env.sh && python bench/run_all.py --only qwen_step
#
# .carry/ holds:
# - wheels/: ComfyUI's requirements and pytest as wheels for that Python, installed on the GPU machine
#   only where the module is missing (so the machine's own torch stack stays);
# - ComfyUI/: the ComfyUI tree without its tests, git history, models and custom nodes (COMFYUI_TREE,
#   default COMFYUI_PATH, else ../shared/ComfyUI, else ../ComfyUI);
# - site/: comfy-kitchen without its compiled CUDA and HIP backends (235 MB; it falls back to its
#   Triton and torch ones, for native models and ours alike: say so beside any figure measured this
#   way), and an import-only stand-in for PyAV (a 35 MB wheel), which ComfyUI imports for its video
#   nodes only; no benchmark runs them;
# - env.sh: installs the missing wheels, sets PYTHONPATH and COMFYUI_PATH, and defines
#   ``run_for SECONDS CMD...``, which stops the command and everything it started at the limit (a
#   benchmark cut short keeps what it printed).
set -euo pipefail
cd "$(dirname "$0")/.."
tree="${1:-${COMFYUI_PATH:-}}"
for candidate in ../shared/ComfyUI ../ComfyUI; do
  if [[ -z "$tree" && -f "$candidate/main.py" ]]; then tree="$candidate"; fi
done
[[ -f "$tree/main.py" ]] || { echo "no ComfyUI tree (give its path)" >&2; exit 1; }
py="${2:-3.12}"
out=.carry
rm -rf "$out" && mkdir -p "$out/wheels" "$out/site"

platforms=()
for p in manylinux_2_17 manylinux_2_24 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# ComfyUI's requirements that a CUDA machine with torch does not have, and this package's own; its two
# own packages at the versions the tree pins.
pinned=()
for package in comfy-aimdo comfy-kitchen; do
  line=$(grep -E "^$package" "$tree/requirements.txt" || true)
  [[ -n "$line" ]] || { echo "$tree/requirements.txt names no $package" >&2; exit 1; }
  pinned+=("$line")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" "${platforms[@]}" --platform any \
  -d "$out/wheels" torchsde trampoline einops aiohttp yarl multidict propcache frozenlist aiosignal \
  aiohappyeyeballs attrs alembic SQLAlchemy Mako greenlet simpleeval blake3 gguf kornia kornia_rs spandrel \
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv pytest pluggy \
  iniconfig "${pinned[@]}"

kitchen=("$out"/wheels/comfy_kitchen-*.whl)
python3 -m zipfile -e "${kitchen[0]}" "$out/site"
rm "${kitchen[0]}"
find "$out/site/comfy_kitchen" -name '_C*.so' -delete

mkdir -p "$out/site/av/subtitles" "$out/site/av/video"
cat > "$out/site/av/__init__.py" <<'EOF'
"""Import-only stand-in for PyAV (bench/offline_carry.sh): every name is a class that does nothing."""


class _Meta(type):
    def __getattr__(cls, name):
        return _Any


class _Any(Exception, metaclass=_Meta):
    def __init__(self, *args, **kwargs):
        pass


def __getattr__(name):
    return _Any
EOF
for module in container error codec audio logging subtitles/__init__ subtitles/stream video/__init__ \
              video/reformatter video/frame; do
  printf 'from av import _Any\n\n\ndef __getattr__(name):\n    return _Any\n' > "$out/site/av/$module.py"
done

# Without its tests, history, user data, model files and custom nodes (this checkout may be one).
mkdir -p "$out/ComfyUI"
tar -C "$tree" -cf - --exclude=./tests --exclude=./tests-unit --exclude=./.git --exclude=./user \
    --exclude=./output --exclude=./input --exclude=./temp --exclude='./models/*/*' \
    --exclude='./custom_nodes/*' --exclude=__pycache__ . | tar -C "$out/ComfyUI" -xf -
chmod -R u+w "$out/ComfyUI"

cat > "$out/env.sh" <<'EOF'
# Sourced on the GPU machine from the checkout's root (see bench/offline_carry.sh).
carry="$PWD/.carry"
mkdir -p /tmp/carry-site
missing=()
for wheel in "$carry"/wheels/*.whl; do
  module=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z')
  case $module in python_dotenv) module=dotenv;; esac
  python -c "import $module" 2>/dev/null || missing+=("$wheel")
done
if (( ${#missing[@]} )); then
  python -m pip install -q --no-deps --no-index --target /tmp/carry-site "${missing[@]}"
fi
export PYTHONPATH="/tmp/carry-site:$carry/site${PYTHONPATH:+:$PYTHONPATH}"
export COMFYUI_PATH="$carry/ComfyUI" PYTHONUNBUFFERED=1
run_for() {  # run_for SECONDS CMD...: timeout(1) signals the command's whole process group
  local limit=$1; shift
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "[run_for] $* -> exit $rc$( ((rc == 124)) && echo ' (time limit)')"
  return "$rc"
}
EOF
du -sh "$out"
