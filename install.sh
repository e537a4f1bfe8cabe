#!/usr/bin/env bash
# One command on a fresh GPU machine: ComfyUI, this package (a git clone, so it can be updated), the
# model files of our presets, then ComfyUI itself. Safe to run again: it resumes and skips what is done.
# From a clone:  bash install.sh [options]
# Piped:         curl -fsSL https://raw.githubusercontent.com/comfyui-qwenimage-gguf/ComfyUI-QwenImage-GGUF/main/install.sh | bash -s -- [options]
set -euo pipefail

# The one place the repository's address is written (README and pyproject.toml are tested against it).
REPO_URL="${QWEN_GGUF_REPO_URL:-https://github.com/comfyui-qwenimage-gguf/ComfyUI-QwenImage-GGUF}"
PACKAGE_DIR_NAME="ComfyUI-QwenImage-GGUF"
WORKSPACE="${HOME}/comfy"
COMFYUI=""
MODELS="qwen-image-2512"
QUANT=""
LISTEN="127.0.0.1"
PORT="8188"
START=1
DRY_RUN=0
VRAM_GB=""
SKIP_GPU_CHECK=0
PYTHON="${PYTHON:-}"
MANIFEST=""
COMFY_ARGS=()
ARGS=("$@")

SCRIPT_DIR=""
if [[ -n "${BASH_SOURCE[0]:-}" && -f "${BASH_SOURCE[0]}" ]]; then
  SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
fi

say() { printf '==> %s\n' "$*"; }
fail() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
run() {
  if (( DRY_RUN )); then printf '[dry-run] %s\n' "$*"; else "$@"; fi
}

usage() {
  cat <<'EOF'
Installs ComfyUI, ComfyUI-QwenImage-GGUF and the model files of its presets, then starts ComfyUI.

  bash install.sh [options] [-- COMFYUI_ARGS...]
  curl -fsSL <raw URL of install.sh> | bash -s -- [options]

Options:
  --workspace DIR   where to install ComfyUI with comfy-cli (default ~/comfy)
  --comfyui DIR     use this existing ComfyUI instead of installing one
  --python PATH     the Python of that ComfyUI (default: DIR/venv, DIR/.venv, else python3)
  --models LIST     model sets, comma separated: qwen-image-2512 (default), qwen-image-edit-2511,
                    z-image-turbo, or all
  --quant Q         diffusion-model quant, e.g. Q4_K_M (default: chosen from the GPU's VRAM). A set
                    without Q gets its file of the same bits (z-image-turbo: Q4_K for Q4_K_M/Q4_K_S);
                    a set with no such file stops the install with what each set offers.
  --vram GB         assume this much VRAM when choosing the quant
  --manifest FILE   model manifest (default: install/models.json of this package)
  --listen ADDR     address ComfyUI listens on (default 127.0.0.1: only this machine; reach it
                    through an SSH tunnel. 0.0.0.0 exposes it to anyone who can reach the machine)
  --port N          port (default 8188)
  --no-start        do not start ComfyUI at the end
  --skip-gpu-check  do not require an NVIDIA driver
  --dry-run         print every step and download without doing it
  -- ARGS...        passed on to ComfyUI's main.py (e.g. -- --lowvram)

The Qwen-Image presets name Q4_K_M files (Z-Image-Turbo its Q4_K); where another quant of the
same model is installed, the loader uses it (and says so). Downloads resume, and are checked for size and sha256 (see README).
Environment: HF_ENDPOINT (a Hugging Face mirror), HF_TOKEN, QWEN_GGUF_REPO_URL (clone from elsewhere).
EOF
}

# An option's value: present, and not the next option (a forgotten value).
value() { [[ -n "${2:-}" && "$2" != --* ]] || fail "$1 needs $3 (see: bash install.sh --help)"; }

while (( $# )); do
  case "$1" in
    --workspace) value "$1" "${2:-}" "a directory"; WORKSPACE="$2"; shift 2 ;;
    --comfyui) value "$1" "${2:-}" "a directory"; COMFYUI="$2"; shift 2 ;;
    --python) value "$1" "${2:-}" "a path"; PYTHON="$2"; shift 2 ;;
    --models) value "$1" "${2:-}" "a list of model sets, or all"; MODELS="$2"; shift 2 ;;
    --quant) value "$1" "${2:-}" "a quant name (e.g. Q4_K_M)"; QUANT="$2"; shift 2 ;;
    --vram) value "$1" "${2:-}" "a number of GB"; VRAM_GB="$2"; shift 2 ;;
    --manifest) value "$1" "${2:-}" "a file"; MANIFEST="$2"; shift 2 ;;
    --listen) value "$1" "${2:-}" "an address"; LISTEN="$2"; shift 2 ;;
    --port) value "$1" "${2:-}" "a number"; PORT="$2"; shift 2 ;;
    --no-start) START=0; shift ;;
    --skip-gpu-check) SKIP_GPU_CHECK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; COMFY_ARGS=("$@"); break ;;
    *) fail "unknown option '$1' (see: bash install.sh --help)" ;;
  esac
done
# Checked before anything is cloned or downloaded (ComfyUI would refuse them only at the end).
if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || (( 10#$PORT < 1 || 10#$PORT > 65535 )); then
  fail "--port needs a number from 1 to 65535, not '$PORT'"
fi
[[ -z "$VRAM_GB" || "$VRAM_GB" =~ ^[0-9]+([.][0-9]+)?$ ]] || fail "--vram needs a number of GB, not '$VRAM_GB'"

# --- piped from curl: get a git clone of the package and run its own installer ---------------------
if [[ -z "$SCRIPT_DIR" || ! -f "$SCRIPT_DIR/loaders/downloads.py" ]]; then
  command -v git >/dev/null 2>&1 || fail "git is needed to fetch the package: install git and rerun"
  if (( DRY_RUN )); then
    src="$(mktemp -d)"
    trap 'rm -rf "$src"' EXIT
  else
    src="$WORKSPACE/src/$PACKAGE_DIR_NAME"
  fi
  if [[ -d "$src/.git" ]]; then
    say "Updating $src"
    git -C "$src" pull -q --ff-only || fail "git pull in $src failed: resolve local changes there and rerun"
  else
    say "Cloning $REPO_URL into $src"
    mkdir -p "$(dirname "$src")"
    git clone -q --depth 1 "$REPO_URL" "$src" || fail "git clone of $REPO_URL failed: check the network and rerun"
  fi
  if (( DRY_RUN )); then
    bash "$src/install.sh" "${ARGS[@]}"
    exit $?
  fi
  exec bash "$src/install.sh" "${ARGS[@]}"
fi

# --- checks ---------------------------------------------------------------------------------------
check_python() {
  local py="$1"
  command -v "$py" >/dev/null 2>&1 || fail "no Python found ('$py'): install Python 3.10 or newer"
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || fail "$("$py" -V 2>&1) is too old: ComfyUI needs Python 3.10 or newer"
}

check_gpu() {
  if (( SKIP_GPU_CHECK )); then
    if command -v nvidia-smi >/dev/null 2>&1; then
      say "GPU check skipped"
    else
      say "GPU check skipped; no NVIDIA driver here: on a machine without a GPU ComfyUI needs --cpu (install.sh ... -- --cpu)"
    fi
    return
  fi
  command -v nvidia-smi >/dev/null 2>&1 \
    || fail "no NVIDIA driver found (nvidia-smi is missing): install the driver, or pass --skip-gpu-check"
  local line
  line="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)" \
    || fail "nvidia-smi failed: the NVIDIA driver is not working (reboot after installing it?)"
  [[ -n "$line" ]] || fail "nvidia-smi lists no GPU: the NVIDIA driver is not working"
  say "GPU: ${line%%,*}, $(( ${line##*, } / 1024 )) GB VRAM"
  [[ -n "$VRAM_GB" ]] || VRAM_GB=$(( ${line##*, } / 1024 ))
}

# --- ComfyUI and this package ---------------------------------------------------------------------
# The Python that will run ComfyUI must hold its environment (torch first): the system python3 beside
# a ComfyUI with a virtual environment elsewhere installs this package's requirements and then fails
# to start.
check_torch() {
  (( DRY_RUN )) && return 0
  "$PYTHON" -c 'import torch' >/dev/null 2>&1 \
    || fail "$PYTHON cannot import torch: it is not the Python ComfyUI in $COMFYUI runs with; pass that environment's with --python (e.g. --python /path/to/venv/bin/python)"
}

find_python() {
  [[ -n "$PYTHON" ]] && return
  local candidate
  for candidate in "$COMFYUI/venv/bin/python" "$COMFYUI/.venv/bin/python" "$WORKSPACE/venv/bin/python"; do
    if [[ -x "$candidate" ]]; then PYTHON="$candidate"; return; fi
  done
  PYTHON="python3"
}

install_comfyui() {
  if [[ -n "$COMFYUI" ]]; then
    [[ -f "$COMFYUI/main.py" ]] || fail "--comfyui $COMFYUI is not a ComfyUI folder (no main.py in it)"
    COMFYUI="$(cd "$COMFYUI" && pwd -P)"
    return
  fi
  COMFYUI="$WORKSPACE/ComfyUI"
  if [[ -f "$COMFYUI/main.py" ]]; then
    say "ComfyUI already installed in $COMFYUI"
    return
  fi
  say "Installing ComfyUI into $COMFYUI with comfy-cli"
  run python3 -m venv "$WORKSPACE/venv" || fail "could not create a virtual environment in $WORKSPACE/venv (install python3-venv)"
  run "$WORKSPACE/venv/bin/python" -m pip install -q --upgrade pip comfy-cli \
    || fail "could not install comfy-cli with pip: check the network and run install.sh again"
  run "$WORKSPACE/venv/bin/comfy" --skip-prompt --workspace="$COMFYUI" install --nvidia \
    || fail "comfy install failed (see above): run install.sh again to resume"
}

# The package in custom_nodes is a git clone with origin at the public repository, so a rerun and
# ComfyUI-Manager can update it; a checkout linked there by a developer is used as it is.
install_package() {
  local target="$COMFYUI/custom_nodes/$PACKAGE_DIR_NAME"
  PACKAGE="$target"
  if [[ -L "$target" ]]; then
    PACKAGE="$(cd "$target" && pwd -P)"
    say "$target links to $PACKAGE: using that checkout as it is"
  elif [[ "$SCRIPT_DIR" == "$target" ]]; then
    say "Updating $target from its origin"
    run git -C "$target" pull -q --ff-only || say "git pull in $target failed; going on with the version there"
  elif [[ -d "$target/.git" ]]; then
    # The version of the checkout whose installer runs (a piped install's checkout follows the public
    # one); from an unpacked archive, the public one.
    local from=()
    git -C "$SCRIPT_DIR" rev-parse --git-dir >/dev/null 2>&1 && from=("$SCRIPT_DIR" HEAD)
    say "Updating $target${from[0]:+ from ${from[0]}}"
    run git -C "$target" pull -q --ff-only "${from[@]}" \
      || fail "git pull in $target failed: resolve local changes there and rerun"
  else
    if [[ -e "$target" ]]; then
      local aside
      aside="$target.old-$(date +%Y%m%d-%H%M%S)"
      say "$target is not a git clone (an older copy?): moving it to $aside"
      run mv "$target" "$aside"
    fi
    local origin="$REPO_URL"
    if git -C "$SCRIPT_DIR" rev-parse --git-dir >/dev/null 2>&1; then
      origin="$(git -C "$SCRIPT_DIR" remote get-url origin 2>/dev/null || echo "$REPO_URL")"
      say "Installing this checkout into $target (git clone; updates come from $origin)"
      run mkdir -p "$COMFYUI/custom_nodes"
      run git clone -q "$SCRIPT_DIR" "$target" || fail "could not clone $SCRIPT_DIR into $target"
      run git -C "$target" remote set-url origin "$origin"
    else
      say "Cloning $REPO_URL into $target"
      run git clone -q --depth 1 "$REPO_URL" "$target" || fail "git clone of $REPO_URL failed: check the network and rerun"
    fi
  fi
  (( DRY_RUN )) && [[ ! -d "$PACKAGE" ]] && PACKAGE="$SCRIPT_DIR"
  say "Installing the package's Python requirements with $PYTHON"
  run "$PYTHON" -m pip install -q -r "$PACKAGE/requirements.txt" \
    || fail "pip could not install $PACKAGE/requirements.txt into $PYTHON's environment"
  [[ -n "$MANIFEST" ]] || MANIFEST="$PACKAGE/install/models.json"
  return 0
}

# The downloader's arguments for the model choice, into MODEL_ARGS; $1: the manifest.
model_args() {
  MODEL_ARGS=(--manifest "$1" --models-dir "${COMFYUI:-$WORKSPACE/ComfyUI}/models" --sets "$MODELS")
  [[ -n "$QUANT" ]] && MODEL_ARGS+=(--quant "$QUANT")
  [[ -n "$VRAM_GB" ]] && MODEL_ARGS+=(--vram "$VRAM_GB")
  return 0
}

# Run from a clone, the model choice (sets, quant) and the free disk are checked before anything is
# installed; piped, the downloader is not here yet and checks them after the package is cloned.
check_models() {
  [[ -n "$SCRIPT_DIR" && -f "$SCRIPT_DIR/loaders/downloads.py" ]] || return 0
  model_args "${MANIFEST:-$SCRIPT_DIR/install/models.json}"
  python3 "$SCRIPT_DIR/loaders/downloads.py" "${MODEL_ARGS[@]}" --check || exit 1
}

download_models() {
  model_args "$MANIFEST"
  (( DRY_RUN )) && MODEL_ARGS+=(--dry-run)
  # Size and sha256 checks, resume and progress live in the package's downloader, which the
  # front end's download button uses too.
  "$PYTHON" "$PACKAGE/loaders/downloads.py" "${MODEL_ARGS[@]}" || exit 1
}

how_to_open() {
  say "Presets: the Templates button in ComfyUI's sidebar > Extensions > $PACKAGE_DIR_NAME"
  if [[ "$LISTEN" == "127.0.0.1" || "$LISTEN" == "localhost" ]]; then
    say "ComfyUI listens on this machine only. From your own computer, open a tunnel and browse to it:"
    say "    ssh -N -L $PORT:127.0.0.1:$PORT ${USER:-user}@$(hostname -f 2>/dev/null || hostname)   # then http://localhost:$PORT"
    say "(--listen 0.0.0.0 would expose ComfyUI to anyone who can reach this machine: it has no login.)"
  else
    say "ComfyUI listens on $LISTEN:$PORT: anyone who can reach this machine on that port can use it (no login)."
  fi
}

start_comfyui() {
  if (( ! START )); then
    say "Done. Start ComfyUI with: cd $COMFYUI && $PYTHON main.py --listen $LISTEN --port $PORT${COMFY_ARGS[*]:+ ${COMFY_ARGS[*]}}"
    how_to_open
    return
  fi
  how_to_open
  say "Starting ComfyUI on $LISTEN:$PORT"
  if (( DRY_RUN )); then
    printf '[dry-run] cd %s && %s main.py --listen %s --port %s %s\n' "$COMFYUI" "$PYTHON" "$LISTEN" "$PORT" "${COMFY_ARGS[*]}"
    return
  fi
  cd "$COMFYUI"
  exec "$PYTHON" main.py --listen "$LISTEN" --port "$PORT" "${COMFY_ARGS[@]}"
}

check_python python3
check_gpu
check_models
install_comfyui
find_python
(( DRY_RUN )) && [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null 2>&1 && PYTHON=python3
check_python "$PYTHON"
check_torch
install_package
download_models
start_comfyui
