#!/usr/bin/env bash
# Installs the Debian packages geolock needs to build and test, if they are missing:
# libclang-dev (RocksDB's bindings), protobuf-compiler and libprotobuf-dev (protoc and the well-known
# .proto files it imports, for the etcd-client crate's build),
# etcd-client (etcdctl, the reference client), etcd-server (etcd, for side-by-side tests) and
# iproute2 (`ip`, for the multi-region harness's network namespaces).
set -euo pipefail
need=()
for p in libclang-dev protobuf-compiler libprotobuf-dev etcd-client etcd-server iproute2; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts etcd as a service on install; our tests run their own on free ports.
if command -v systemctl >/dev/null 2>&1; then systemctl stop etcd >/dev/null 2>&1 || true; fi
pkill -x etcd >/dev/null 2>&1 || true
