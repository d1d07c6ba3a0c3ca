#!/usr/bin/env bash
# The Triton Inference Server for tests/engines/test_triton*.py: nvidia-pytriton's bundled tritonserver (Python
# backend) in its own venv, .venv/triton-server (or $MSKNODE_TRITON_VENV), made from the interpreter of .venv.
# Pinned in tests/setup/triton-server-requirements.txt. Idempotent; exits non-zero when the install fails, so
# `make test` (and CI) never runs the Triton tests against a half-installed server.
set -eu
cd "$(dirname "$0")/../.."
venv="${MSKNODE_TRITON_VENV:-.venv/triton-server}"
requirements=tests/setup/triton-server-requirements.txt
stamp="$venv/.installed"
if [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
  echo "triton server: present ($venv)"
  exit 0
fi
base="$(.venv/bin/python -c 'import sys; print(sys._base_executable)' 2>/dev/null || command -v python3)"
echo "triton server: installing nvidia-pytriton into $venv (python: $base)"
rm -rf "$venv"
"$base" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$requirements"
server="$(ls "$venv"/lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver)"
libs="$(dirname "$(dirname "$(dirname "$(dirname "$server")")")")/nvidia_pytriton.libs"
libdir="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
# the server's shared libraries must all resolve (libpython from the venv's interpreter, the rest bundled / Debian)
missing="$(LD_LIBRARY_PATH="$libs:$libdir" ldd "$server" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  echo "triton server: unresolved libraries: $missing" >&2
  exit 1
fi
cp "$requirements" "$stamp"
echo "triton server: installed ($("$venv/bin/python" -m pip show nvidia-pytriton | grep ^Version))"
