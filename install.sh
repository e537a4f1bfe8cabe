#!/usr/bin/env bash
# One command on a fresh GPU machine: ComfyUI, this package, the model files of our presets, then
# ComfyUI itself. Safe to run again: it picks up where it stopped and skips what is already done.
#
#   bash install.sh [--workspace DIR | --comfyui DIR] [--models SET[,SET]] [--quant Q]
#                   [--listen ADDR] [--port N] [--no-start] [--dry-run] [-- COMFYUI_ARGS...]
#
# Model sets: qwen-image-2512 (default), qwen-image-edit-2511, z-image-turbo, or all.
# HF_ENDPOINT (a Hugging Face mirror) and HF_TOKEN are honoured.
set -euo pipefail

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
HF_ENDPOINT="${HF_ENDPOINT:-https://huggingface.co}"
COMFY_ARGS=()

SCRIPT_DIR=""
if [[ -n "${BASH_SOURCE[0]:-}" && -f "${BASH_SOURCE[0]}" ]]; then
  SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi

say() { printf '==> %s\n' "$*"; }
fail() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
run() {
  if (( DRY_RUN )); then printf '[dry-run] %s\n' "$*"; else "$@"; fi
}

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --workspace DIR   where to install ComfyUI with comfy-cli (default ~/comfy)
  --comfyui DIR     use this existing ComfyUI instead of installing one
  --python PATH     the Python of that ComfyUI (default: DIR/venv, DIR/.venv, else python3)
  --models LIST     model sets, comma separated: qwen-image-2512, qwen-image-edit-2511, z-image-turbo, all
  --quant Q         diffusion-model quant (e.g. Q4_K_M); default: chosen from the GPU's VRAM
  --vram GB         assume this much VRAM when choosing the quant
  --manifest FILE   model manifest (default: install/models.json of this package)
  --listen ADDR     address ComfyUI listens on (default 127.0.0.1)
  --port N          port (default 8188)
  --no-start        do not start ComfyUI at the end
  --skip-gpu-check  do not require an NVIDIA driver
  --dry-run         print every step and download without doing it
  -- ARGS...        passed on to ComfyUI's main.py (e.g. -- --lowvram)
EOF
}

while (( $# )); do
  case "$1" in
    --workspace) WORKSPACE="${2:?--workspace needs a directory}"; shift 2 ;;
    --comfyui) COMFYUI="${2:?--comfyui needs a directory}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a path}"; shift 2 ;;
    --models) MODELS="${2:?--models needs a list}"; shift 2 ;;
    --quant) QUANT="${2:?--quant needs a quant name}"; shift 2 ;;
    --vram) VRAM_GB="${2:?--vram needs a number of GB}"; shift 2 ;;
    --manifest) MANIFEST="${2:?--manifest needs a file}"; shift 2 ;;
    --listen) LISTEN="${2:?--listen needs an address}"; shift 2 ;;
    --port) PORT="${2:?--port needs a number}"; shift 2 ;;
    --no-start) START=0; shift ;;
    --skip-gpu-check) SKIP_GPU_CHECK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; COMFY_ARGS=("$@"); break ;;
    *) fail "unknown option '$1' (see: bash install.sh --help)" ;;
  esac
done

# --- checks ---------------------------------------------------------------------------------------
check_python() {
  local py="$1"
  command -v "$py" >/dev/null 2>&1 || fail "no Python found ('$py'): install Python 3.10 or newer"
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || fail "$("$py" -V 2>&1) is too old: ComfyUI needs Python 3.10 or newer"
}

check_gpu() {
  if (( SKIP_GPU_CHECK )); then
    say "GPU check skipped"
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

free_bytes() {  # free bytes on the filesystem holding $1 (or its nearest existing parent)
  local dir="$1"
  while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done
  df -PB1 "$dir" | awk 'NR == 2 { print $4 }'
}

human() { awk -v b="$1" 'BEGIN { printf "%.1f GB", b / 1e9 }'; }

# --- ComfyUI and this package ---------------------------------------------------------------------
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

install_package() {
  local target="$COMFYUI/custom_nodes/$PACKAGE_DIR_NAME"
  if [[ -n "$SCRIPT_DIR" && -f "$SCRIPT_DIR/__init__.py" && "$SCRIPT_DIR" != "$target" ]]; then
    say "Installing this package into $target"
    run mkdir -p "$target"
    if (( DRY_RUN )); then
      printf '[dry-run] copy %s -> %s\n' "$SCRIPT_DIR" "$target"
    else
      tar -C "$SCRIPT_DIR" --exclude=./.git --exclude=./.venv --exclude='*/__pycache__' -cf - . | tar -C "$target" -xf - \
        || fail "could not copy the package into $target"
    fi
  elif [[ -d "$target/.git" ]]; then
    say "Updating $target"
    run git -C "$target" pull --ff-only || fail "git pull in $target failed: resolve local changes there and rerun"
  elif [[ ! -f "$target/__init__.py" ]]; then
    say "Cloning $REPO_URL into $target"
    run git clone --depth 1 "$REPO_URL" "$target" || fail "git clone of $REPO_URL failed: check the network and rerun"
  fi
  say "Installing the package's Python requirements with $PYTHON"
  run "$PYTHON" -m pip install -q -r "$target/requirements.txt" \
    || fail "pip could not install $target/requirements.txt into $PYTHON's environment"
  if [[ -d "$target/workflows/input" ]]; then
    run mkdir -p "$COMFYUI/input"
    run cp -n "$target/workflows/input/"*.png "$COMFYUI/input/" 2>/dev/null || true
  fi
  [[ -n "$MANIFEST" ]] || MANIFEST="$target/install/models.json"
  (( DRY_RUN )) && [[ ! -f "$MANIFEST" && -n "$SCRIPT_DIR" ]] && MANIFEST="$SCRIPT_DIR/install/models.json"
  return 0
}

# --- models ----------------------------------------------------------------------------------------
plan_downloads() {  # prints "url<TAB>destination<TAB>size<TAB>sha256" lines; the quant choice on stderr
  "$PYTHON" - "$MANIFEST" "$MODELS" "$QUANT" "$VRAM_GB" "$HF_ENDPOINT" "$COMFYUI/models" <<'EOF'
import json, sys
manifest_path, sets_arg, quant, vram, endpoint, models_dir = sys.argv[1:7]
m = json.load(open(manifest_path))
names = list(m["sets"]) if sets_arg == "all" else [s.strip() for s in sets_arg.split(",") if s.strip()]
unknown = [n for n in names if n not in m["sets"]]
if unknown:
    sys.exit(f"unknown model set(s) {', '.join(unknown)}: choose from {', '.join(m['sets'])} or all")
def line(entry, file):
    path = entry.get("path", file)
    url = f"{endpoint.rstrip('/')}/{entry['repo']}/resolve/main/{path}"
    return f"{url}\t{models_dir}/{entry['folder']}/{file}\t{entry.get('size') or ''}\t{entry.get('sha256') or ''}"
seen = set()
for name in names:
    s = m["sets"][name]
    dm = s["diffusion_model"]
    available = dm["quants"]
    if quant:
        if quant not in available:
            sys.exit(f"quant {quant} is not available for {name}: choose from {', '.join(available)}")
        chosen, why = quant, "as asked with --quant"
    else:
        gb = float(vram) if vram else 0.0
        fits = [(c["quant"], c["why"]) for c in sorted(m["vram_choices"], key=lambda c: -c["min_gb"])
                if gb >= c["min_gb"] and c["quant"] in available]
        chosen, why = fits[0] if fits else (next(iter(available)), "the only quant listed for this set")
    print(f"{name}: diffusion model {chosen} ({why}; {vram or '?'} GB VRAM)", file=sys.stderr)
    q = available[chosen]
    entries = [({**dm, **q}, q["file"])] + [(m["files"][k], m["files"][k]["file"]) for k in s["files"]]
    for entry, file in entries:
        if file not in seen:
            seen.add(file)
            print(line(entry, file))
EOF
}

file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

download() {  # url dest size sha256: resumable, atomic, verified
  local url="$1" dest="$2" size="$3" sha="$4" part="$2.part"
  local name
  name="$(basename "$dest")"
  if [[ -f "$dest" ]] && [[ -z "$size" || "$(file_size "$dest")" == "$size" ]]; then
    if [[ -z "$sha" ]] || echo "$sha  $dest" | sha256sum -c --status; then
      say "$name: already present"
      return 0
    fi
    say "$name: present but its sha256 differs; downloading it again"
    run rm -f "$dest"
  fi
  if (( DRY_RUN )); then
    printf '[dry-run] download %s -> %s (%s)\n' "$url" "$dest" "${size:+$(human "$size")}"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  local auth=()
  [[ -n "${HF_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $HF_TOKEN")
  local attempt code
  for attempt in 1 2 3 4 5; do
    say "$name: downloading$( [[ -s "$part" ]] && printf ' (resuming at %s)' "$(human "$(file_size "$part")")" )"
    code=0
    curl -fL --retry 3 --retry-delay 2 -C - "${auth[@]}" --progress-bar -o "$part" "$url" || code=$?
    if (( code == 0 )); then break; fi
    if (( code == 22 )); then
      local status
      status="$(curl -sIL -o /dev/null -w '%{http_code}' "${auth[@]}" "$url" || true)"
      if [[ "$status" == 404 ]]; then
        rm -f "$part"
        fail "$name: not found at $url (HTTP 404): the file was renamed or removed upstream; check install/models.json"
      fi
      if [[ "$status" == 401 || "$status" == 403 ]]; then
        fail "$name: access denied at $url (HTTP $status): set HF_TOKEN to a Hugging Face token that can read it"
      fi
      if [[ "$status" == 416 ]]; then rm -f "$part"; continue; fi
    fi
    say "$name: the connection broke (curl exit $code); resuming (try $attempt of 5)"
    sleep 1
  done
  (( code == 0 )) || fail "$name: download failed after 5 tries; run install.sh again to resume from $(human "$(file_size "$part")")"
  if [[ -n "$size" && "$(file_size "$part")" != "$size" ]]; then
    local got
    got="$(file_size "$part")"
    rm -f "$part"
    fail "$name: downloaded $got bytes but $size were expected; the partial file was removed, run install.sh again"
  fi
  if [[ -n "$sha" ]] && ! echo "$sha  $part" | sha256sum -c --status; then
    rm -f "$part"
    fail "$name: sha256 does not match the manifest (corrupted download); run install.sh again to fetch it anew"
  fi
  mv -f "$part" "$dest"
  say "$name: done"
}

download_models() {
  [[ -f "$MANIFEST" ]] || fail "model manifest $MANIFEST not found"
  local plan needed=0 url dest size sha have
  plan="$(plan_downloads)" || fail "could not plan the downloads (see the message above)"
  while IFS=$'\t' read -r url dest size sha; do
    [[ -z "$url" || -z "$size" ]] && continue
    have=$(( $(file_size "$dest") == size ? size : $(file_size "$dest.part") ))
    needed=$(( needed + size - have ))
  done <<< "$plan"
  local free
  free="$(free_bytes "$COMFYUI/models")"
  say "Model files still to download: $(human "$needed"); free disk: $(human "$free")"
  if (( needed > free )); then
    fail "not enough disk space: $(human "$needed") needed in $COMFYUI/models but only $(human "$free") free; free some space or choose fewer --models"
  fi
  while IFS=$'\t' read -r url dest size sha; do
    [[ -n "$url" ]] && download "$url" "$dest" "$size" "$sha"
  done <<< "$plan"
}

start_comfyui() {
  if (( ! START )); then
    say "Done. Start ComfyUI with: cd $COMFYUI && $PYTHON main.py --listen $LISTEN --port $PORT"
    return
  fi
  say "Starting ComfyUI: http://$LISTEN:$PORT (presets: Workflow > Browse Templates > $PACKAGE_DIR_NAME)"
  cd "$COMFYUI"
  if (( DRY_RUN )); then
    printf '[dry-run] %s main.py --listen %s --port %s %s\n' "$PYTHON" "$LISTEN" "$PORT" "${COMFY_ARGS[*]}"
    return
  fi
  exec "$PYTHON" main.py --listen "$LISTEN" --port "$PORT" "${COMFY_ARGS[@]}"
}

check_python python3
check_gpu
install_comfyui
find_python
check_python "$PYTHON"
install_package
download_models
start_comfyui
