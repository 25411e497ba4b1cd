#!/usr/bin/env bash
# Put the golden set into the checkout: fetch_golden.sh SOURCE DEST  (PYTHON: an interpreter with torch and numpy)
# SOURCE: a directory holding the set (the repository's golden/tiny-seed1 by default), or an http(s) URL of a
# .tar.gz whose top folder holds it. A file the source leaves out because it can be regenerated exactly
# (rand_noise.npy) is written again here; then every file is checked against the set's own SHA256SUMS, which lists
# them as the reference run wrote them. An existing complete copy is kept.
set -euo pipefail
src=${1:?usage: fetch_golden.sh SOURCE DEST}; dest=${2:?usage: fetch_golden.sh SOURCE DEST}
py=${PYTHON:-python3}
if [ -f "$dest/SHA256SUMS" ] && (cd "$dest" && sha256sum --quiet -c SHA256SUMS) 2>/dev/null; then
  exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
case "$src" in
  http://*|https://*)
    echo "golden: downloading $src"
    curl -fsSL "$src" | tar -xz -C "$tmp"
    set -- "$tmp"/*/SHA256SUMS; [ -f "$1" ] || { echo "golden: $src has no <folder>/SHA256SUMS" >&2; exit 1; }
    from=$(dirname "$1") ;;
  *)
    [ -f "$src/SHA256SUMS" ] || { echo "golden: no golden set at '$src' (set GOLDEN_SOURCE to its folder or a .tar.gz URL)" >&2; exit 1; }
    from=$tmp/set; cp -r "$src" "$from"; chmod -R u+w "$from" ;;
esac
if [ ! -f "$from/rand_noise.npy" ]; then
  # The reference's set_all_random_seed(0); torch.randn([1, 80, 15000]) (the flow's fixed noise), as numpy.save wrote it.
  "$py" -c 'import sys, numpy, torch
numpy.save(sys.argv[1], torch.randn(1, 80, 15000, generator=torch.Generator().manual_seed(0)).numpy())' \
    "$from/rand_noise.npy"
fi
(cd "$from" && sha256sum --quiet -c SHA256SUMS) || { echo "golden: $src fails its SHA256SUMS" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"; rm -rf "$dest"; cp -r "$from" "$dest"; chmod -R u+w "$dest"
echo "golden: $dest ($(du -sh "$dest" | cut -f1))"
