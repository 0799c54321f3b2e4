#!/usr/bin/env bash
# Create or reuse .venv and install what is missing: Debian packages (apt, only when
# missing), then the project with its dev and podman extras. Idempotent and quiet when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
# Debian packages the project uses at run time or in its tests (chromium: the HTML viewer test;
# python3-pytest: the toy tasks' tests inside `host` sandboxes, which see /usr but not this venv;
# podman with runc, not crun, which fails on hybrid cgroups; catatonit, which podman only recommends).
APT_PACKAGES=(git util-linux chromium python3-pytest podman runc catatonit)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the dependency declaration (or the interpreter) changed.
stamp="$VENV/.swe-dapo-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1) $("$VENV/bin/python" -c 'import sys; print(sys.version)')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing swe-dapo and its dependencies into $VENV"
    pip_args=(-q --disable-pip-version-check)
    # The CPU build of torch ships as a local wheel on the build machines.
    [ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
    quiet_links() { grep -v "is ignored: it is neither a file nor a directory" >&2; }
    "$VENV/bin/python" -m pip install "${pip_args[@]}" -e ".[dev,podman]" 2> >(quiet_links)
    # DeepSpeed builds against the torch now installed (its setup.py imports torch): no build
    # isolation, no compiled ops (they are JIT-built on first use where a compiler is wanted).
    "$VENV/bin/python" -m pip install "${pip_args[@]}" "setuptools>=68" wheel 2> >(quiet_links)
    DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install "${pip_args[@]}" --no-build-isolation -e ".[dev,podman,train]" 2> >(quiet_links)
    echo "$want" > "$stamp"
fi
