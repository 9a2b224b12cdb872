# shellcheck shell=bash
# Helpers sourced by the launchers (not run on its own).

# need VAR "what it is": exit with one line naming VAR when it is unset or empty.
need() { [[ -n ${!1:-} ]] || { echo "error: set $1 ($2)" >&2; exit 2; }; }

# quote ARGS...: one line a shell reads back as ARGS (words bare when safe, else single-quoted).
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# run CMD...: run it, or with DRY_RUN set, print it (quoted) and do nothing.
run() {
  if [[ -n ${DRY_RUN:-} ]]; then quote "$@"; else "$@"; fi
}
