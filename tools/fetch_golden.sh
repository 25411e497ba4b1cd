#!/usr/bin/env bash
# Put the golden set into the checkout: fetch_golden.sh SOURCE DEST
# SOURCE: a directory holding the set, or an http(s) URL of a .tar.gz whose top folder holds it.
# The copy is checked against the set's own SHA256SUMS; an existing complete copy is kept.
set -euo pipefail
src=${1:?usage: fetch_golden.sh SOURCE DEST}; dest=${2:?usage: fetch_golden.sh SOURCE DEST}
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
    from=$src ;;
esac
(cd "$from" && sha256sum --quiet -c SHA256SUMS) || { echo "golden: $src fails its SHA256SUMS" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"; rm -rf "$dest"; cp -r "$from" "$dest"; chmod -R u+w "$dest"
echo "golden: $dest ($(du -sh "$dest" | cut -f1))"
