#!/usr/bin/env bash
# Run timm's own model tests (tests/test_models.py from timm's source distribution) on the lambda models.
#
# timm's test_models.py imports the module named in TORCH_BACKEND before it lists models, so with
# TORCH_BACKEND=timm_lambda its parametrized tests include our registered names; `-k` keeps only those.
# Its forward_intermediates / features_only tests list models by timm module name (FEAT_INTER_FILTERS) and
# its features test excludes 'deit*' (as for every timm ViT / DeiT), so they do not select ours: a small extra
# file calls them on our names.
#
# usage: scripts/run_timm_model_tests.sh [extra pytest args]   (env: TIMM_VERSION, WORK_DIR)
set -euo pipefail

TIMM_VERSION="${TIMM_VERSION:-$(python -c 'import timm; print(timm.__version__)')}"
WORK_DIR="${WORK_DIR:-$(mktemp -d)}"
NAMES=(deit_base_lambda40 deit_base_lambda50 deit_small_lambda25 deit_small_lambda30 deit_tiny_lambda25 deit_tiny_lambda30 vit_lambda)

sdist_dir="$WORK_DIR/timm-$TIMM_VERSION"
if [ ! -f "$sdist_dir/tests/test_models.py" ]; then
    pip download --no-binary :all: --no-deps "timm==$TIMM_VERSION" -d "$WORK_DIR"
    tar -xzf "$WORK_DIR/timm-$TIMM_VERSION.tar.gz" -C "$WORK_DIR"
fi

# run from a folder holding only the test files, so `import timm` is the installed timm, not the sdist's copy
tests_dir="$WORK_DIR/tests-lambda"
mkdir -p "$tests_dir"
cp "$sdist_dir/tests/test_models.py" "$sdist_dir/tests/conftest.py" "$tests_dir/"
names_py=$(printf "'%s', " "${NAMES[@]}")
cat > "$tests_dir/test_lambda_called.py" <<EOF
"""timm's forward_intermediates / features_only tests called on the lambda models (they do not select them)."""
import pytest
import test_models as timm_tests

NAMES = [${names_py}]


@pytest.mark.parametrize('model_name', NAMES)
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize('model_name', NAMES)
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)


@pytest.mark.parametrize('model_name', NAMES)
def test_model_forward_features(model_name):
    timm_tests.test_model_forward_features(model_name, 1)
EOF

selection=$(printf " or %s" "${NAMES[@]}")
selection="${selection:4}"
cd "$tests_dir"
TORCH_BACKEND=timm_lambda python -m pytest test_models.py test_lambda_called.py \
    -k "$selection" -p no:cacheprovider -W ignore -q -rA "$@"
