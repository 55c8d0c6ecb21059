#!/usr/bin/env bash
# One-time setup on Debian: the Fashion-MNIST package, then a virtualenv with cnn_caption and its test tools.
set -euo pipefail
cd "$(dirname "$0")"
packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
command -v java >/dev/null || packages+=(default-jre-headless)  # METEOR (pycocoevalcap) runs a Java jar
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
command -v chromium >/dev/null || packages+=(chromium)  # tests/test_report.py opens the report pages in it
if [ ${#packages[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,lint]'
echo "setup done: use .venv/bin/python"
