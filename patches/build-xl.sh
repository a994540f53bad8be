#!/bin/bash
# Build Debian 12's xl with the patches of this directory applied: only the xl binary,
# against the system's libxl (libxen-dev), for a dom0 with Debian's Xen 4.17 packages.
#
#   patches/build-xl.sh            # -> $CACHE/out/xl and $CACHE/out/build-info.txt
#
# Source: Debian's source package `xen` at XEN_DEB_VERSION (default: the version the lab's
# dom0s run), fetched with `apt-get source` through the Debian archives this machine's apt
# is already configured for (their deb-src twins, in a private apt state: the system's
# apt configuration is not touched), then checked against the SHA-256 sums below. With
# XEN_SRC_DIR=DIR the three files are taken from DIR instead (offline), checked the same.
#
# Everything lands under CACHE (default ${XDG_CACHE_HOME:-~/.cache}/xen-remus-xl), never
# in the checkout. Needs: apt-get, dpkg-dev (dpkg-source), gcc, pkg-config, libxen-dev,
# libyajl-dev (the script says what is missing).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
XEN_DEB_VERSION=${XEN_DEB_VERSION:-4.17.5+72-g01140da4e8-1}
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xen-remus-xl}

# SHA-256 of the files of each known version (the .dsc lists them with its own sums).
# Another version: add its three sums here after checking them against the .dsc.
declare -A SHA256=(
    [xen_4.17.5+72-g01140da4e8-1.dsc]=f13956b67fb7a65707c2b0620d89b41ee5d203434dd7bb913017356791ee66c1
    [xen_4.17.5+72-g01140da4e8.orig.tar.xz]=53922f4d0a02c577f2ea9d63f65989cd88715779eebeed879ca1d314103ee06e
    [xen_4.17.5+72-g01140da4e8-1.debian.tar.xz]=5bcf3812c64585e270e0b3fa6ee8fd16dff7b9bc0f61375d648c64672484c4d9
)

die() { echo "build-xl: $*" >&2; exit 1; }

upstream=${XEN_DEB_VERSION%-*}
files=("xen_${XEN_DEB_VERSION}.dsc" "xen_${upstream}.orig.tar.xz"
       "xen_${XEN_DEB_VERSION}.debian.tar.xz")
for f in "${files[@]}"; do
    [[ -n ${SHA256[$f]:-} ]] || die "no checksum known for $f: XEN_DEB_VERSION" \
        "$XEN_DEB_VERSION is not one this script knows (see SHA256 in $0)"
done

missing=()
for t in apt-get dpkg-source gcc pkg-config patch; do
    command -v "$t" >/dev/null || missing+=("$t")
done
pkg-config --exists xenlight xlutil xentoollog 2>/dev/null || missing+=(libxen-dev)
pkg-config --exists yajl 2>/dev/null || missing+=(libyajl-dev)
if ((${#missing[@]})); then
    die "missing ${missing[*]}: apt-get install dpkg-dev build-essential pkg-config" \
        "libxen-dev libyajl-dev"
fi

dl=$CACHE/dl
mkdir -p "$dl"

have_all() {
    local f
    for f in "${files[@]}"; do [[ -f $dl/$f ]] || return 1; done
}

# The deb-src twin of each Debian 12 archive this machine's apt knows (bookworm,
# bookworm-updates, bookworm-security), as apt itself parsed its sources.
deb_src_lines() {
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg opt=""
    [[ -f $keyring ]] && opt="[signed-by=$keyring] "
    apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
            'Created-By: Packages' 'Origin: Debian' |
        awk -v opt="$opt" '$2 ~ /^bookworm(-updates|-security)?$/ {
            print "deb-src " opt $0 }' | sort -u
}

fetch() {
    local apt=$CACHE/apt
    rm -rf "$apt"
    mkdir -p "$apt/sources.list.d" "$apt/lists/partial" "$apt/cache/archives/partial"
    deb_src_lines > "$apt/sources.list.d/xen-remus-src.list"
    [[ -s $apt/sources.list.d/xen-remus-src.list ]] \
        || die "no Debian 12 (bookworm) archive in /etc/apt/sources*: put the three files" \
               "${files[*]} in a directory and run again with XEN_SRC_DIR=DIR"
    local opts=(-o "Dir::Etc::SourceList=/dev/null"
                -o "Dir::Etc::SourceParts=$apt/sources.list.d"
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    [[ $(id -u) == 0 ]] && opts+=(-o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" -q update >&2 || die "apt-get update of the deb-src archives failed"
    (cd "$dl" && apt-get "${opts[@]}" -q source --download-only "xen=$XEN_DEB_VERSION") >&2 \
        || die "apt-get source xen=$XEN_DEB_VERSION failed (is it still in the archive?" \
               "else use XEN_SRC_DIR)"
}

if [[ -n ${XEN_SRC_DIR:-} ]]; then
    for f in "${files[@]}"; do cp -f "$XEN_SRC_DIR/$f" "$dl/$f"; done
elif ! have_all; then
    fetch
fi
for f in "${files[@]}"; do
    got=$(sha256sum "$dl/$f" | cut -d' ' -f1)
    [[ $got == "${SHA256[$f]}" ]] || die "$dl/$f: SHA-256 $got, expected ${SHA256[$f]}" \
        "(remove it to fetch it again)"
done

# A fresh tree each time: Debian's own patches applied by dpkg-source, then ours.
src=$CACHE/src/xen-$XEN_DEB_VERSION
rm -rf "$src"
mkdir -p "$CACHE/src"
dpkg-source --no-copy -x "$dl/${files[0]}" "$src" >/dev/null 2>"$CACHE/src/dpkg-source.log" \
    || { cat "$CACHE/src/dpkg-source.log" >&2; die "dpkg-source -x failed"; }
while read -r p; do
    [[ -z $p || $p == \#* ]] && continue
    patch -d "$src" -p1 --forward --quiet < "$HERE/$p" || die "$p does not apply to $src"
done < "$HERE/series"

# What Debian's configure puts in tools/config.h for xl (its values for Debian 12:
# XENFIRMWAREDIR is /usr/lib/xen-4.17/boot; the rest as upstream on Linux).
major_minor=$(echo "$upstream" | cut -d. -f1,2)
obj=$CACHE/build
rm -rf "$obj"
mkdir -p "$obj/include/xen-tools" "$CACHE/out"
cp "$src/tools/include/xen-tools/libs.h" "$obj/include/xen-tools/"
cat > "$obj/include/config.h" <<EOF
#define XEN_CONFIG_DIR "/etc/xen"
#define XEN_SCRIPT_DIR "/etc/xen/scripts"
#define XEN_LOCK_DIR "/var/lock"
#define XEN_DUMP_DIR "/var/lib/xen/dump"
#define XENFIRMWAREDIR "/usr/lib/xen-$major_minor/boot"
#define HAVE_YAJL_YAJL_VERSION_H 1
EOF

# Xen's flags for tools/xl (Config.mk, tools/Rules.mk, tools/xl/Makefile). GCC 12 finds
# variables set but not used in Xen 4.17's own xl code: warned, not fatal.
CFLAGS=(-std=gnu99 -O2 -g -fno-strict-aliasing -fPIC -pthread
        -Wall -Wstrict-prototypes -Werror -Wno-error=unused-but-set-variable
        -Wno-format-zero-length -Wmissing-declarations -Wformat-nonliteral -Wshadow
        -D__XEN_TOOLS__ -D__XEN_INTERFACE_VERSION__=__XEN_LATEST_INTERFACE_VERSION__
        -D_FILE_OFFSET_BITS=64 -D_LARGEFILE_SOURCE -D_LARGEFILE64_SOURCE
        -I"$obj/include" -include "$obj/include/config.h")
read -ra PKG_CFLAGS <<< "$(pkg-config --cflags xenlight xlutil xentoollog yajl)"
read -ra PKG_LIBS <<< "$(pkg-config --libs xlutil xenlight xentoollog yajl)"
objs=()
for c in "$src"/tools/xl/*.c; do  # every file of tools/xl is xl's on x86
    o=$obj/$(basename "$c" .c).o
    gcc "${CFLAGS[@]}" "${PKG_CFLAGS[@]}" -c "$c" -o "$o" 2>>"$obj/warnings.log" \
        || { cat "$obj/warnings.log" >&2; die "compiling $(basename "$c") failed"; }
    objs+=("$o")
done
gcc -pthread -o "$CACHE/out/xl" "${objs[@]}" "${PKG_LIBS[@]}"

{
    echo "source: xen $XEN_DEB_VERSION (Debian source package)"
    for f in "${files[@]}"; do echo "  $f ${SHA256[$f]}"; done
    echo "patches:"
    while read -r p; do
        [[ -z $p || $p == \#* ]] && continue
        echo "  $p $(sha256sum "$HERE/$p" | cut -d' ' -f1)"
    done < "$HERE/series"
    echo "built against: libxen-dev $(dpkg-query -W -f='${Version}' libxen-dev 2>/dev/null ||
        echo '(not a Debian package)'), $(gcc --version | head -1)"
} > "$CACHE/out/build-info.txt"
echo "$CACHE/out/xl"
