#!/usr/bin/env bash
# Cut a file into pieces no larger than a transfer limit, and put it back together, sha256-checked.
#   pieces.sh split FILE DIR [MIB]   -> DIR/NAME.partNN (MIB MiB each, default 60), DIR/NAME.parts.sha256
#                                       (one line per piece) and DIR/NAME.sha256 (the whole file)
#   pieces.sh join DIR NAME OUTDIR   -> OUTDIR/NAME, after checking every piece and then the whole file
# The two .sha256 files are small: send them with the first piece (or with your code), the pieces one per
# transfer. A missing, short or corrupted piece stops `join` with the piece's name; nothing half-joined stays.
set -euo pipefail
case "${1:-}" in
  split)
    file=$2 dir=$3 mib=${4:-60}
    name=$(basename "$file")
    mkdir -p "$dir"
    rm -f "$dir/$name".part[0-9]*
    split -b "${mib}M" -d -a 2 "$file" "$dir/$name.part"
    (cd "$dir" && sha256sum "$name".part[0-9]* > "$name.parts.sha256")
    (cd "$(dirname "$file")" && sha256sum "$name") > "$dir/$name.sha256"
    echo "$file: $(wc -l < "$dir/$name.parts.sha256") pieces of at most $mib MiB in $dir"
    ;;
  join)
    dir=$2 name=$3 out=$4
    test -f "$dir/$name.parts.sha256" || { echo "$dir/$name.parts.sha256 is missing"; exit 3; }
    (cd "$dir" && sha256sum --quiet -c "$name.parts.sha256") || { echo "a piece of $name is missing or damaged (above)"; exit 3; }
    mkdir -p "$out"
    cut -d' ' -f3- "$dir/$name.parts.sha256" | sed "s|^|$dir/|" | xargs cat > "$out/$name.joining"
    mv "$out/$name.joining" "$out/$name"
    sed "s|  .*|  $name|" "$dir/$name.sha256" | (cd "$out" && sha256sum --quiet -c -) \
      || { rm -f "$out/$name"; echo "$name: the joined file does not match $dir/$name.sha256"; exit 3; }
    echo "$out/$name: joined from $(wc -l < "$dir/$name.parts.sha256") pieces, sha256 ok"
    ;;
  *) echo "usage: pieces.sh split FILE DIR [MIB] | pieces.sh join DIR NAME OUTDIR"; exit 2 ;;
esac
