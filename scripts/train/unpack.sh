#!/usr/bin/env bash
# Reassembles the models.tar.part-* pieces written by scripts/train/run.sh and extracts them.
#
# Why it exists: the GPU host's results come back as 15 MiB pieces; this checks them against
# models.tar.sha256 (when present) and unpacks hunyuan-tiny-draft/ and hunyuan-tiny/ into DEST.
#
#   scripts/train/unpack.sh PARTS_DIR DEST        # e.g. scripts/train/unpack.sh /tmp/out .dev/train/models
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 PARTS_DIR DEST" >&2; exit 2; }
PARTS=$1
DEST=$2
ls "$PARTS"/models.tar.part-* >/dev/null 2>&1 || { echo "no $PARTS/models.tar.part-* files" >&2; exit 1; }
if [ -f "$PARTS/models.tar.sha256" ]; then
    want=$(awk '{print $1}' "$PARTS/models.tar.sha256")
    got=$(cat "$PARTS"/models.tar.part-* | sha256sum | awk '{print $1}')
    [ "$want" = "$got" ] || { echo "checksum mismatch: $got, expected $want" >&2; exit 1; }
    echo "checksum ok ($got)"
fi
mkdir -p "$DEST"
cat "$PARTS"/models.tar.part-* | tar -xf - -C "$DEST"
for d in hunyuan-tiny-draft hunyuan-tiny; do
    [ -d "$DEST/$d" ] && echo "$DEST/$d: $(ls "$DEST/$d" | tr '\n' ' ')"
done
