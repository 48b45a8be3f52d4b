#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, what benchmarks/gpu_check.sh needs on an offline
# GPU machine (Python 3.12, x86-64, with torch, numpy, httpx, pyyaml, click, rich, psutil,
# nvidia-ml-py, aiohttp, prometheus-client, jinja2, markupsafe already installed):
#
#   .whl/*.whl                             KITT's dependencies that image lacks (--no-deps)
#   .whl/sdist/llama_cpp_python-V.tar.gz   the llama.cpp sources, trimmed to what a build of
#                                          llama-server reads (75 MB -> about 11 MB)
#
# .whl/ is ignored by git (.git/info/exclude) and carried to the device explicitly.
# Usage: bash benchmarks/gpu_check_bundle.sh   (from the repository root; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p "$DEST/sdist"

# Versions as in the development venv (tested together); the image's own copies of
# werkzeug, click and typing_extensions are shadowed because their versions are unknown.
WHEELS=(
  flask==3.1.3 blinker==1.9.0 itsdangerous==2.2.0 werkzeug==3.1.9 click==8.5.1
  cheroot==11.1.2 jaraco.functools==4.6.0 more-itertools==11.2.1
  httpx-sse==0.4.3
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3
  psycopg==3.3.9 psycopg-binary==3.3.9
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  gguf==0.19.0
)
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "$spec"
done

VERSION=$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"$/\1/p' src/kitt/bench/llamacpp.py)
SDIST="$DEST/sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
  tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
  top="$work/llama_cpp_python-$VERSION"
  # Keep the submodule HEAD (the commit build-info.json records), drop the git objects,
  # and what no llama-server build reads: vocab test models, docs, CI, Python, examples.
  head="$top/.git/modules/vendor/llama.cpp/HEAD"
  commit=$(cat "$head")
  rm -rf "$top/.git" "$top/docs" "$top/docker" "$top/examples" "$top/.github"
  mkdir -p "$(dirname "$head")" && echo "$commit" >"$head"
  (cd "$top/vendor/llama.cpp" && rm -rf models docs media .github benches gguf-py)
  tar czf "$SDIST" -C "$work" "llama_cpp_python-$VERSION"
fi
du -sh "$DEST"
ls "$DEST"
