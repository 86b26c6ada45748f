#!/usr/bin/env bash
# Build the MONAI Label virtual environment that start_server.sh and benchmarks/monailabel_check.py use,
# separate from the project's python (MONAI Label pins its own dependency versions).
#
#   bash bundle/docs/monailabel/install_venv.sh [VENV_DIR]        # default: $MONAILABEL_VENV or /tmp/mlvenv
#
# torch is installed first, pinned, so that MONAI Label's dependencies do not pull another one. Where pip finds a
# local CPU build of torch 2.13.0 (as on the project's machines) that one is taken; elsewhere pass e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU build, or nothing for PyPI's CUDA
# build (several GB). See README.md beside this file for why each pin is there.
set -euo pipefail

venv=${1:-${MONAILABEL_VENV:-/tmp/mlvenv}}
python=${PYTHON:-python3}
start=$(date +%s)

"$python" -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install ${TORCH_PIP_ARGS:-} torch==2.13.0

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cat >"$constraints" <<'EOF'
torch==2.13.0
monai==1.6.1
pydicom<3
pynetdicom<3
dicomweb-client<0.60
EOF
# monailabel 0.8.5 and the packages the bundle's scripts import (pyproject.toml / configs/metadata.json)
PIP_CONSTRAINT="$constraints" "$venv/bin/pip" install monailabel==0.8.5 \
    transformers==5.24.0 pytorch-ignite==0.5.5 faiss-cpu==1.15.1 nibabel==5.4.2 itk-io==5.4.7 \
    pillow tifffile scipy onnx fire

# PyPI's torchvision is a CUDA build: with the CPU torch it cannot import, and an installed but broken torchvision
# also breaks transformers (Mask2Former). Remove it then; torchvision_shim.py covers MONAI Label's one import of it.
if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "torchvision does not import with this torch (CUDA-only wheel): uninstalling it"
    "$venv/bin/pip" uninstall -y torchvision
fi

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

for pkg in ("monailabel", "monai", "torch", "torchvision", "numpy", "transformers", "pydicom", "itk"):
    try:
        print(f"{pkg}=={md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
EOF
echo "MONAI Label venv ready in $venv ($(($(date +%s) - start)) s)"
