#!/usr/bin/env bash
# The XLA environment, apart from the main one: torch-xla pins its own torch (torch 2.13 with
# torch_xla 2.9 fails at import with an undefined symbol), so it lives in its own venv.
#   scripts/xla_env.sh build   build (or reuse) .xla-venv/: torch 2.9.0 + torch-xla 2.9.0 + this project + pytest
#   scripts/xla_env.sh test    run the XLA tests in it on torch_xla's CPU device (PJRT_DEVICE=CPU)
#   scripts/xla_env.sh         both
# The venv is rebuilt only when this script's pins change (a stamp file holds them), so a CI machine
# that keeps .xla-venv/ between runs pays the ~90 s, 4.1 GB install once. PyPI's torch 2.9 wheel needs
# its nvidia-* wheels even on a CPU machine (`--no-deps` fails at `import torch`).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${XLA_VENV:-.xla-venv}
PINS="torch==2.9.0 torch-xla==2.9.0"
# the project's own dependencies and the test tools, none of which pulls another torch
EXTRAS="pytest>=7 pytest-timeout>=2.1 jupyter_client>=7 ipykernel>=6 nbformat>=5"
STAMP="$VENV/.notebook-fabric-xla"

build() {
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PINS $EXTRAS" ]]; then
        echo "xla_env: reusing $VENV ($PINS)"
    else
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet $PINS
        # -e . with its dependencies: torch>=2.1,<3 is already met, so pip keeps torch 2.9.0
        "$VENV/bin/pip" install --quiet -e . $EXTRAS
        echo "$PINS $EXTRAS" > "$STAMP"
    fi
    "$VENV/bin/pip" install --quiet --no-deps -e .   # this checkout (the venv may have been built by another)
    # pip must not have replaced the pinned pair
    "$VENV/bin/python" - <<'PY'
import torch, torch_xla
assert torch.__version__.split("+")[0] == "2.9.0", f"torch {torch.__version__} replaced the pinned 2.9.0"
assert torch_xla.__version__.split("+")[0] == "2.9.0", f"torch_xla {torch_xla.__version__}"
print(f"xla_env: torch {torch.__version__}, torch_xla {torch_xla.__version__}")
PY
}

run_tests() {
    PJRT_DEVICE=CPU "$VENV/bin/python" -m pytest -q -rxX tests/xla tests/test_xla.py "$@"
}

case "${1:-all}" in
    build) build ;;
    test) shift; run_tests "$@" ;;
    all) build; run_tests ;;
    *) echo "usage: $0 [build|test [pytest args]|all]" >&2; exit 2 ;;
esac
