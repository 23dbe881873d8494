#!/usr/bin/env sh
# Build step of the images, runnable outside Docker: generate the gRPC code and export the
# default model's package into OUT_DIR (default: models).
#   deploy/docker/build-package.sh OUT_DIR      PRECISIONS=fp32,int8,fp16 to add fp16
set -eu
out="${1:-models}"
python="${PYTHON:-python}"
data="${DATA_DIR:-../shared/data/multi30k}"
"$python" -m server.proto_build
sample=""
if [ -f "$data/val.en.gz" ]; then
  sample="--sample $data/val.en.gz --sample-references $data/val.de.gz"
fi
calibration=""  # without it int8 scales activations per row at run time
if [ -f "$data/train.en.gz" ]; then
  calibration="--calibration $data/train.en.gz"
fi
# shellcheck disable=SC2086  # $sample and $calibration are flags or nothing
"$python" -m export model/default "$out/multi30k-en-de" --name multi30k-en-de \
  --precision "${PRECISIONS:-fp32,int8}" --int8-weight-bits "${INT8_WEIGHT_BITS:-7}" --force $sample $calibration
