#!/usr/bin/env bash
# Makes the TLS fixtures of testkit::tls (handler-kit's and pipeline-bridge's client tests): a
# CA, a server certificate for 127.0.0.1 / localhost and a client certificate, all signed by that CA and valid for 100 years,
# plus a second CA that signed nothing (the wrong trust anchor). Test material only: the keys
# are committed on purpose and protect nothing.
#
# Usage: scripts/make-tls-fixtures.sh [DIR]   (default: shared/testkit/fixtures/tls)
set -euo pipefail
dir=${1:-shared/testkit/fixtures/tls}
mkdir -p "$dir"
cd "$dir"
days=36500
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days $days -subj "/CN=handler-kit test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" -out ca.pem

key other-ca.key
openssl req -x509 -new -key other-ca.key -sha256 -days $days -subj "/CN=unrelated CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" -out other-ca.pem

sign() { # name subject extensions
  key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days $days \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server "/CN=127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth
basicConstraints=critical,CA:FALSE"
sign client "/CN=pipeline-bridge-test" "extendedKeyUsage=clientAuth
basicConstraints=critical,CA:FALSE"
rm -f ca.srl ca.key other-ca.key
echo "TLS fixtures in $dir"
