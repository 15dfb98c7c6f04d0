#!/usr/bin/env bash
# Idempotent set-up of evolsplat-ns on a fresh machine (CPU or CUDA), into ./.venv.
#
# Why each step exists (measured facts in docs/install.md):
# - torch is pinned: an unpinned torch, or anything needing a newer one, pulls the newest CUDA
#   build plus ~3 GB of nvidia packages. On a machine whose python already has a CUDA torch,
#   the venv sees it (--system-site-packages) and we never replace it with a CPU build.
# - sdists (sam2) build with --build-constraint so their isolated build keeps the same torch.
# - open3d needs libusb-1.0-0 from the OS.
# - the registry torchvision is a CUDA build; on CPU torch its import fails. We install a
#   startup hook (.pth) that defines the missing op schemas before torchvision loads.
# - spconv: one build per machine, through an extra (cpu / cu121 / cu124 / cu126) chosen here.
# - ffmpeg: imageio-ffmpeg's binary linked as .venv/bin/ffmpeg (ns-render needs one).
# Options: EXTRAS="test" installs test tools (pytest, chromium for the viewer browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${EVOLSPLAT_VENV:-$ROOT/.venv}
EXTRAS=${EXTRAS:-}
STAMP="$VENV/.evolsplat-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)${EXTRAS:+-$EXTRAS}"
[ -f "$STAMP" ] && exit 0

log() { echo "[setup] $*" >&2; }
t0=$(date +%s)

apt_install() {  # apt_install PKG... ; only when missing and we are root
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
  else
    log "WARNING: please install OS packages: ${missing[*]} (need root/apt)"
  fi
}
apt_install libusb-1.0-0

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
# --build-constraint (pins torch inside sdist build envs) needs pip >= 25.3
"$VPY" -m pip install -q --disable-pip-version-check "pip>=25.3" setuptools wheel
PIP=("$VPY" -m pip install -q --disable-pip-version-check)

CONS="$VENV/constraints.txt"
if "$VPY" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  TV=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
  log "keeping the CUDA torch $TV already installed"
  echo "torch==$TV" > "$CONS"
  "$VPY" -c "import torchvision" 2>/dev/null && echo "torchvision==$("$VPY" -c 'import torchvision; print(torchvision.__version__.split("+")[0])')" >> "$CONS"
else
  printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$CONS"
  "${PIP[@]}" -c "$CONS" torch==2.13.0
fi

CUDA_VER=$("$VPY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null || true)
# Exactly one spconv build (pyproject extras): the CPU one, or the CUDA build closest below the
# torch CUDA version (spconv-cu120 has no wheel past Python 3.11).
if [ -n "$CUDA_VER" ]; then
  case "$CUDA_VER" in 12.[6-9]*|1[3-9].*) SPC=cu126 ;; 12.[45]*) SPC=cu124 ;; *) SPC=cu121 ;; esac
  OTHER_SPCONV=$("$VPY" -m pip list --format=freeze 2>/dev/null | grep -E '^(spconv|cumm)==' | cut -d= -f1 || true)
else
  SPC=cpu
  OTHER_SPCONV=$("$VPY" -m pip list --format=freeze 2>/dev/null | grep -E '^(spconv|cumm)-cu[0-9]+==' | cut -d= -f1 || true)
fi
if [ -n "$OTHER_SPCONV" ]; then  # a venv made for the other kind of machine (or by an older set-up)
  log "removing $(echo $OTHER_SPCONV): this machine uses the spconv build of extra [$SPC]"
  "$VPY" -m pip uninstall -y -q $OTHER_SPCONV || log "WARNING: could not remove $OTHER_SPCONV (outside the venv?)"
fi

log "installing evolsplat-ns[$SPC${EXTRAS:+,$EXTRAS}] and its dependencies"
export SAM2_BUILD_CUDA=${SAM2_BUILD_CUDA:-0}
"${PIP[@]}" -c "$CONS" --build-constraint "$CONS" -e ".[$SPC${EXTRAS:+,$EXTRAS}]"

# ns-render and mediapy run `ffmpeg`: imageio-ffmpeg ships a static binary, linked into the venv
# (evolsplat_ns puts the venv's bin on PATH for its tools, so no system ffmpeg is needed).
if [ ! -e "$VENV/bin/ffmpeg" ]; then
  ln -sf "$("$VPY" -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())")" "$VENV/bin/ffmpeg"
fi
"$VENV/bin/ffmpeg" -hide_banner -version >/dev/null || { log "ffmpeg from imageio-ffmpeg does not run"; exit 1; }

if [ -z "$CUDA_VER" ]; then
  SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import evolsplat_ns._compat.torchvision_cpu as m; m.install()" > "$SITE/evolsplat_torchvision_cpu.pth"
fi

if [[ ",$EXTRAS," == *",test,"* ]]; then
  apt_install chromium
fi
"$VPY" -c "import torchvision, spconv.pytorch, evolsplat_ns" || { log "import check failed"; exit 1; }
touch "$STAMP"
log "done in $(( $(date +%s) - t0 )) s"
