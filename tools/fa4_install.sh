#!/usr/bin/env bash
# Install FlashAttention-4 (flash_attn.cute) on a GPU machine that has no package index, from
# wheels brought over in two parts (one transfer carries at most 64 MiB):
#   .whl/partA: six small wheels, the first split piece of the nvidia-cutlass-dsl-libs-cu13
#               wheel (*.whl.part00) and its sha256 (*.whl.sha256)
#   .whl/partB: the remaining split pieces (*.whl.part01, *.whl.part02)
#
#   bash tools/fa4_install.sh stage .whl/partA     # call 1: copy a part dir to $FA4_PARTS/partA
#   bash tools/fa4_install.sh install [DIR...]     # call 2: reassemble, check, install
#   export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
#
# install looks for wheels and pieces in $FA4_PARTS/partA, $FA4_PARTS/partB and every DIR given
# (e.g. .whl/partB when it travels with the call itself), cats the pieces back in order,
# checks the sha256, pip-installs every wheel with --no-deps --no-index --target $FA4_SITE,
# prints the PYTHONPATH to export and imports flash_attn.cute as a check.
# Environment: FA4_PARTS (default /tmp/fa4parts), FA4_SITE (default /tmp/fa4site),
# FA4_SKIP_PIP=1 (only reassemble and check: for a test on a machine without the platform).
set -euo pipefail
PARTS=${FA4_PARTS:-/tmp/fa4parts}
SITE=${FA4_SITE:-/tmp/fa4site}
PY=${PYTHON:-python3}
work=""
keep=0

die() { echo "fa4_install: $*" >&2; exit 1; }

stage() {
  [ $# -ge 1 ] || die "stage needs at least one part dir"
  mkdir -p "$PARTS"
  for d in "$@"; do
    [ -d "$d" ] || die "no such dir: $d"
    name=$(basename "$d")
    mkdir -p "$PARTS/$name"
    cp -f "$d"/* "$PARTS/$name/"
    echo "staged $d -> $PARTS/$name ($(du -sh "$PARTS/$name" | cut -f1))"
  done
}

install() {
  local dirs=("$PARTS/partA" "$PARTS/partB" "$@")
  work=$(mktemp -d "${TMPDIR:-/tmp}/fa4whl.XXXXXX")
  trap '[ "$keep" = 1 ] || rm -rf "$work"' EXIT
  local -a wheels=() shas=()
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/*.whl; do [ -e "$f" ] && wheels+=("$f"); done
    for f in "$d"/*.whl.sha256; do [ -e "$f" ] && shas+=("$f"); done
  done
  [ ${#shas[@]} -ge 1 ] || die "no *.whl.sha256 in ${dirs[*]}"
  for sha in "${shas[@]}"; do
    local big want got
    big=$(basename "$sha" .sha256)
    want=$(awk '{print $1}' "$sha")
    # every piece of this wheel, from any dir, in piece order (part00, part01, ...)
    mapfile -t pieces < <(for d in "${dirs[@]}"; do
        [ -d "$d" ] && for f in "$d/$big".part*; do [ -e "$f" ] && echo "$f"; done
      done | awk -F'.part' '{print $NF "\t" $0}' | sort -u -k1,1 | cut -f2-)
    [ ${#pieces[@]} -ge 1 ] || die "no pieces of $big"
    cat "${pieces[@]}" > "$work/$big"
    got=$(sha256sum "$work/$big" | awk '{print $1}')
    if [ "$got" != "$want" ]; then
      die "sha256 mismatch for $big from ${#pieces[@]} piece(s): got $got, want $want"
    fi
    echo "reassembled $big from ${#pieces[@]} piece(s), sha256 ok"
    wheels+=("$work/$big")
  done
  echo "wheels (${#wheels[@]}):"
  printf '  %s\n' "${wheels[@]##*/}"
  if [ "${FA4_SKIP_PIP:-0}" = 1 ]; then
    keep=1
    echo "FA4_SKIP_PIP=1: not installing; reassembled wheels are in $work"
    return 0
  fi
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "${wheels[@]}"
  local pp="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages"
  echo "installed into $SITE; before running the bench:"
  echo "export PYTHONPATH=$pp:\$PYTHONPATH"
  PYTHONPATH="$pp:${PYTHONPATH:-}" "$PY" -c \
    'import flash_attn.cute as m; from flash_attn.cute import flash_attn_func; print("import flash_attn.cute ok:", m.__file__)'
}

cmd=${1:-install}
[ $# -ge 1 ] && shift
case $cmd in
  stage) stage "$@" ;;
  install) install "$@" ;;
  *) die "usage: $0 stage DIR... | install [DIR...]" ;;
esac
