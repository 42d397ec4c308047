#!/usr/bin/env bash
# End to end on a kind cluster: build the operator and trainer images, load them into kind, install
# the Helm chart, apply examples/cluster/ and wait until every LoRAExperiment has Succeeded.
#
#   e2e/kind/run.sh [--keep]
#
# Needs docker (with its daemon running), kind, kubectl and helm on PATH. Every kubectl and helm
# call names the kind cluster's context, so whatever your current context is stays untouched.
#
# Settings, from the environment (default in brackets):
#   KIND_CLUSTER_NAME    kind cluster to create, or to reuse if it exists  [loraplex-e2e]
#   KIND_NODE_IMAGE      node image of a new cluster, e.g. kindest/node:v1.33.1; the chart needs
#                        Kubernetes 1.30 or newer  [kind's default]
#   IMAGE_TAG            tag of both images built and loaded  [dev]
#   OPERATOR_IMAGE_REPO  operator image repository  [ghcr.io/loraplex/operator, the chart's image]
#   TRAINER_IMAGE_REPO   trainer image repository  [ghcr.io/loraplex/trainer, a pool's default]
#   SKIP_BUILD           1: do not build; use images already built under these names  [0]
#   RELEASE              Helm release name  [loraplex]
#   OPERATOR_NAMESPACE   namespace of the release  [loraplex-system]
#   NAMESPACE            namespace examples/cluster/ runs in  [loraplex-demo]
#   ROLLOUT_TIMEOUT      seconds to wait for the operator Deployment  [300]
#   WAIT_TIMEOUT         seconds to wait for every experiment to succeed  [1800]
#   POLL_SECONDS         seconds between two looks at the experiments  [15]
#   LOG_LINES            lines of operator and trainer logs shown on failure  [200]
#   KEEP                 1 (or --keep): keep the cluster at exit  [0]
#
# At exit, a cluster this run created is deleted when every experiment succeeded and kept when
# anything failed, so that you can look at it (`kind delete cluster --name ...` when done). A cluster
# that existed before is always kept. On failure the script prints `kubectl describe` of the
# resources and pods and the operator's and trainers' logs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CHART="$ROOT/charts/loraplex"
EXAMPLES="$ROOT/examples/cluster"

KIND_CLUSTER_NAME=${KIND_CLUSTER_NAME:-loraplex-e2e}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
IMAGE_TAG=${IMAGE_TAG:-dev}
OPERATOR_IMAGE_REPO=${OPERATOR_IMAGE_REPO:-ghcr.io/loraplex/operator}
TRAINER_IMAGE_REPO=${TRAINER_IMAGE_REPO:-ghcr.io/loraplex/trainer}
SKIP_BUILD=${SKIP_BUILD:-0}
RELEASE=${RELEASE:-loraplex}
OPERATOR_NAMESPACE=${OPERATOR_NAMESPACE:-loraplex-system}
NAMESPACE=${NAMESPACE:-loraplex-demo}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-300}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-1800}
POLL_SECONDS=${POLL_SECONDS:-15}
LOG_LINES=${LOG_LINES:-200}
KEEP=${KEEP:-0}

OPERATOR_IMAGE="$OPERATOR_IMAGE_REPO:$IMAGE_TAG"
TRAINER_IMAGE="$TRAINER_IMAGE_REPO:$IMAGE_TAG"
CONTEXT="kind-$KIND_CLUSTER_NAME"
# The chart names its objects <release>-loraplex, or just <release> when that already says loraplex.
if [[ $RELEASE == *loraplex* ]]; then DEPLOYMENT=$RELEASE; else DEPLOYMENT=$RELEASE-loraplex; fi
# The labels every trainer pod of a pool carries (loraplex_operator.render.selector_labels).
TRAINER_PODS=app.kubernetes.io/name=loraplex-trainer

CREATED_CLUSTER=0 # this run created the cluster: it may delete it
REUSED_CLUSTER=0  # the cluster existed: a previous run's objects may be in it
CLUSTER_UP=0      # there is a cluster to show diagnostics of

log() { printf '\n==> %s\n' "$*"; }
fail() { printf 'run.sh: %s\n' "$*" >&2; }
k() { kubectl --context "$CONTEXT" "$@"; }
show() {
	printf -- '\n--- %s\n' "$*"
	"$@" || true
}

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; }

parse_args() {
	local arg
	for arg in "$@"; do
		case $arg in
		--keep) KEEP=1 ;;
		-h | --help)
			usage
			exit 0
			;;
		*)
			fail "unknown argument $arg (try --help)"
			exit 2
			;;
		esac
	done
}

install_hint() {
	case $1 in
	docker) echo "https://docs.docker.com/get-docker/" ;;
	kind) echo "https://kind.sigs.k8s.io/docs/user/quick-start/#installation" ;;
	kubectl) echo "https://kubernetes.io/docs/tasks/tools/" ;;
	helm) echo "https://helm.sh/docs/intro/install/ (or .tools/bin/helm: python scripts/get_helm.py)" ;;
	esac
}

check_prerequisites() {
	local tool missing=0
	for tool in docker kind kubectl helm; do
		if ! command -v "$tool" >/dev/null 2>&1; then
			fail "$tool is missing: install it, see $(install_hint "$tool")"
			missing=1
		fi
	done
	if ((missing == 0)) && ! docker info >/dev/null 2>&1; then
		fail "docker is installed but its daemon does not answer: start Docker"
		missing=1
	fi
	if ((missing)); then exit 1; fi
}

build_images() {
	if [[ $SKIP_BUILD == 1 ]]; then
		log "SKIP_BUILD=1: using the images already built, $OPERATOR_IMAGE and $TRAINER_IMAGE"
		return
	fi
	log "building $OPERATOR_IMAGE"
	docker build -f "$ROOT/Dockerfile.operator" -t "$OPERATOR_IMAGE" "$ROOT"
	log "building $TRAINER_IMAGE (torch and vLLM: several GB, a while the first time)"
	docker build -f "$ROOT/Dockerfile.trainer" -t "$TRAINER_IMAGE" "$ROOT"
}

ensure_cluster() {
	local clusters
	clusters=$(kind get clusters 2>/dev/null)
	if grep -qxF -- "$KIND_CLUSTER_NAME" <<<"$clusters"; then
		log "reusing kind cluster $KIND_CLUSTER_NAME"
		REUSED_CLUSTER=1
	else
		log "creating kind cluster $KIND_CLUSTER_NAME"
		kind create cluster --name "$KIND_CLUSTER_NAME" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 180s
		CREATED_CLUSTER=1
	fi
	CLUSTER_UP=1
}

load_images() {
	log "loading the images into $KIND_CLUSTER_NAME"
	kind load docker-image --name "$KIND_CLUSTER_NAME" "$OPERATOR_IMAGE"
	kind load docker-image --name "$KIND_CLUSTER_NAME" "$TRAINER_IMAGE"
}

ensure_namespace() {
	k get namespace "$1" >/dev/null 2>&1 || k create namespace "$1"
}

install_operator() {
	# The chart creates the trainers' ServiceAccount in trainer.namespaces: the examples' namespace
	# must exist first.
	ensure_namespace "$NAMESPACE"
	if ((REUSED_CLUSTER)); then
		# Helm installs CRDs only once and never upgrades them (docs/install.md).
		log "applying the chart's CRDs to the reused cluster"
		k apply --server-side --force-conflicts -f "$CHART/crds/"
	fi
	log "installing the chart as release $RELEASE in $OPERATOR_NAMESPACE"
	# pullPolicy Never: the image kind loaded, or an error, never one pulled from a registry.
	helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" "$CHART" \
		--namespace "$OPERATOR_NAMESPACE" --create-namespace \
		--set "image.repository=$OPERATOR_IMAGE_REPO" \
		--set "image.tag=$IMAGE_TAG" \
		--set image.pullPolicy=Never \
		--set "trainer.namespaces={$NAMESPACE}"
	if ((REUSED_CLUSTER)); then
		# Same tag, maybe a new build: start the operator again on what kind loaded.
		k -n "$OPERATOR_NAMESPACE" rollout restart "deployment/$DEPLOYMENT"
	fi
	log "waiting for the operator Deployment $OPERATOR_NAMESPACE/$DEPLOYMENT"
	k -n "$OPERATOR_NAMESPACE" rollout status "deployment/$DEPLOYMENT" --timeout="${ROLLOUT_TIMEOUT}s"
}

apply_examples() {
	if ((REUSED_CLUSTER)); then
		# A finished experiment of an earlier run would count as this run's. Deleting the pool in the
		# foreground waits for its StatefulSet and pods to go, so the new ones start on the image
		# just loaded.
		log "deleting the previous run's experiments and pool in $NAMESPACE"
		k -n "$NAMESPACE" delete loraexperiments,sharedbasepools --all \
			--cascade=foreground --wait --timeout="${ROLLOUT_TIMEOUT}s"
	fi
	log "applying examples/cluster/ in $NAMESPACE"
	# Storage and reward code first, then the pool, then the experiments that name them.
	k -n "$NAMESPACE" apply -f "$EXAMPLES/storage.yaml" -f "$EXAMPLES/rewards.yaml"
	# The pool runs the trainer image built above: set it in the applied copy, not in the example.
	kubectl patch --local -f "$EXAMPLES/pool.yaml" --type merge -o yaml \
		-p "{\"spec\":{\"trainer\":{\"image\":\"$TRAINER_IMAGE\",\"imagePullPolicy\":\"Never\"}}}" |
		k -n "$NAMESPACE" apply -f -
	k -n "$NAMESPACE" apply -f "$EXAMPLES/experiments.yaml"
}

wait_for_experiments() {
	local deadline=$((SECONDS + WAIT_TIMEOUT)) listing name phase total succeeded failed summary
	log "waiting up to ${WAIT_TIMEOUT}s for every LoRAExperiment in $NAMESPACE to succeed"
	while true; do
		listing=$(k -n "$NAMESPACE" get loraexperiments \
			-o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.phase}{"\n"}{end}')
		total=0 succeeded=0 failed="" summary=""
		while read -r name phase; do
			[[ -n $name ]] || continue
			total=$((total + 1))
			case $phase in
			Succeeded) succeeded=$((succeeded + 1)) ;;
			Failed) failed="$failed $name" ;;
			esac
			summary="$summary $name=${phase:-(no status yet)}"
		done <<<"$listing"
		if ((total == 0)); then
			fail "no LoRAExperiments in namespace $NAMESPACE"
			return 1
		fi
		if [[ -n $failed ]]; then
			fail "failed:$failed"
			return 1
		fi
		if ((succeeded == total)); then
			log "all $total experiments succeeded"
			return 0
		fi
		if ((SECONDS >= deadline)); then
			fail "timed out after ${WAIT_TIMEOUT}s:$summary"
			return 1
		fi
		printf '%s/%s succeeded:%s\n' "$succeeded" "$total" "$summary"
		sleep "$POLL_SECONDS"
	done
}

dump_diagnostics() {
	log "diagnostics of $KIND_CLUSTER_NAME"
	show k -n "$NAMESPACE" get sharedbasepools,loraexperiments,pods,persistentvolumeclaims -o wide
	show k -n "$NAMESPACE" describe sharedbasepools,loraexperiments
	show k -n "$NAMESPACE" describe pods
	show k -n "$NAMESPACE" get events --sort-by=.lastTimestamp
	show k -n "$OPERATOR_NAMESPACE" describe pods
	show k -n "$OPERATOR_NAMESPACE" logs "deployment/$DEPLOYMENT" --all-containers --tail="$LOG_LINES"
	show k -n "$NAMESPACE" logs -l "$TRAINER_PODS" --all-containers --prefix --tail="$LOG_LINES"
	# A trainer that crashed and restarted: what it said before it died.
	show k -n "$NAMESPACE" logs -l "$TRAINER_PODS" --all-containers --prefix --previous --tail="$LOG_LINES"
}

on_exit() {
	local rc=$?
	trap - EXIT
	set +e
	if ((rc != 0 && CLUSTER_UP)); then dump_diagnostics; fi
	if ((CREATED_CLUSTER)) && [[ $KEEP != 1 ]] && ((rc == 0)); then
		log "deleting kind cluster $KIND_CLUSTER_NAME (KEEP=1 or --keep keeps it)"
		kind delete cluster --name "$KIND_CLUSTER_NAME"
	elif ((CLUSTER_UP)); then
		log "kept kind cluster $KIND_CLUSTER_NAME (kubectl --context $CONTEXT ...; kind delete cluster --name $KIND_CLUSTER_NAME)"
	fi
	exit "$rc"
}

main() {
	parse_args "$@"
	check_prerequisites
	trap on_exit EXIT
	build_images
	ensure_cluster
	load_images
	install_operator
	apply_examples
	wait_for_experiments
	log "results"
	k -n "$NAMESPACE" get sharedbasepools,loraexperiments -o wide
}

main "$@"
