#!/usr/bin/env bash
# KITT agent installer, served by a KITT server at /api/v1/agent/install.sh.
#
#   curl -fsS --cacert ca.pem https://SERVER:8080/api/v1/agent/install.sh \
#     | KITT_BOOTSTRAP_TOKEN=… bash -s -- --cacert ca.pem [--name N] [--port P] [--service]
#
# `kitt agents add` on the server prints this line ready to paste, with a fresh
# single-use token, and a second form that pins the fleet CA by its fingerprint.
#
# What it does, in order, stopping with a clear message at the first problem:
#   1. checks for Python >= 3.10 with the venv module, and curl;
#   2. trusts the fleet CA (--cacert FILE, or --ca-fingerprint: fetched, then checked);
#   3. downloads the agent wheel from the server and checks its SHA-256;
#   4. creates $KITT_HOME/agent-venvs/<version>-<hash> (KITT_HOME defaults to ~/.kitt)
#      and installs the wheel there; dependencies come from the server's wheelhouse
#      when it has one (no other network needed), else from the usual pip index;
#   5. hands over to the new agent (`kitt-agent activate`): preflight checks,
#      enrollment with the bootstrap token (kept identity on a re-run), then
#      $KITT_HOME/agent-venv is pointed at the new venv and the agent (or, with
#      --service, its systemd service) is (re)started.
# A failure undoes what this run did: the new venv is removed, and the agent's
# previous config, certificates, venv link and daemon are put back as they were.
# This file holds no secrets and fetching it changes nothing on the server.
set -euo pipefail
umask 022

server='@KITT_SERVER_URL@'
# The token is best given in the environment (`KITT_BOOTSTRAP_TOKEN=… bash …`, as
# `kitt agents add` prints it): a command line is readable by every user of the machine.
token="${KITT_BOOTSTRAP_TOKEN:-}"
unset KITT_BOOTSTRAP_TOKEN
python_bin="${KITT_PYTHON:-python3}"
name=""
port=""
bind=""
service=0
unit_name=""
cacert=""
fingerprint=""

say() { printf 'kitt install: %s\n' "$*" >&2; }
die() {
    printf 'kitt install: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    cat <<'EOF'
usage: curl -fsS --cacert ca.pem https://SERVER:8080/api/v1/agent/install.sh | bash -s -- [options]
  --token T              single-use bootstrap token; better: KITT_BOOTSTRAP_TOKEN=T in the
                         environment (a command line is visible to every user)
  --cacert FILE          the fleet CA (kitt server ca > ca.pem)
  --ca-fingerprint FP    or: fetch the CA and trust it only with this SHA-256 fingerprint
  --name N  --port P  --bind ADDR   the agent's name, port and listen address
  --service              install and start the systemd service instead of a plain daemon
  --unit-name U          systemd unit name (default kitt-agent)
  --server URL           the KITT server (default: the one this script came from)
  --python PATH          the Python 3.10+ to build the agent's venv with (default python3)
EOF
}
value() {
    [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
    printf '%s' "$2"
}

# Everything runs from main, called on the last line: a download cut short by the
# network cannot run half a script.
main() {
while [ "$#" -gt 0 ]; do
    case "$1" in
    --token) token=$(value "$@"); shift 2 ;;
    --name) name=$(value "$@"); shift 2 ;;
    --port) port=$(value "$@"); shift 2 ;;
    --bind) bind=$(value "$@"); shift 2 ;;
    --service) service=1; shift ;;
    --unit-name) unit_name=$(value "$@"); shift 2 ;;
    --cacert) cacert=$(value "$@"); shift 2 ;;
    --ca-fingerprint) fingerprint=$(value "$@"); shift 2 ;;
    --server) server=$(value "$@"); shift 2 ;;
    --python) python_bin=$(value "$@"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (options: --token --name --port --bind --service --unit-name --cacert --ca-fingerprint --server --python)" ;;
    esac
done

case "$server" in
https://* | http://*) ;;
*) die "no server URL: pass --server https://HOST:PORT" ;;
esac
server="${server%/}"
[ -n "${KITT_HOME:-}" ] || [ -n "${HOME:-}" ] || die "neither KITT_HOME nor HOME is set"
home="${KITT_HOME:-$HOME/.kitt}"
case "$home" in /*) ;; *) home="$PWD/$home" ;; esac
export KITT_HOME="$home"

# --- 1. what this machine must have --------------------------------------------------
command -v curl >/dev/null 2>&1 || die "curl is not installed"
command -v "$python_bin" >/dev/null 2>&1 ||
    die "no '$python_bin' found: install Python 3.10 or newer, or pass --python PATH"
pyver=$("$python_bin" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) ||
    die "'$python_bin' does not run"
"$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
    die "KITT needs Python 3.10 or newer, and $python_bin is $pyver: install a newer Python and pass --python PATH"
"$python_bin" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
    die "$python_bin $pyver cannot create virtual environments: install its venv module (Debian/Ubuntu: apt-get install python${pyver%.*}-venv)"

stage=$(mktemp -d "${TMPDIR:-/tmp}/kitt-install.XXXXXX")
new_venv=""
new_home=""
[ -e "$home" ] || new_home="$home"
cleanup() {
    rc=$?
    rm -rf "$stage"
    [ "$rc" -eq 0 ] && return
    # Interrupted after the switch (Ctrl-C while pruning): the new venv is in use now.
    if [ -n "$new_venv" ] && [ "$(readlink -f "$home/agent-venv" 2>/dev/null)" = "$(readlink -f "$new_venv")" ]; then
        return
    fi
    if [ -n "$new_home" ] && [ -d "$new_home" ]; then
        rm -rf "$new_home" # made by this run, so nothing else is in it
        say "removed $new_home again"
    elif [ -n "$new_venv" ]; then
        rm -rf "$new_venv"
        rmdir "$home/agent-venvs" 2>/dev/null || true # only if this run made it
        say "removed the unfinished $new_venv"
    fi
}
trap cleanup EXIT

# --- 2. trust ----------------------------------------------------------------------
curl_args=(-fsS --max-time 600 --retry 2 --proto '=https,http')
if [ "${server#https://}" != "$server" ]; then
    if [ -n "$cacert" ]; then
        [ -r "$cacert" ] || die "cannot read --cacert $cacert"
        cp "$cacert" "$stage/ca.pem"
    elif [ -n "$fingerprint" ]; then
        # Fetched without verification, then trusted only if it has the fingerprint the
        # operator copied from `kitt server ca --fingerprint` (or `kitt agents add`).
        curl "${curl_args[@]}" --insecure -o "$stage/ca.pem" "$server/api/v1/ca.pem" ||
            die "cannot fetch the fleet CA from $server (is the server running and reachable?)"
    elif [ -r "$home/certs/ca.pem" ]; then
        cp "$home/certs/ca.pem" "$stage/ca.pem"
        say "trusting the fleet CA this agent already has ($home/certs/ca.pem)"
    else
        die "$server is HTTPS: pass --cacert ca.pem (on the server: kitt server ca > ca.pem) or --ca-fingerprint SHA256 (kitt server ca --fingerprint)"
    fi
    # Exactly one certificate, checked, then written back from the checked bytes alone:
    # a second certificate riding along would otherwise be trusted by curl unchecked.
    got=$("$python_bin" - "$stage/ca.pem" "$fingerprint" <<'PY'
import hashlib, re, ssl, sys
path, pin = sys.argv[1], sys.argv[2]
try:
    text = open(path, encoding="ascii").read()
except (OSError, UnicodeDecodeError):
    text = ""
count = text.count("-----BEGIN CERTIFICATE-----")
if count > 1:  # counted first: parsing such a file fails at random, or reads the first
    print("a file with %d certificates, not one CA certificate" % count)
    sys.exit(1)
try:
    der = ssl.PEM_cert_to_DER_cert(text)
except ValueError:
    print("not a PEM certificate")
    sys.exit(1)
got = ":".join("%02X" % b for b in hashlib.sha256(der).digest())
print(got)
want = re.sub(r"[^0-9a-fA-F]", "", re.sub(r"(?i)^sha-?256[:/=]?", "", pin.strip()))
if pin and got.replace(":", "") != want.upper():
    sys.exit(2)
open(path, "w", encoding="ascii").write(ssl.DER_cert_to_PEM_cert(der))
PY
    ) || {
        case $? in
        2) die "the CA served by $server has fingerprint $got, not the expected $fingerprint: refusing to trust it (wrong server, or someone in between)" ;;
        *) die "refusing the fleet CA: it is $got" ;;
        esac
    }
    say "trusting the fleet CA with SHA-256 fingerprint $got"
    curl_args+=(--cacert "$stage/ca.pem")
fi

fetch() { # URL-path output-file what
    local rc=0
    curl "${curl_args[@]}" -o "$2" "$server$1" 2>"$stage/curl.err" || rc=$?
    [ "$rc" -eq 0 ] && return 0
    case "$rc" in
    35 | 51 | 58 | 60 | 77 | 83 | 90 | 91)
        die "cannot fetch $3: the TLS certificate of $server is not trusted with the given CA ($(tr -d '\n' <"$stage/curl.err"))" ;;
    22) die "cannot fetch $3: $server answered $(tr -d '\n' <"$stage/curl.err")" ;;
    *) die "cannot fetch $3 from $server ($(tr -d '\n' <"$stage/curl.err"))" ;;
    esac
}

# --- 3. the wheel --------------------------------------------------------------------
fetch /api/v1/agent/package.json "$stage/package.json" "the package description"
read -r version filename sha256 wheelhouse < <("$python_bin" - "$stage/package.json" <<'PY'
import json, re, sys
try:
    meta = json.load(open(sys.argv[1], encoding="utf-8"))
    version, filename, sha = meta["version"], meta["filename"], meta["sha256"]
    wheelhouse = "yes" if meta.get("wheelhouse") else "no"
except (ValueError, KeyError, TypeError):
    sys.exit(1)
ok = (re.fullmatch(r"[A-Za-z0-9.+!_-]{1,64}", version)
      and re.fullmatch(r"kitt_fleet-[A-Za-z0-9.+!_-]{1,100}\.whl", filename)
      and re.fullmatch(r"[0-9a-f]{64}", sha))
if not ok:
    sys.exit(1)
print(version, filename, sha, wheelhouse)
PY
) || die "the server's package description is not what this installer expects"
[ -n "${sha256:-}" ] || die "the server's package description is not what this installer expects"
fetch /api/v1/agent/package "$stage/$filename" "the agent package"
got=$("$python_bin" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$stage/$filename")
[ "$got" = "$sha256" ] ||
    die "the agent package from $server has SHA-256 $got, not the $sha256 the server announced: refusing to install it (corrupted or tampered with in transit)"
say "downloaded $filename (SHA-256 $sha256)"

# --- 4. the venv ---------------------------------------------------------------------
venv="$home/agent-venvs/$version-${sha256:0:12}"
if [ -f "$venv/.kitt-installed" ] && [ -x "$venv/bin/kitt-agent" ]; then
    say "kitt $version is already installed in $venv"
else
    mkdir -p "$home/agent-venvs"
    chmod 700 "$home" 2>/dev/null || true
    rm -rf "$venv"
    new_venv="$venv"
    "$python_bin" -m venv "$venv" || die "could not create the virtual environment $venv"
    pip_args=(install --quiet --disable-pip-version-check --no-input)
    if [ "$wheelhouse" = yes ]; then
        pip_args+=(--no-index --find-links "$server/api/v1/agent/wheels/")
        [ -f "$stage/ca.pem" ] && pip_args+=(--cert "$stage/ca.pem")
        say "installing kitt $version and its dependencies from $server"
    else
        say "installing kitt $version (dependencies from your pip index)"
    fi
    "$venv/bin/python" -m pip "${pip_args[@]}" "$stage/$filename" ||
        die "pip could not install kitt $version into $venv (see the messages above)"
    printf '%s\n' "$sha256" >"$venv/.kitt-installed"
fi

# --- 5. hand over to the new agent ---------------------------------------------------
activate=(activate --venv "$venv" --server "$server")
[ -f "$stage/ca.pem" ] && activate+=(--ca "$stage/ca.pem")
[ -n "$name" ] && activate+=(--name "$name")
[ -n "$port" ] && activate+=(--port "$port")
[ -n "$bind" ] && activate+=(--bind "$bind")
[ -n "$unit_name" ] && activate+=(--unit-name "$unit_name")
[ "$service" -eq 1 ] && activate+=(--service)
# The token travels in the environment, not on a command line other users can read.
KITT_BOOTSTRAP_TOKEN="$token" KITT_HOME="$home" "$venv/bin/kitt-agent" "${activate[@]}" </dev/null ||
    die "the agent was not activated (see above); the previous installation, if any, is as it was"
new_venv=""
new_home=""
}

main "$@"
