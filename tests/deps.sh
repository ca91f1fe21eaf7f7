#!/usr/bin/env bash
# Installs the Debian packages geolock needs to build and test, if they are missing:
# libclang-dev (RocksDB's bindings), protobuf-compiler and libprotobuf-dev (protoc and the well-known
# .proto files it imports, for the etcd-client crate's build),
# etcd-client (etcdctl, the reference client), etcd-server (etcd, for side-by-side tests),
# iproute2 (`ip`, for the multi-region harness's network namespaces), python3 (the programs
# the partition tests' lock holders run), bind9 (named, the DNS server the failover controller
# updates), bind9-dnsutils (dig, to read what named serves independently of our own reader),
# prometheus (promtool, which checks the /metrics exposition and unit-tests the alert rules, and the
# server, which evaluates them against a live cluster), chromium (a real browser for the cluster page) and
# openssl (RSA keys for the JWT tests; ring signs with RSA but makes no RSA keys).
set -euo pipefail
need=()
for p in libclang-dev protobuf-compiler libprotobuf-dev etcd-client etcd-server iproute2 python3 bind9 bind9-dnsutils prometheus chromium openssl; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Debian starts etcd as a service on install; the tests run their own on free ports, and no
  # service is wanted. policy-rc.d (Debian's invoke-rc.d policy hook) keeps packages from
  # starting services while they install; one already there is left as it is.
  policy=/usr/sbin/policy-rc.d
  placed=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && placed=1
  fi
  trap '[ -n "$placed" ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
