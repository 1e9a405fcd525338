#!/usr/bin/env bash
# Resolve the lock files from their inputs and print what changed against the committed ones:
#   infra/lock/lock.sh [--upgrade] [OUT_DIR]
# Without --upgrade uv keeps every pinned version the inputs still allow, so an unchanged pyproject.toml
# changes nothing; --upgrade takes the newest versions they allow. OUT_DIR (default infra/lock) lets
# `make upgrade-check` resolve into a throwaway folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LOCKS=infra/lock
UV=.tools/bin/uv
upgrade=()
if [ "${1:-}" = --upgrade ]; then upgrade=(--upgrade); shift; fi
out="${1:-$LOCKS}"
mkdir -p "$out"
before="$(mktemp -d)"
trap 'rm -rf "$before"' EXIT

# pins FILE: one "name==version" line per locked package (a package locked twice under different markers,
# say for Python 3.11 and 3.12, gives two lines).
pins() { grep -oE '^[A-Za-z0-9][A-Za-z0-9._-]*==[^ ;\\]+' "$1" | sort -u; }

# compile LOCK INPUT... [-- UV OPTIONS]: a universal lock (every platform and supported Python) with the
# hashes of every file, so `uv pip sync --require-hashes` installs exactly what it names.
compile() {
	local lock="$1"
	shift
	cp "$LOCKS/$lock" "$before/$lock" 2>/dev/null || : >"$before/$lock"
	cp "$before/$lock" "$before/new-$lock" # the old pins are uv's preferences
	"$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" "${upgrade[@]}" -o "$before/new-$lock" "$@"
	# rewritten only when it changed: its date decides what `make setup` reinstalls
	cmp -s "$before/new-$lock" "$out/$lock" 2>/dev/null || cp "$before/new-$lock" "$out/$lock"
	local changes
	changes="$({ diff <(pins "$before/$lock") <(pins "$out/$lock") || :; } | { grep -E '^[<>]' || :; } |
		awk '{ split($2, p, "=="); if ($1 == "<") old[p[1]] = p[2]; else new[p[1]] = p[2] }
			END { for (n in old) print "  " n " " old[n] " -> " ((n in new) ? new[n] : "(removed)");
			      for (n in new) if (!(n in old)) print "  " n " (added) " new[n] }' | sort)"
	if [ -z "$changes" ]; then
		echo "$out/$lock: unchanged ($(pins "$out/$lock" | wc -l) packages)"
	else
		echo "$out/$lock: $(echo "$changes" | wc -l) changed"
		echo "$changes"
	fi
}

compile tools.txt "$LOCKS/tools.in"
compile project.txt pyproject.toml "$LOCKS/project.in" --all-extras
compile label-studio.txt "$LOCKS/label-studio.in"
