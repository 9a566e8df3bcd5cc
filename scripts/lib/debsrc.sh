# Shared by scripts/setup.sh, install_criu.sh and install_qemu.sh (source it; set TOOL and LOG first):
# logging helpers and Debian source packages fetched through a PRIVATE apt configuration
# (own sources list, lists and cache dirs), so no suite is ever added to the machine's sources.

say() { echo "[$TOOL] $*"; }
die() { echo "[$TOOL] ERROR: $*" >&2; exit 1; }

# Run a command with its output appended to $LOG; on failure show the log tail and stop.
run() {
    local rc=0
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || rc=$?
    if ((rc != 0)); then
        echo "[$TOOL] ERROR: command failed (exit $rc): $*" >&2
        echo "[$TOOL] ---- last 40 lines of $LOG ----" >&2
        tail -n 40 "$LOG" >&2
        exit "$rc"
    fi
}

sha256_of() { sha256sum "$1" | awk '{ print $1 }'; }

# Install the packages of "$@" that are missing, from the machine's own sources.
install_missing() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        run apt-get update
        run apt-get install -y --no-install-recommends "${missing[@]}"
    else
        say "Debian packages present"
    fi
}

machine_codename() {
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    echo "${codename:-bookworm}"
}

# Debian mirror URI the machine uses for suite $1 (e.g. bookworm, bookworm-security),
# read from deb822 *.sources files first, then from one-line *.list files.
debian_mirror() {
    local codename="$1" f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uri=$(awk -v want="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    p = index(line, ":"); if (p == 0) continue
                    key = tolower(substr(line, 1, p - 1))
                    val = substr(line, p + 1)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled ~ /no/) next
                if ((" " types " ") !~ /[ \t]deb[ \t]/) next
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == want) {
                    split(uris, u, /[ \t]+/)
                    for (k = 1; k in u; k++) if (u[k] != "") { print u[k]; exit }
                }
            }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        # deb [options] URI SUITE COMPONENTS...
        uri=$(sed -E 's/\[[^]]*\]//' "$f" | awk -v want="$codename" \
            '$1 == "deb" && $3 == want { print $2; exit }')
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    return 1
}

# private_apt DIR SUITE[=OF]...: an apt configuration in DIR holding a deb-src line for each SUITE at
# the mirror the machine uses for suite OF (default: SUITE itself; a suite without one is skipped),
# then updated. E.g. "sid=bookworm": sid's sources from the machine's bookworm mirror.
# Sets the array PRIVATE_APT (options for apt-get/apt-cache) and DOWNLOAD_DIR.
private_apt() {
    local dir="$1" arg suite mirror lines=""
    shift
    for arg in "$@"; do
        suite=${arg%%=*}
        mirror=$(debian_mirror "${arg#*=}") || continue
        lines+="deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"$'\n'
    done
    [[ -n $lines ]] || die "no 'deb' entry for any of the suites $* in /etc/apt/sources.list{,.d/*}"
    rm -rf "$dir"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/download"
    chmod -R 0755 "$dir"
    # let apt's unprivileged download user (_apt) write where it downloads to
    if id _apt >/dev/null 2>&1; then
        chown _apt "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/download"
    fi
    printf '%s' "$lines" >"$dir/sources.list"
    PRIVATE_APT=(
        -o "Dir::Etc::SourceList=$dir/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache=$dir/cache"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
    )
    DOWNLOAD_DIR="$dir/download"
    run apt-get "${PRIVATE_APT[@]}" update
}
