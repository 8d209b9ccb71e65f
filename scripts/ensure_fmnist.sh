#!/usr/bin/env bash
# Makes sure Fashion-MNIST (Debian package dataset-fashion-mnist) is installed; idempotent.
set -euo pipefail
dir="${1:-/usr/share/datasets/fashion-mnist}"
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have() { for f in $files; do [ -f "$dir/$f" ] || return 1; done; }
if have; then exit 0; fi
if [ -n "${DISTREWARD_FMNIST:-}" ] && [ "$DISTREWARD_FMNIST" != "$dir" ]; then
  dir="$DISTREWARD_FMNIST"; have && exit 0
fi
echo "Fashion-MNIST not found in $dir; installing the Debian package dataset-fashion-mnist ..."
if ! command -v apt-get >/dev/null; then
  echo "error: apt-get is not available. Put the four gzipped IDX files of Fashion-MNIST in a folder and" >&2
  echo "       set DISTREWARD_FMNIST=/that/folder (or run 'make FMNIST_DIR=/that/folder ...')." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "error: installing dataset-fashion-mnist needs root; run 'sudo apt-get install dataset-fashion-mnist'" >&2
    echo "       or set DISTREWARD_FMNIST to a folder holding the four IDX .gz files." >&2
    exit 1
  fi
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
have || { echo "error: dataset-fashion-mnist installed but the files are not in $dir (see 'dpkg -L dataset-fashion-mnist')" >&2; exit 1; }
