#!/usr/bin/env bash
# Fetches the Emoji-CLDR sources from the npm registry with `npm pack` at pinned versions, checks
# each tarball against its pinned sha512 integrity and extracts only what `duet-train emoji`
# reads into .data/emoji-src/<package>/package/...:
#   emoji-datasource-google   Noto Emoji art (Apache-2.0): emoji.json, LICENSE, img/google/64/
#   emoji-datasource-twitter  Twemoji art (CC-BY-4.0):     emoji.json, LICENSE, img/twitter/64/
#   cldr-annotations-full, cldr-annotations-derived-full   CLDR English names and keywords
# The Apple and Facebook art is never fetched (not licensed for this use).
# Idempotent: a package already extracted at the pinned version is left alone.
# Usage: scripts/fetch-emoji.sh [DEST]   (default: .data/emoji-src in the repository)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${DUET_EMOJI_SRC:-$root/.data/emoji-src}}

# name version sha512-integrity (as the registry publishes it) and the paths to extract
packages=(
  "emoji-datasource-google 16.0.0 sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A== package/emoji.json package/LICENSE package/img/google/64"
  "emoji-datasource-twitter 16.0.0 sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ== package/emoji.json package/LICENSE package/img/twitter/64"
  "cldr-annotations-full 48.2.0 sha512-DV7A+rEcgUSNTRsVGNGqBZRmAkGfwhGHO5Q1dRwzBoBnVrHWp804JP7/QJdEc66iHmx3+zLWVIMCFLm0lW7PUQ== package/LICENSE package/annotations/en/annotations.json"
  "cldr-annotations-derived-full 48.2.0 sha512-log62km+AOzI7n/NEuNNFV0mg9DWnt67EYCh1RwxZq9dyRuyteB586LT83Ke8TchEfnwI9cIk2P31zO4nTvZmw== package/LICENSE package/annotationsDerived/en/annotations.json"
)

command -v npm >/dev/null || { echo "npm not found: install Node.js (apt-get install nodejs npm)" >&2; exit 1; }
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for entry in "${packages[@]}"; do
  read -r -a fields <<<"$entry"
  name=${fields[0]} version=${fields[1]} integrity=${fields[2]}
  paths=("${fields[@]:3}")
  out="$dest/$name"
  if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$version" ]; then
    echo "$name@$version already in $out"
    continue
  fi
  (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
  tgz="$tmp/$name-$version.tgz"
  got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
  if [ "$got" != "$integrity" ]; then
    echo "$name@$version: integrity $got does not match the pinned $integrity" >&2
    exit 1
  fi
  rm -rf "$out.partial"
  mkdir -p "$out.partial"
  tar xzf "$tgz" -C "$out.partial" "${paths[@]}"
  echo "$version" > "$out.partial/VERSION"
  # Rename into place last, so an interrupted fetch never looks complete.
  rm -rf "$out"
  mv "$out.partial" "$out"
  rm -f "$tgz"
  echo "$name@$version extracted into $out"
done
