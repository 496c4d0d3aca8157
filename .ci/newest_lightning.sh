#!/usr/bin/env bash
# The Lightning-facing tests against the newest Lightning release the package index serves, so a Lightning release
# that breaks the private accesses in lightning_sgd/compat.py (or anything else Lightning-facing) is seen the day
# it comes out. `LIGHTNING_VERSION=x.y.z` tests a given release instead of the newest.
#
# Outcome: the newest release is the installed one -> nothing to add (the main suite ran on it); the index is
# unreachable -> skipped with a note; inside pyproject's supported range -> a failure fails CI (users get that
# release); outside it -> a failure is reported loudly but CI passes (pyproject keeps users on a working release
# until the range is widened).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TESTS=(tests/test_compat_private.py tests/test_lightning_packages.py tests/test_drop_in_matrix.py
       tests/test_batch_size_schedule.py tests/test_exact_resume.py tests/test_module_loss.py)

installed=$($PY -c "import lightning; print(lightning.__version__)")
newest=${LIGHTNING_VERSION:-$($PY -m pip index versions lightning 2>/dev/null | sed -n 's/^lightning (\(.*\))$/\1/p')}
if [ -z "$newest" ]; then
    echo "newest-lightning check: the package index did not answer; skipped."
    exit 0
fi
if [ "$newest" = "$installed" ]; then
    echo "newest-lightning check: the newest Lightning ($newest) is the installed one; the main suite ran on it."
    exit 0
fi
supported=$($PY - "$newest" <<'PY'
import sys, tomllib
from packaging.requirements import Requirement
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == "lightning")
print("yes" if spec.contains(sys.argv[1], prereleases=True) else "no")
PY
)
target=.ci/.lightning-$newest
if [ ! -d "$target" ]; then
    # --no-deps: keep this machine's torch; the Lightning packages only, in a folder put first on PYTHONPATH.
    $PY -m pip install -q --no-deps --target "$target" "lightning==$newest" "pytorch-lightning==$newest" \
        "lightning-fabric==$newest" lightning-utilities || { echo "newest-lightning check: install failed"; exit 1; }
fi
echo "newest-lightning check: Lightning $newest (installed: $installed; inside the supported range: $supported)"
PYTHONPATH=$target $PY -c "import lightning, pytorch_lightning; assert lightning.__version__ == '$newest', lightning.__version__"
if PYTHONPATH=$target $PY -m pytest "${TESTS[@]}"; then
    echo "newest-lightning check: Lightning $newest passes the Lightning-facing tests."
    exit 0
fi
if [ "$supported" = "yes" ]; then
    echo "newest-lightning check: Lightning $newest FAILS the Lightning-facing tests and pyproject allows it."
    exit 1
fi
echo "################################################################################################"
echo "newest-lightning check: Lightning $newest FAILS the Lightning-facing tests (outside the supported"
echo "range in pyproject.toml, so users keep a working release): fix lightning_sgd/compat.py before widening it."
echo "################################################################################################"
exit 0
