#!/usr/bin/env bash
# The demo: a lab cluster built from network namespaces with mesh traffic.
set -euo pipefail
cat <<'MSG'
The lab cluster (deploy/lab) is not built yet: today the repository holds the foundation
(protocols, identity, CA, HBONE). Until the lab lands, see what runs:

  cargo test --workspace            # wire, identity and HBONE tests over loopback
  make bench                        # HBONE throughput and CONNECT rate over loopback
MSG
