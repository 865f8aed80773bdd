#!/usr/bin/env bash
# Fetches the training corpus: the King James Version of the Bible as Debian packages it
# (bible-kjv-text, the text; bible-kjv, the program that reads it), and dumps it to
# OUT/kjv.txt, one verse per line ("Ge1:1 In the beginning ..."), with the package's
# copyright file beside it. The KJV text is public domain (Debian's copyright file: "The
# copyright for the King James Version text of the Bible is expired"); see
# docs/training.md for the licence notes.
#
#   scripts/train/corpus.sh [OUT]        # default .dev/train/corpus
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.dev/train/corpus}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download bible-kjv-text bible-kjv >/dev/null 2>&1) || {
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    (cd "$work" && apt-get download bible-kjv-text bible-kjv)
}
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
"$work/root/usr/bin/bible" -f -p "$work/root/usr/lib" "gen1:1-rev22:21" > "$OUT/kjv.txt"
cp "$work/root/usr/share/doc/bible-kjv-text/copyright" "$OUT/COPYRIGHT.bible-kjv-text"
ls "$work"/*.deb | xargs -n1 basename > "$OUT/packages.txt"
n=$(wc -l < "$OUT/kjv.txt")
[ "$n" -eq 31102 ] || { echo "expected 31102 verses, got $n" >&2; exit 1; }
sha256sum "$OUT/kjv.txt" | tee "$OUT/kjv.sha256"
echo "wrote $OUT/kjv.txt ($n verses)"
