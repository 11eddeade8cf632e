#!/usr/bin/env bash
# Installs the Debian packages the tests and the lab need, only those that are missing.
# Needs root (apt). The Rust toolchain itself must already be installed (rustup).
set -euo pipefail

packages=(
  containernetworking-plugins # bridge, host-local, loopback: the reference CNI plugins
  nftables                    # nft, for reading rulesets back in tests
  iproute2                    # ip netns, veth, rules, routes
  iperf3                      # throughput in the lab and benchmarks
  nghttp2-client              # h2load
  haproxy                     # the L7 proxy the waypoint is measured against (mesh-lab bench)
  curl
  prometheus                  # the lab's metrics store (mesh-lab up --observe), queried by meshctl stat/top
  chromium                    # headless browser driving the dashboard test
  tcpdump                     # captures proving only TLS crosses the fabric
  make
  unzip                       # helm ships as a static binary inside an npm package's zip
  python3-venv                # kubernetes-validate, the offline schema check of the chart
  dnsutils                    # dig: a real DNS client for the DNS proxy's lab test
  dnsmasq-base                # the upstream resolver that test runs inside the lab
)

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install Rust first: https://rustup.rs (then re-run)." >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing packages (${missing[*]}) and not root: run as root or install them with apt." >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
