#!/usr/bin/env bash
# Fails if the tests left network namespaces or mesh processes behind. Test namespaces
# are named m<pid><n><tag>; the lab's are prefixed by its own name.
set -uo pipefail
left_ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^m[0-9a-f]+' || true)
left_proc=$(pgrep -a -f "$(pwd)/target/.*/(ztunnel|mesh-control|mesh-cni|waypoint|mesh-lab)( |$)" || true)
status=0
if [ -n "$left_ns" ]; then
  echo "tests left network namespaces behind:"; echo "$left_ns"; status=1
fi
if [ -n "$left_proc" ]; then
  echo "tests left processes behind:"; echo "$left_proc"; status=1
fi
exit $status
