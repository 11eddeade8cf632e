#!/usr/bin/env bash
# Fails if the tests left network namespaces, pod cgroups or mesh processes behind. Test
# namespaces are named m<pid><n><tag>; the lab's are prefixed by its own name.
set -uo pipefail
left_ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^m[0-9a-f]+' || true)
left_proc=$(pgrep -a -f "$(pwd)/target/.*/(ztunnel|mesh-control|mesh-cni|waypoint|mesh-lab)( |$)" || true)
# Pod cgroups: tests' roots are m<pid><n>..., test labs' mesh-lab-m<pid><n>...
cg=$(awk '{for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break }}' /proc/self/mountinfo | head -1)
left_cg=""
if [ -n "$cg" ]; then
  left_cg=$(find "$cg" -mindepth 1 -maxdepth 1 -type d -regextype egrep \
    -regex ".*/(mesh-lab-)?m[0-9a-f]+[a-z]*(-[0-9a-f]{8})?" 2>/dev/null || true)
fi
status=0
if [ -n "$left_cg" ]; then
  echo "tests left cgroups behind:"; echo "$left_cg"; status=1
fi
if [ -n "$left_ns" ]; then
  echo "tests left network namespaces behind:"; echo "$left_ns"; status=1
fi
if [ -n "$left_proc" ]; then
  echo "tests left processes behind:"; echo "$left_proc"; status=1
fi
exit $status
