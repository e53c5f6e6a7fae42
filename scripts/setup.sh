# Set-up that the README's two commands share: sourced by examples/quickstart.sh and tests/run.sh.
#
#   source scripts/setup.sh      # from bash; exits the calling script with a message on failure
#
# Installs only what is missing, in this order:
#   1. a Python environment: the active one (virtualenv or conda) when there is one, else
#      .venv in the repository, created with the first Python >= 3.10 found ($PYTHON to choose);
#   2. torch, unless the environment already has one (yours is kept, whatever its build):
#      torch==2.13.0, the CUDA build from PyPI where nvidia-smi sees a GPU, else the CPU build
#      from $LIME_TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu);
#   3. megatron-lime itself with its compiled parts and the test extra:
#      pip install --no-build-isolation -e ".[test]" (compiled against the torch from step 2).
# When everything is in place it costs a fraction of a second: it checks that torch is
# installed, that `import megatron_lime` finds this repository with its compiled parts, and that
# those were built from the current setup.py + csrc/ with the current torch (a hash kept in
# megatron_lime/.build-stamp: scripts/setup_state.py). A stamp that does not match rebuilds; an
# install made by hand (no stamp) is trusted as it is.

lime_setup() {
    local repo want_version="3.10"
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

    # 1. The environment: an active virtualenv or conda env; else this repository's .venv; else a
    # `python` on PATH that lives in a virtualenv (its bin/ put first on PATH without `activate`);
    # else a new .venv.
    if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]] && { [[ -x "$repo/.venv/bin/python" ]] ||
           ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; }; then
        if [[ ! -x "$repo/.venv/bin/python" ]]; then
            local candidate python=""
            for candidate in ${PYTHON:-python3 python3.13 python3.12 python3.11 python3.10 python}; do
                if command -v "$candidate" >/dev/null 2>&1 &&
                   "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
                    python=$candidate
                    break
                fi
            done
            if [[ -z "$python" ]]; then
                echo "[setup     ] megatron-lime needs Python >= $want_version; none found (set PYTHON=/path/to/python3)" >&2
                return 1
            fi
            echo "[setup     ] creating a virtual environment: $repo/.venv ($("$python" --version 2>&1))"
            if ! "$python" -m venv "$repo/.venv"; then
                echo "[setup     ] '$python -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2
                rm -rf "$repo/.venv"
                return 1
            fi
        fi
        # shellcheck disable=SC1091
        source "$repo/.venv/bin/activate"
    fi

    # 2 and 3: what is missing? One quick Python call, no torch import.
    local state
    state="$(python "$repo/scripts/setup_state.py")" || return 1
    if [[ "$state" == old-python ]]; then
        echo "[setup     ] the environment's Python is $(python --version 2>&1); megatron-lime needs >= $want_version" >&2
        return 1
    fi
    [[ "$state" == ready ]] && return 0

    local start=$SECONDS
    echo "[setup     ] installing into $(python -c 'import sys; print(sys.prefix)') (reason: $state)"
    # numpy too: torch's build helpers import it
    python -m pip install -q -U pip setuptools wheel ninja numpy || return 1
    if [[ "$state" == no-torch ]]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
            echo "[setup     ] torch 2.13.0 with CUDA (a GPU is present): a download of a few GB"
            python -m pip install torch==2.13.0 || return 1
        else
            echo "[setup     ] torch 2.13.0, the CPU build (no GPU found)"
            # torch alone from the CPU index, then its dependencies from the usual one.
            python -m pip install --no-deps torch==2.13.0 \
                --index-url "${LIME_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" || return 1
            python -m pip install -q torch==2.13.0 || return 1
        fi
    fi
    echo "[setup     ] megatron-lime, compiling csrc/ against torch $(python -c 'import importlib.metadata as m; print(m.version("torch"))') (a few minutes)"
    (cd "$repo" && python -m pip install -q --no-build-isolation -e ".[test]") || return 1
    python "$repo/scripts/setup_state.py" --write-stamp || return 1
    if [[ "${VIRTUAL_ENV:-}" == "$repo/.venv" ]]; then
        echo "[setup     ] done in $(( SECONDS - start ))s; to use the tools yourself: source $repo/.venv/bin/activate"
    else
        echo "[setup     ] done in $(( SECONDS - start ))s"
    fi
}

if ! lime_setup; then
    echo "set-up failed (see above); fix the cause and re-run: completed steps are not repeated" >&2
    echo "(a compiler 'Killed' is memory: MAX_JOBS=1 compiles one file at a time)" >&2
    exit 1
fi
unset -f lime_setup
