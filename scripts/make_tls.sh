#!/usr/bin/env bash
# A small CA and a server certificate it signs, for HTTPS between the controller, the helpers and the
# snapshot servers of a lab or the demo. Idempotent: an existing CA is kept; the server certificate is
# remade only when it is missing, does not verify against the CA, names other addresses, or expires
# within 30 days.
#
#   scripts/make_tls.sh DIR [NAME...]    # NAME: IP addresses and DNS names (always 127.0.0.1, ::1, localhost)
#
# Writes DIR/ca.crt, DIR/ca.key, DIR/server.crt, DIR/server.key (keys mode 0600, DIR mode 0700).
# Clients verify with DIR/ca.crt (--ca-file, VIOLIN_CA_FILE, ca_file/api.ca_file); never copy ca.key.
set -euo pipefail

DIR="${1:?usage: make_tls.sh DIR [NAME...]}"
shift
command -v openssl >/dev/null || { echo "make_tls.sh: openssl is missing (apt-get install openssl)" >&2; exit 1; }
umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"

names=(127.0.0.1 ::1 localhost "$@")
san=""
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then entry="IP:$name"; else entry="DNS:$name"; fi
    [[ ",$san," == *",$entry,"* ]] || san="${san:+$san,}$entry"
done

if [[ ! -s $DIR/ca.crt || ! -s $DIR/ca.key ]]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=violin-snapshot lab CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
    rm -f "$DIR/server.crt"  # a new CA: the old server certificate no longer verifies
fi

current_san() { openssl x509 -in "$DIR/server.crt" -noout -ext subjectAltName 2>/dev/null | tail -n +2 |
    tr -d ' ' | sed 's/IPAddress:/IP:/g; s/0:0:0:0:0:0:0:1/::1/g'; }
if [[ -s $DIR/server.crt && -s $DIR/server.key ]] &&
    openssl verify -CAfile "$DIR/ca.crt" "$DIR/server.crt" >/dev/null 2>&1 &&
    openssl x509 -in "$DIR/server.crt" -noout -checkend $((30 * 86400)) >/dev/null &&
    [[ $(current_san) == "$san" ]]; then
    echo "make_tls.sh: $DIR/server.crt up to date ($san)"
    exit 0
fi

openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=violin-snapshot" \
    -keyout "$DIR/server.key.new" -out "$DIR/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" >"$DIR/server.ext"
openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -CAcreateserial -sha256 \
    -days 825 -extfile "$DIR/server.ext" -out "$DIR/server.crt.new" 2>/dev/null
mv "$DIR/server.key.new" "$DIR/server.key"
mv "$DIR/server.crt.new" "$DIR/server.crt"
rm -f "$DIR/server.csr" "$DIR/server.ext"
chmod 644 "$DIR/ca.crt" "$DIR/server.crt"
echo "make_tls.sh: made $DIR/server.crt for $san"
