#!/usr/bin/env bash
# Serve a trained MedSMILE bundle with MONAI Label.
#
#   bash bundle/docs/monailabel/start_server.sh BUNDLE_DIR STUDIES_DIR [PORT]
#
# BUNDLE_DIR   a bundle folder: configs/inference.json, configs/metadata.json, scripts/, models/model.pt and
#              models/network.json (what a run writes into bundle/), or models/model.ts alone
# STUDIES_DIR  the images to label (.png .jpg .tif .nii.gz ...); MONAI Label keeps its datastore and the saved
#              labels in it (datastore_v2.json, labels/)
# PORT         default 8000
#
# Environment: MONAILABEL_VENV (default /tmp/mlvenv, made by install_venv.sh), APP_DIR (the app folder to set up,
# default /tmp/medsmile_monailabel_app), MODEL_NAME (the model's name in MONAI Label, default medsmile),
# HOST (default 127.0.0.1; 0.0.0.0 to serve other machines).
#
# It sets up APP_DIR as MONAI Label expects (main.py from app/ beside this script, model/MODEL_NAME -> BUNDLE_DIR)
# and runs `monailabel start_server --app APP_DIR --studies STUDIES_DIR --conf models MODEL_NAME` through serve.py
# (the monailabel command line after torchvision_shim.py). Stop it with Ctrl-C.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 2 ]; then
    sed -n 2,18p "$0"
    exit 2
fi
bundle=$(cd "$1" && pwd)
studies=$(cd "$2" && pwd)
port=${3:-8000}
venv=${MONAILABEL_VENV:-/tmp/mlvenv}
app=${APP_DIR:-/tmp/medsmile_monailabel_app}
name=${MODEL_NAME:-medsmile}
host=${HOST:-127.0.0.1}

if [ ! -x "$venv/bin/python" ]; then
    echo "no MONAI Label venv at $venv: run bash $here/install_venv.sh $venv" >&2
    exit 1
fi
for f in configs/inference.json configs/metadata.json; do
    [ -f "$bundle/$f" ] || { echo "$bundle is not a bundle: no $f" >&2; exit 1; }
done
if [ -f "$bundle/models/model.pt" ]; then
    [ -f "$bundle/models/network.json" ] || { echo "$bundle/models/model.pt needs models/network.json" >&2; exit 1; }
elif [ ! -f "$bundle/models/model.ts" ]; then
    echo "$bundle has no trained model (models/model.pt or models/model.ts): train it first" >&2
    exit 1
fi

mkdir -p "$app/model"
cp "$here/app/main.py" "$app/main.py"
ln -sfn "$bundle" "$app/model/$name"
echo "MONAI Label app in $app: model '$name' -> $bundle; studies $studies; http://$host:$port"
exec "$venv/bin/python" "$here/serve.py" start_server --app "$app" --studies "$studies" \
    --conf models "$name" --host "$host" --port "$port"
