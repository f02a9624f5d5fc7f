#!/usr/bin/env bash
# Makes sure the Fashion-MNIST IDX files are present (Debian package dataset-fashion-mnist).
# Never fatal: without apt or network it says what to do and the tests that need the data skip.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's dataset-fashion-mnist into $dir ..."
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
    && exit 0
fi
echo "wildsight: Fashion-MNIST is missing from $dir and could not be installed here;" \
     "run 'sudo apt-get install dataset-fashion-mnist' or pass --data with the folder of the IDX files." >&2
exit 0
