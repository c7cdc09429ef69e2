#!/usr/bin/env bash
# Train cxrjax on AWS spot g5.24xlarge instances as a SkyPilot managed job: SkyPilot finds
# capacity (zones, then regions), recovers a preempted job, and keeps its logs.
#
#   g5_24xlarge.sh up [--config FILE] [--KEY value ...] [--dry-run]   launch the run (sky jobs launch)
#   g5_24xlarge.sh status|logs|down [--config FILE] [--KEY value ...]  sky jobs queue|logs|cancel, and done.json
#                                               (logs --follow: new lines until the job ends)
#   g5_24xlarge.sh cost [--config FILE] [--KEY value ...]             $/hour and $/epoch of what was launched
#   g5_24xlarge.sh iam-policy|iam-setup [--config FILE] [--dry-run]    the job nodes' IAM role
#   g5_24xlarge.sh sky-config [--config FILE]                          the run's SkyPilot config
#   g5_24xlarge.sh run --config FILE                                   on the node (SkyPilot's run step)
#   g5_24xlarge.sh watch-spot --pid PID                                the interruption watcher
#
# Settings are KEY=VALUE lines in a config file (read as data, never sourced; see
# launch/example.env) or --key-name value flags, flags winning. Credentials never go there:
# SkyPilot and the AWS CLI take them from their environment or credential files, the wandb
# key lives in SSM Parameter Store and only the job's nodes read it.
set -euo pipefail
shopt -s inherit_errexit

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
readonly SCRIPT_DIR REPO_DIR

# Every key a config file or flag may set. Anything else, credentials above all, is refused.
readonly KEYS="S3_PREFIX REGION REGIONS RUN_CONFIG NODES INSTANCE_TYPE EBS_GB WANDB_PARAMETER \
SYNC_INTERVAL PROCESS_ID COORDINATOR COORDINATOR_PORT SHARED_DIR MAX_RESTARTS"

S3_PREFIX=""
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
REGIONS=us-east-1,us-east-2,us-west-2
RUN_CONFIG=chexnet
NODES=1
INSTANCE_TYPE=g5.24xlarge
EBS_GB=300
WANDB_PARAMETER=/cxrjax/wandb-api-key
SYNC_INTERVAL=600
PROCESS_ID=0
COORDINATOR=""
COORDINATOR_PORT=1234
SHARED_DIR=""
MAX_RESTARTS=3
DRY_RUN=0
PID=""
FOLLOW=0

log() { printf '[cxrjax %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf 'g5_24xlarge.sh: error: %s\n' "$*" >&2; exit 2; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

# ---------------------------------------------------------------- settings

is_key() { [[ " $KEYS " == *" $1 "* ]]; }

set_key() {  # KEY VALUE WHERE
  local key=$1 value=$2 where=$3
  case $key in
    *SECRET* | *TOKEN* | *PASSWORD* | *API_KEY* | AWS_*)
      die "$where: $key looks like a credential; credentials never go in a config or flag" \
        "(the AWS CLI reads its own environment and credential files; put the wandb key" \
        "in SSM Parameter Store, see WANDB_PARAMETER)" ;;
  esac
  is_key "$key" || die "$where: unknown key $key (known: $KEYS)"
  [[ $value =~ ^[A-Za-z0-9._:/@+,=-]*$ ]] \
    || die "$where: value of $key has a character outside [A-Za-z0-9._:/@+,=-] (no quotes or spaces)"
  printf -v "$key" '%s' "$value"
}

load_config() {  # parse FILE as KEY=VALUE data; never source it
  local file=$1 line n=0
  [[ -f $file ]] || die "config file $file not found"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    # The line itself is not echoed: it could be a pasted credential.
    [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || die "$file:$n: expected KEY=VALUE (no spaces around =)"
    set_key "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$file:$n"
  done <"$file"
}

parse_args() {  # config file first, then flags on top of it
  local config="" flags=()
  while (($#)); do
    case $1 in
      --config) config=${2:?--config needs a file}; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --follow) FOLLOW=1; shift ;;
      --pid) PID=${2:?--pid needs a process id}; shift 2 ;;
      -h | --help) usage 0 ;;
      --*=*) flags+=("${1%%=*}" "${1#*=}"); shift ;;
      --*) (($# >= 2)) || die "$1 needs a value"; flags+=("$1" "$2"); shift 2 ;;
      *) die "unexpected argument: $1 (see --help)" ;;
    esac
  done
  [[ -z $config ]] || load_config "$config"
  local i key
  for ((i = 0; i < ${#flags[@]}; i += 2)); do
    key=$(printf '%s' "${flags[i]#--}" | tr 'a-z-' 'A-Z_')
    set_key "$key" "${flags[i + 1]}" "flag ${flags[i]}"
  done
}

need() {  # KEY...: each must be set
  local key
  for key; do [[ -n ${!key} ]] || die "$key is required (config file line $key=... or flag --$(printf '%s' "$key" | tr 'A-Z_' 'a-z-'))"; done
}

check_int() {  # KEY MIN [MAX]
  if [[ ! ${!1} =~ ^[0-9]+$ ]] || ((${!1} < $2 || ${!1} > ${3:-${!1}})); then
    die "$1 must be an integer >= $2${3:+ and <= $3}, got '${!1}'"
  fi
}

check_s3_prefix() {
  [[ $S3_PREFIX =~ ^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^/](.*[^/])?$ ]] \
    || die "S3_PREFIX must be s3://BUCKET/some/prefix with a key prefix and no trailing slash" \
      "(the instance may touch only this prefix, never a whole bucket), got '$S3_PREFIX'"
}

run_name() { basename "$S3_PREFIX"; }  # one run per S3 prefix: its last component names it

validate_common() {
  need S3_PREFIX REGION
  check_s3_prefix
  [[ $(run_name) =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] \
    || die "the last component of S3_PREFIX names the run and must match [A-Za-z0-9._-]{1,63}, got '$(run_name)'"
}

validate_up() {
  validate_common
  need RUN_CONFIG INSTANCE_TYPE REGIONS
  [[ $INSTANCE_TYPE =~ ^[a-z0-9-]+\.[a-z0-9]+(,[a-z0-9-]+\.[a-z0-9]+)*$ ]] \
    || die "INSTANCE_TYPE must be a type such as g5.24xlarge or several, comma-separated (tried in order), got '$INSTANCE_TYPE'"
  [[ $REGIONS =~ ^[a-z]{2}-[a-z]+-[0-9](,[a-z]{2}-[a-z]+-[0-9])*$ ]] \
    || die "REGIONS must be AWS regions such as us-east-1,us-west-2 (tried in order), got '$REGIONS'"
  [[ $RUN_CONFIG =~ ^[A-Za-z0-9_-]+(:[A-Za-z0-9_-]+)?$ ]] || die "RUN_CONFIG must be a config name such as chexnet or chexnet:smoke, got '$RUN_CONFIG'"
  check_int EBS_GB 50
  check_int NODES 1
  check_int SYNC_INTERVAL 10
  check_int MAX_RESTARTS 0 100
  ((NODES == 1)) || [[ -n $SHARED_DIR ]] \
    || die "NODES=$NODES needs SHARED_DIR, a directory every node mounts (orbax writes one checkpoint from all processes); see launch/README.md"
  [[ -f $REPO_DIR/configs/${RUN_CONFIG%%:*}.py ]] || die "configs/${RUN_CONFIG%%:*}.py not found in $REPO_DIR; up ships this tree"
}

# ---------------------------------------------------------------- SkyPilot

quote() {  # ARG: as a shell word, readable where it needs no quoting
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Dry-run lines go to fd 3, the original stdout, so they also escape redirections and $(...).
exec 3>&1

do_or_print() {  # COMMAND...: run it, or print it under --dry-run
  if ((DRY_RUN)); then
    local arg line="[dry-run]"
    for arg; do line+=" $(quote "$arg")"; done
    printf '%s\n' "$line" >&3
    return 0
  fi
  "$@"
}

job_name() { printf 'cxrjax-%s' "$(run_name)"; }

render() {  # TEMPLATE: with the run's bucket, prefix, name and region filled in
  local bucket=${S3_PREFIX#s3://}
  local key=${bucket#*/}
  sed -e "s|\${BUCKET}|${bucket%%/*}|g" -e "s|\${PREFIX}|$key|g" -e "s|\${RUN}|$(run_name)|g" \
    -e "s|\${REGION}|$REGION|g" -e "s|\${WANDB_PARAMETER}|${WANDB_PARAMETER#/}|g" "$SCRIPT_DIR/$1"
}

render_task() {  # FILE: skypilot.yaml with the run's instance types x regions and retry budget
  local type region types regions
  IFS=, read -ra types <<<"$INSTANCE_TYPE"
  IFS=, read -ra regions <<<"$REGIONS"
  {
    sed -n '1,/# ordered: begin/p' "$SCRIPT_DIR/skypilot.yaml" \
      | sed "s/max_restarts_on_errors: [0-9]*/max_restarts_on_errors: $MAX_RESTARTS/"
    for type in "${types[@]}"; do
      for region in "${regions[@]}"; do printf '    - {infra: aws/%s, instance_type: %s}\n' "$region" "$type"; done
    done
    sed -n '/# ordered: end/,$p' "$SCRIPT_DIR/skypilot.yaml"
  } >"$1"
}

cmd_up() {
  validate_up
  command -v sky >/dev/null || ((DRY_RUN)) || die "sky not found: pip install 'skypilot[aws]>=0.14' (the launch extra), best in a venv of its own; see launch/README.md"
  local dir
  dir=$(mktemp -d)
  # shellcheck disable=SC2064  # the path is fixed now
  trap "rm -rf '$dir'" EXIT
  render_task "$dir/task.yaml"
  render sky_config.yaml >"$dir/sky_config.yaml"
  if ((DRY_RUN)); then
    sed 's/^/  | /' "$dir/task.yaml"
    echo "[dry-run] SkyPilot config:"
    sed 's/^/  | /' "$dir/sky_config.yaml"
  fi
  do_or_print sky jobs launch "$dir/task.yaml" --config "$dir/sky_config.yaml" --name "$(job_name)" \
    --workdir "$REPO_DIR" --num-nodes "$NODES" --disk-size "$EBS_GB" --yes --detach-run \
    --env "S3_PREFIX=$S3_PREFIX" --env "REGION=$REGION" --env "RUN_CONFIG=$RUN_CONFIG" \
    --env "WANDB_PARAMETER=$WANDB_PARAMETER" --env "SYNC_INTERVAL=$SYNC_INTERVAL" \
    --env "COORDINATOR_PORT=$COORDINATOR_PORT" --env "SHARED_DIR=$SHARED_DIR"
  ((DRY_RUN)) || log "run $(run_name) submitted as managed job $(job_name); watch it with: $0 status --s3-prefix $S3_PREFIX"
}

finished() { aws --region "$REGION" s3 ls "$S3_PREFIX/workdir/done.json" >/dev/null 2>&1; }

cmd_status() {
  validate_common
  do_or_print sky jobs queue --all
  ((DRY_RUN)) && return 0
  if finished; then
    echo "training finished: $S3_PREFIX/workdir/done.json exists"
  else
    echo "not finished: no $S3_PREFIX/workdir/done.json yet"
  fi
}

cmd_logs() {
  validate_common
  local follow=--no-follow
  ((FOLLOW)) && follow=--follow
  do_or_print sky jobs logs --name "$(job_name)" "$follow"
}

cmd_down() {
  validate_common
  do_or_print sky jobs cancel --name "$(job_name)" --yes
  log "checkpoints and results stay in $S3_PREFIX/workdir/"
}

cmd_sky_config() {
  validate_common
  render sky_config.yaml
}

# ---------------------------------------------------------------- cost

cmd_cost() {  # the spot price of what each node recorded it runs on, times what the run measured
  validate_common
  local tmp out type zone nodes price when
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # the path is fixed now
  trap "rm -rf '$tmp'" EXIT
  for name in logs/process-0/instance.json workdir/metrics.jsonl workdir/config.json; do
    do_or_print aws --region "$REGION" s3 cp --only-show-errors "$S3_PREFIX/$name" "$tmp/${name##*/}" \
      || die "no $S3_PREFIX/$name yet: the run's node uploads it once it starts (instance.json) or trains (every SYNC_INTERVAL seconds)"
  done
  ((DRY_RUN)) && return 0
  read -r type zone nodes < <(python3 -c 'import json, sys; i = json.load(open(sys.argv[1]))
print(i.get("instance_type"), i.get("availability_zone"), i.get("nodes", 1))' "$tmp/instance.json")
  [[ $type =~ ^[a-z0-9-]+\.[a-z0-9]+$ && $zone =~ ^[a-z]{2}-[a-z]+-[0-9][a-z]$ ]] \
    || die "$S3_PREFIX/logs/process-0/instance.json names no instance type and zone (type '$type', zone '$zone')"
  out=$(aws --region "${zone%?}" ec2 describe-spot-price-history --instance-types "$type" \
    --product-descriptions Linux/UNIX --start-time "$(date -u +%FT%TZ)" --filters "Name=availability-zone,Values=$zone" \
    --query 'SpotPriceHistory[0].[SpotPrice,Timestamp]' --output text)
  read -r price when <<<"$out"
  [[ $price =~ ^[0-9.]+$ ]] || die "no spot price for $type in $zone: AWS answered '$out'"
  echo "launched: $nodes x $type in $zone; spot price at $when: \$$price per hour"
  python3 "$SCRIPT_DIR/run_cost.py" --price "$price" --instances "$nodes" "$tmp/metrics.jsonl" "$tmp/config.json" || exit 2
}

# ---------------------------------------------------------------- IAM

cmd_iam_policy() {
  validate_common
  local account='<account-id>'
  ((DRY_RUN)) || account=$(aws sts get-caller-identity --query Account --output text)
  render iam_policy.json | sed "s|\${ACCOUNT_ID}|$account|g"
}

cmd_iam_setup() {  # role + instance profile cxrjax-RUN with only the rendered policy: the job nodes' identity
  validate_common
  local name policy trust
  name="cxrjax-$(run_name)"
  policy=$(mktemp)
  trust=$(mktemp)
  cmd_iam_policy >"$policy"
  printf '%s\n' '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}' >"$trust"
  do_or_print aws iam create-role --role-name "$name" --assume-role-policy-document "file://$trust" \
    --description "cxrjax run $(run_name): its own S3 prefix only" >/dev/null
  do_or_print aws iam put-role-policy --role-name "$name" --policy-name "$name" --policy-document "file://$policy"
  do_or_print aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
  do_or_print aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  rm -f "$policy" "$trust"
  log "instance profile $name grants $S3_PREFIX/* and the SSM parameter $WANDB_PARAMETER"
}

# ---------------------------------------------------------------- on the node

node_python() {  # the venv's python (SkyPilot's setup made it), else the system's
  local venv=${CXRJAX_HOME:-$HOME/cxrjax}/venv
  if [[ -x $venv/bin/python ]]; then printf '%s\n' "$venv/bin/python"; else command -v python3; fi
}

cmd_run() {  # SkyPilot's run step: launch/node.py decides the exit code (0 done, 75 resume, else failed)
  validate_common
  need RUN_CONFIG
  check_int NODES 1
  check_int PROCESS_ID 0 $((NODES - 1))
  check_int SYNC_INTERVAL 10
  ((NODES == 1)) || [[ -n $SHARED_DIR ]] || die "NODES=$NODES needs SHARED_DIR, a directory every node sees, for the workdir"
  local home=${CXRJAX_HOME:-$HOME/cxrjax}
  cd "$REPO_DIR"
  # The node's venv holds the AWS CLI (SkyPilot installs one only into its own runtime).
  PATH="$home/venv/bin:$PATH" exec "$(node_python)" "$SCRIPT_DIR/node.py" run --s3-prefix "$S3_PREFIX" \
    --region "$REGION" --run "$(run_name)" --run-config "$RUN_CONFIG" --wandb-parameter "$WANDB_PARAMETER" \
    --home "$home" --nodes "$NODES" --process-id "$PROCESS_ID" --coordinator "$COORDINATOR" \
    --shared-dir "$SHARED_DIR" --sync-interval "$SYNC_INTERVAL"
}

cmd_watch_spot() {
  [[ $PID =~ ^[0-9]+$ ]] || die "watch-spot needs --pid PID"
  exec python3 "$SCRIPT_DIR/node.py" watch-spot --pid "$PID"
}

# ---------------------------------------------------------------- main

main() {
  (($#)) || usage 2
  local command=$1
  shift
  parse_args "$@"
  case $command in
    up) cmd_up ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    down) cmd_down ;;
    cost) cmd_cost ;;
    iam-policy) cmd_iam_policy ;;
    iam-setup) cmd_iam_setup ;;
    sky-config) cmd_sky_config ;;
    run) cmd_run ;;
    watch-spot) cmd_watch_spot ;;
    -h | --help | help) usage 0 ;;
    *) die "unknown command $command (see --help)" ;;
  esac
  ((!DRY_RUN)) || log "dry run: nothing was launched or changed"
}

main "$@"
