#!/usr/bin/env bash
# H100 cost table: every plugin trainer beside nnU-Net's PlainConvUNet and ResEnc M on the 3D 128^3 and 2D 512^2
# reference plans (benchmarks/h100_cost.py; plans committed in benchmarks/plans/, made by nnU-Net's planners).
#
# WHAT THE GPU MACHINE NEEDS: nnU-Net 2.8.1 importable. The trainers ARE nnU-Net trainers (they subclass
# nnUNetTrainer, whose module imports nnU-Net's whole data pipeline: batchgenerators(v2), blosc2, SimpleITK,
# nibabel, acvl-utils, dynamic-network-architectures, scikit-learn, seaborn, ...). The lent H100 image has torch,
# triton, numpy, scipy, scikit-image, matplotlib, pandas, einops, timm, tqdm - but no nnU-Net, and no internet.
# Planning itself is NOT needed there (the plans are committed); `--replan` would need the same install.
# mamba-ssm is optional: without it the selective scan runs on the project's Triton kernels (the table's
# "scan backend" column says which one ran).
#
# Steps, from the project root (a call carries at most 64 MiB: SimpleITK's wheel alone is 53 MB, so `stage` repacks it
# with xz, ~28 MB, and fetches only the pure-import dependencies the GPU image lacks):
#   CPU machine:  bash benchmarks/h100_cost.sh stage      (with the project's venv first on PATH: the mamba-ssm
#                                                         sdists are staged too, and their metadata needs torch)
#                 -> .gpu-nnunet/ (nnU-Net + deps, ~20 MB) and .gpu-sitk/sitk.tar.xz (~28 MB); both git-ignored
#   GPU call:     carry [".gpu-nnunet", ".gpu-sitk"]
#                 command: bash benchmarks/h100_cost.sh install && bash benchmarks/h100_cost.sh check &&
#                          bash benchmarks/h100_cost.sh run 3d && bash benchmarks/h100_cost.sh run 2d
#                 (on the H100 with MAMBA_SSM=1: ~40 s install, ~150 s build, ~290 s 3d, ~105 s 2d: near a call's
#                  10 minutes, so `run 2d` may go into a second call on the still-warm machine)
#   (installed files live in /tmp/site and stay while the machine stays warm; results go to $OUT/3d, $OUT/2d:
#    cost.md/.csv/.json/.png, rewritten after every trainer, so a call that times out keeps what it measured.)
#   Optional mamba-ssm backend: also carry ".gpu" (bash ../shared/tools/gpu/stage.sh) and prefix a run with
#   MAMBA_SSM=1 (its build takes ~2.5 min of the call).
#   Copy $OUT/3d and $OUT/2d into benchmarks/results/<date>_<gpu>/ and fill docs/benchmarking.md's H100 table.
#
# Options for `run` (environment): REPEATS (10), WARMUP (3), TRAINERS ("plugin baselines"), COMPILE=1 (let nnU-Net
# torch.compile its own trainers as nnUNetv2_train does; default off = like-for-like, plugin trainers never compile).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
PY=${PYTHON:-python}

# pip distribution -> import name of the packages nnU-Net imports at import time beyond nnU-Net's own wheels that
# the GPU image ("cuda", package list in the device tool's KINDS.md, 2026-11-17) lacks; the others nnU-Net imports
# (seaborn, scikit-learn, msgpack, httpx, rich, pygments, narwhals, tifffile, imageio, requests, ...) are there.
# `check` names any module still missing. Installed on the GPU machine only where absent.
EXTRA_DISTS="numexpr:numexpr pydantic:pydantic pydantic-core:pydantic_core annotated-types:annotated_types
typing-inspection:typing_inspection platformdirs:platformdirs"

stage() {
  bash ../shared/tools/gpu/stage.sh --nnunet
  mkdir -p .gpu-sitk .gpu-nnunet/extra
  grep -qx '/.gpu-sitk/' .git/info/exclude 2>/dev/null || echo '/.gpu-sitk/' >> .git/info/exclude
  mkdir -p .gpu-cache && grep -qx '/.gpu-cache/' .git/info/exclude || echo '/.gpu-cache/' >> .git/info/exclude
  find .gpu-nnunet .gpu-sitk -maxdepth 1 -iname 'simpleitk*.whl' -exec mv {} .gpu-cache/ \;   # not carried
  rm -rf .gpu-nnunet/extra/*
  if [[ ! -f .gpu-sitk/sitk.tar.xz ]]; then   # the wheel's files, xz-compressed (53 MB -> 28 MB); install unpacks it
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && unzip -q "$OLDPWD"/.gpu-cache/simpleitk-*.whl && tar cf - . | xz -9 -T0 > "$OLDPWD/.gpu-sitk/sitk.tar.xz")
    rm -rf "$tmp"
  fi
  plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any)
  for pair in $EXTRA_DISTS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .gpu-nnunet/extra "${pair%%:*}"
  done
  du -sh .gpu-nnunet .gpu-sitk
}

install() {
  mkdir -p "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  for dir in .gpu-sitk .gpu-nnunet; do
    [[ -d $dir ]] || continue
    files=$(find "$dir" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' \))
    [[ -n $files ]] && "$PY" -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" $files
    for tarball in "$dir"/*.tar.xz; do [[ -f $tarball ]] && tar xJf "$tarball" -C "$SITE"; done
    echo "installed $dir into $SITE"
  done
  if [[ -d .gpu-nnunet/extra ]]; then
    for pair in $EXTRA_DISTS; do
      dist=${pair%%:*} mod=${pair##*:}
      "$PY" -c "import $mod" 2>/dev/null && continue
      whl=$(find .gpu-nnunet/extra -iname "$(echo "$dist" | tr - _)-*.whl" | head -1)
      if [[ -n $whl ]]; then
        "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$whl" && echo "installed missing $mod ($whl)"
      else
        echo "missing $mod and no wheel for it in .gpu-nnunet/extra"
      fi
    done
  fi
}

check() {
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" - <<'EOF'
import importlib, sys
for mod in ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnunet_mamba.trainers", "nnunet_mamba.benchmark.cost"):
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        sys.exit(f"check: importing {mod} needs the module {e.name!r}, not installed here. On the CPU machine: "
                 f"python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform "
                 f"manylinux2014_x86_64 --platform any -d .gpu-nnunet/extra <its pip name>, add it to EXTRA_DISTS "
                 f"in benchmarks/h100_cost.sh, carry .gpu-nnunet again and rerun install")
import torch
from nnunet_mamba.ops import available_backends
print(f"check: nnU-Net and nnunet_mamba import; torch {torch.__version__}, CUDA available: "
      f"{torch.cuda.is_available()}, scan backends: {available_backends()}")
EOF
}

run() {
  local setting=${1:?usage: h100_cost.sh run 3d|2d}
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if [[ ${MAMBA_SSM:-0} == 1 && ! -f /tmp/mamba-build.done ]]; then
    setsid nohup bash .gpu/build-mamba-ssm.sh > /tmp/mamba-build.log 2>&1 < /dev/null &
    while [[ ! -f /tmp/mamba-build.done ]]; do sleep 5; done
  fi
  local extra=()
  [[ ${COMPILE:-0} == 1 ]] && extra+=(--compile)
  # shellcheck disable=SC2086
  "$PY" benchmarks/h100_cost.py --settings "$setting" --out "${OUT:-benchmarks/results}" \
    --repeats "${REPEATS:-10}" --warmup "${WARMUP:-3}" -tr ${TRAINERS:-plugin baselines} "${extra[@]}"
}

cmd=${1:-}
case $cmd in
  stage|install|check) "$cmd" ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/h100_cost.sh stage|install|check|run 3d|2d   (see the header)"; exit 2 ;;
esac
