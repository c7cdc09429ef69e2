#!/usr/bin/env bash
# Train cxrjax on AWS spot GPU instances (g5.24xlarge by default) that survive preemption.
#
#   g5_24xlarge.sh up [--config FILE] [--KEY value ...] [--dry-run]   launch the run's instance(s)
#   g5_24xlarge.sh keep [--config FILE] [--KEY value ...]             up, and again after each interruption
#   g5_24xlarge.sh status|logs|down [--config FILE] [--KEY value ...]  watch or end the run
#                                               (logs --follow: new lines until done; --console)
#   g5_24xlarge.sh cost [--config FILE] [--KEY value ...]             $/hour and $/epoch, measured
#   g5_24xlarge.sh iam-policy|iam-setup [--config FILE] [--dry-run]    the instance's IAM role
#   g5_24xlarge.sh run --config /etc/cxrjax/run.env                    on the instance (systemd)
#   g5_24xlarge.sh watch-spot --pid PID                                the interruption watcher
#
# Settings are KEY=VALUE lines in a config file (read as data, never sourced; see
# launch/example.env) or --key-name value flags, flags winning. Credentials never go there:
# the AWS CLI takes them from its environment or credential files, the wandb key lives in
# SSM Parameter Store and only the instance reads it.
set -euo pipefail
shopt -s inherit_errexit

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
readonly SCRIPT_DIR REPO_DIR
readonly IMDS="${CXRJAX_IMDS_ENDPOINT:-http://169.254.169.254}"
readonly SPOT_POLL_SECONDS="${CXRJAX_SPOT_POLL_SECONDS:-5}"
readonly KEEP_POLL_SECONDS="${CXRJAX_KEEP_POLL_SECONDS:-60}"
readonly LOGS_POLL_SECONDS="${CXRJAX_LOGS_POLL_SECONDS:-30}"
# Seconds between looks at an AWS resource changing state (EFS ready, mount targets gone,
# a security group free to delete); whole seconds.
readonly AWS_POLL_SECONDS="${CXRJAX_AWS_POLL_SECONDS:-5}"
# The trainer config field that names the prepared dataset directory.
readonly DATA_FIELD=data.prepared
readonly RUN_TAG=cxrjax-run
readonly ENV_FILE=/etc/cxrjax/run.env
# Where a cluster's instances mount the run's EFS file system: the one workdir all see.
readonly CLUSTER_SHARED_DIR=/opt/cxrjax/shared

# Every key a config file or flag may set. Anything else, credentials above all, is refused.
readonly KEYS="AMI KEY_NAME SUBNET SECURITY_GROUP SSH_CIDR EBS_GB MAX_PRICE REGION S3_PREFIX \
RUN_CONFIG NODES INSTANCE_TYPE HOP_LIMIT WANDB_PARAMETER SYNC_INTERVAL PROCESS_ID COORDINATOR \
COORDINATOR_PORT SHARED_DIR MAX_RELAUNCHES"

AMI="resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
KEY_NAME=""
SUBNET=""
SECURITY_GROUP=""
SSH_CIDR=""
EBS_GB=300
MAX_PRICE=""
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
S3_PREFIX=""
RUN_CONFIG=chexnet
NODES=1
INSTANCE_TYPE=g5.24xlarge
HOP_LIMIT=1
WANDB_PARAMETER=/cxrjax/wandb-api-key
SYNC_INTERVAL=600
PROCESS_ID=0
COORDINATOR=""
COORDINATOR_PORT=1234
SHARED_DIR=""
MAX_RELAUNCHES=10
DRY_RUN=0
ARGS=()
PID=""
CONSOLE=0
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
      --console) CONSOLE=1; shift ;;
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

check_ssh_cidr() {  # an SSH source must be a real CIDR that is not the whole internet
  [[ -z $SSH_CIDR ]] && return 0
  [[ $SSH_CIDR =~ ^[0-9.]+/[0-9]+$ || $SSH_CIDR =~ ^[0-9A-Fa-f:]+/[0-9]+$ ]] \
    || die "SSH_CIDR must be a CIDR such as 203.0.113.7/32, got '$SSH_CIDR'"
  [[ ${SSH_CIDR#*/} =~ ^0+$ ]] \
    && die "SSH_CIDR $SSH_CIDR opens SSH to the whole internet; give your own address (e.g. \$(curl -s https://checkip.amazonaws.com)/32) or leave SSH_CIDR empty and use SSM"
  return 0
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
  need AMI SUBNET RUN_CONFIG INSTANCE_TYPE
  [[ $AMI =~ ^ami-[0-9a-f]+$|^resolve:ssm:/ ]] || die "AMI must be ami-... or resolve:ssm:/parameter, got '$AMI'"
  [[ $SUBNET =~ ^subnet-[0-9a-f]+(,subnet-[0-9a-f]+)*$ ]] \
    || die "SUBNET must be subnet-... or several, comma-separated (tried in order), got '$SUBNET'"
  [[ $INSTANCE_TYPE =~ ^[a-z0-9-]+\.[a-z0-9]+(,[a-z0-9-]+\.[a-z0-9]+)*$ ]] \
    || die "INSTANCE_TYPE must be a type such as g5.24xlarge or several, comma-separated (tried in order), got '$INSTANCE_TYPE'"
  [[ -z $SECURITY_GROUP || $SECURITY_GROUP =~ ^sg-[0-9a-f]+$ ]] || die "SECURITY_GROUP must be sg-..., got '$SECURITY_GROUP'"
  [[ $HOP_LIMIT == 1 || $HOP_LIMIT == 2 ]] || die "HOP_LIMIT must be 1 (no containers) or 2 (containers), got '$HOP_LIMIT'"
  [[ -z $MAX_PRICE || $MAX_PRICE =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "MAX_PRICE must be dollars per hour such as 4.50, got '$MAX_PRICE'"
  [[ $RUN_CONFIG =~ ^[A-Za-z0-9_-]+(:[A-Za-z0-9_-]+)?$ ]] || die "RUN_CONFIG must be a config name such as chexnet or chexnet:smoke, got '$RUN_CONFIG'"
  check_int EBS_GB 50
  check_int NODES 1
  check_int COORDINATOR_PORT 1024 65535
  check_int SYNC_INTERVAL 10
  check_ssh_cidr
  git -C "$REPO_DIR" cat-file -e "HEAD:configs/${RUN_CONFIG%%:*}.py" 2>/dev/null \
    || die "configs/${RUN_CONFIG%%:*}.py is not in the committed tree of $REPO_DIR; up ships HEAD"
}

# ---------------------------------------------------------------- AWS calls

# Dry-run lines go to fd 3, the original stdout, so they also escape $(...) captures.
exec 3>&1

quote() {  # ARG: as a shell word, readable where it needs no quoting
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

aws_do() {  # make an AWS call, or print it under --dry-run
  if ((DRY_RUN)); then
    local arg line="[dry-run] aws --region $REGION"
    for arg; do line+=" $(quote "$arg")"; done
    printf '%s\n' "$line" >&3
    return 0
  fi
  aws --region "$REGION" "$@"
}

aws_text() {  # PLACEHOLDER ARGS...: the call's text output (PLACEHOLDER under --dry-run)
  local placeholder=$1
  shift
  if ((DRY_RUN)); then aws_do "$@" --output text; printf '%s\n' "$placeholder"; return 0; fi
  aws --region "$REGION" "$@" --output text
}

retry() {  # TRIES SECONDS COMMAND...: until COMMAND succeeds, at most TRIES times, SECONDS apart
  local tries=$1 seconds=$2 try
  shift 2
  for ((try = 1; try <= tries; try++)); do
    "$@" && return 0
    ((try == tries)) || sleep "$seconds"
  done
  return 1
}

tag_spec() {  # RESOURCE-TYPE EXTRA-TAGS...
  local type=$1 tags t
  tags="{Key=$RUN_TAG,Value=$(run_name)}"
  shift
  for t; do tags+=",$t"; done
  printf 'ResourceType=%s,Tags=[%s]' "$type" "$tags"
}

# ---------------------------------------------------------------- security group

audit_security_group() {  # SG: refuse world-open ingress; multi-node needs the self rule
  local sg=$1 open self
  ((DRY_RUN)) && { aws_do ec2 describe-security-groups --group-ids "$sg"; return 0; }
  open=$(aws_text - ec2 describe-security-groups --group-ids "$sg" --query \
    "length(SecurityGroups[0].IpPermissions[?IpRanges[?CidrIp=='0.0.0.0/0'] || Ipv6Ranges[?CidrIpv6=='::/0']])")
  [[ $open == 0 ]] || die "security group $sg opens $open ingress rule(s) to 0.0.0.0/0 or ::/0; remove them or let up create the run's own group"
  if ((NODES > 1)); then
    self=$(aws_text - ec2 describe-security-groups --group-ids "$sg" --query \
      "length(SecurityGroups[0].IpPermissions[?UserIdGroupPairs[?GroupId=='$sg']])")
    [[ $self != 0 ]] || die "security group $sg has no rule admitting its own members; multi-node runs need one for the JAX coordinator and NCCL"
  fi
}

cluster_security_group() {  # the run's own group: SSH only from SSH_CIDR, members to members
  local vpc=$1 name sg
  name="cxrjax-$(run_name)"
  sg=$(aws_text '<existing-group-id-or-None>' ec2 describe-security-groups \
    --filters "Name=group-name,Values=$name" "Name=vpc-id,Values=$vpc" --query 'SecurityGroups[0].GroupId')
  if [[ $sg != None && $sg != '<existing-group-id-or-None>' ]]; then
    log "reusing security group $sg ($name)"
    audit_security_group "$sg"
    printf '%s\n' "$sg"
    return 0
  fi
  sg=$(aws_text '<new-security-group-id>' ec2 create-security-group --group-name "$name" \
    --description "cxrjax run $(run_name): no ingress from the internet" --vpc-id "$vpc" \
    --tag-specifications "$(tag_spec security-group)" --query GroupId)
  if [[ -n $SSH_CIDR ]]; then
    local range="IpRanges=[{CidrIp=$SSH_CIDR,Description=ssh}]"
    [[ $SSH_CIDR == *:* ]] && range="Ipv6Ranges=[{CidrIpv6=$SSH_CIDR,Description=ssh}]"
    aws_do ec2 authorize-security-group-ingress --group-id "$sg" \
      --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,$range" >/dev/null
  fi
  if ((NODES > 1)); then
    # All traffic between members, from members only: the JAX coordinator (port
    # $COORDINATOR_PORT) and NCCL's socket transport, which picks its ports at run time.
    aws_do ec2 authorize-security-group-ingress --group-id "$sg" \
      --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg,Description=cluster-members}]" >/dev/null
  fi
  printf '%s\n' "$sg"
}

# ---------------------------------------------------------------- the cluster's shared workdir

# orbax writes one checkpoint from all processes into one directory, so a cluster's
# workdir lives on an EFS file system that every member mounts. It is found again by its
# creation token, so `up` after an interruption reuses it, checkpoints and all.
efs_token() { printf 'cxrjax-%s' "$(run_name)"; }

run_file_system() {  # DRY-RUN-PLACEHOLDER: the run's EFS file system id, or None
  # A single-node user may have no EFS permissions: then say so, and carry on without.
  aws_text "$1" efs describe-file-systems --creation-token "$(efs_token)" --query 'FileSystems[0].FileSystemId' \
    || { log "warning: cannot list EFS file systems in $REGION; a cluster's file system $(efs_token) was not looked for"; echo None; }
}

file_system_available() {  # FS: as a mount target needs
  [[ $(aws_text available efs describe-file-systems --file-system-id "$1" --query 'FileSystems[0].LifeCycleState') == available ]]
}

no_mount_targets() {  # FS: as its deletion needs
  [[ -z $(aws_text '' efs describe-mount-targets --file-system-id "$1" --query 'MountTargets[].MountTargetId') ]]
}

shared_file_system() {  # SG SUBNET: the run's encrypted EFS with a mount target in SUBNET; prints the target's address
  local sg=$1 subnet=$2 fs out target ip groups
  fs=$(run_file_system None)
  if [[ $fs == None || -z $fs ]]; then
    fs=$(aws_text '<new-efs-id>' efs create-file-system --creation-token "$(efs_token)" --encrypted \
      --performance-mode generalPurpose --throughput-mode elastic \
      --tags "Key=$RUN_TAG,Value=$(run_name)" "Key=Name,Value=cxrjax-$(run_name)" --query FileSystemId)
    log "created EFS file system $fs for the cluster's shared workdir"
  else
    log "reusing EFS file system $fs: it holds the run's workdir"
  fi
  retry 60 "$AWS_POLL_SECONDS" file_system_available "$fs" \
    || die "EFS file system $fs is not available after 60 looks, ${AWS_POLL_SECONDS}s apart"
  out=$(aws_text None efs describe-mount-targets --file-system-id "$fs" \
    --query "MountTargets[?SubnetId=='$subnet'] | [0].[MountTargetId,IpAddress]")
  read -r target ip <<<"$out"
  if [[ $target == None || -z $target ]]; then
    # Its address is fixed for its life; members mount it by address, so no VPC DNS is needed.
    ip=$(aws_text '<efs-mount-ip>' efs create-mount-target --file-system-id "$fs" --subnet-id "$subnet" \
      --security-groups "$sg" --query IpAddress)
  else
    groups=$(aws_text - efs describe-mount-target-security-groups --mount-target-id "$target" --query SecurityGroups)
    [[ " $groups " == *[[:space:]]"$sg"[[:space:]]* ]] \
      || die "EFS mount target $target of $fs is in security group(s) $groups, not the run's $sg; the members could not reach it"
  fi
  printf '%s\n' "$ip"
}

delete_file_system() {  # FS: its mount targets, then itself
  local fs=$1 targets target
  targets=$(aws_text '<mount-target-id>' efs describe-mount-targets --file-system-id "$fs" --query 'MountTargets[].MountTargetId')
  for target in $targets; do aws_do efs delete-mount-target --mount-target-id "$target"; done
  # A file system with mount targets cannot be deleted; the deletion below says so if they linger.
  ((DRY_RUN)) || retry 60 "$AWS_POLL_SECONDS" no_mount_targets "$fs" || true
  aws_do efs delete-file-system --file-system-id "$fs"
}

# ---------------------------------------------------------------- up

ship_source() {  # upload the committed tree; prints its S3 address
  local sha archive url
  sha=$(git -C "$REPO_DIR" rev-parse --short=12 HEAD)
  [[ -z $(git -C "$REPO_DIR" status --porcelain --untracked-files=no) ]] \
    || log "warning: uncommitted changes in $REPO_DIR are not shipped; the instance runs commit $sha"
  url="$S3_PREFIX/src/cxrjax-$sha.tar.gz"
  archive=$(mktemp)
  git -C "$REPO_DIR" archive --format=tar.gz -o "$archive" HEAD
  aws_do s3 cp --only-show-errors "$archive" "$url" >&2
  rm -f "$archive"
  printf '%s\n' "$url"
}

write_user_data() {  # FILE SOURCE-URL PROCESS-ID COORDINATOR NFS-ADDRESS: the instance bootstrap
  local file=$1 src=$2 pid=$3 coordinator=$4 nfs=$5 key unit_end service_end mounts="" shared=""
  # SuccessAction= and FailureAction= belong to [Unit]: in [Service] systemd ignores them
  # with a mere warning (tests/test_launch.py runs systemd-analyze verify on this unit).
  if ((NODES > 1)); then
    shared=$CLUSTER_SHARED_DIR
    mounts="RequiresMountsFor=$shared"

    # A cluster ends together: a run that finished or checkpointed on a notice (the trainer
    # stops every process at once) powers off, which terminates; "up" again resumes.
    unit_end="# finished or checkpointed: power off (= terminate); \"up\" again resumes
SuccessAction=poweroff"
    service_end=""
  else
    # One node resumes by itself after a spot stop, so only a finished run whose results
    # went up to S3 (the run exited 0) powers off.
    unit_end=""
    service_end="# a finished and uploaded run powers the instance off; \"down\" then removes it
ExecStopPost=/bin/sh -c 'test \"\$\$SERVICE_RESULT\" = success && test -e /opt/cxrjax/work/$(run_name)/done.json && systemctl --no-block poweroff || true'"
  fi
  {
    cat <<'HEAD'
#!/bin/bash
# cxrjax bootstrap written by launch/g5_24xlarge.sh up. It holds no credentials: the
# instance role reaches only the run's S3 prefix, and the wandb key is read from SSM.
set -euo pipefail
command -v aws >/dev/null || { echo "cxrjax: this AMI has no aws CLI; use one that does" >&2; exit 1; }
mkdir -p /opt/cxrjax/src /etc/cxrjax
cat >/etc/cxrjax/run.env <<'CXRJAX_ENV'
HEAD
    for key in S3_PREFIX REGION RUN_CONFIG NODES WANDB_PARAMETER SYNC_INTERVAL COORDINATOR_PORT; do
      printf '%s=%s\n' "$key" "${!key}"
    done
    printf 'PROCESS_ID=%s\nCOORDINATOR=%s\nSHARED_DIR=%s\nCXRJAX_ENV\n' "$pid" "$coordinator" "$shared"
    printf 'aws s3 cp --only-show-errors --region %q %q - | tar -xz -C /opt/cxrjax/src\n' "$REGION" "$src"
    if ((NODES > 1)); then
      # NFS options as AWS recommends for EFS. The mount target that up just created takes
      # a minute or two to answer; an instance that cannot mount it powers off (terminates).
      cat <<MOUNT
command -v mount.nfs4 >/dev/null || { apt-get update -q && apt-get install -y -q nfs-common; }
mkdir -p $shared
grep -q ' $shared ' /etc/fstab || echo '$nfs:/ $shared nfs4 nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev 0 0' >>/etc/fstab
for try in \$(seq 60); do mountpoint -q $shared && break; mount $shared || sleep 10; done
mountpoint -q $shared || { echo "cxrjax: cannot mount the run's EFS at $nfs:/ on $shared" >&2; poweroff; exit 1; }
MOUNT
    fi
    cat <<UNIT
python3 -c 'import ensurepip' 2>/dev/null || { apt-get update -q && apt-get install -y -q python3-venv; }
cat >/etc/systemd/system/cxrjax-run.service <<'CXRJAX_UNIT'
[Unit]
Description=cxrjax training run (starts again on every boot, so a spot stop/start resumes)
Wants=network-online.target
After=network-online.target
$mounts
StartLimitIntervalSec=6h
StartLimitBurst=5
# a run that keeps failing stops paying for the GPUs
FailureAction=poweroff
$unit_end

[Service]
Environment=HOME=/root
ExecStart=/opt/cxrjax/src/launch/g5_24xlarge.sh run --config $ENV_FILE
$service_end
Restart=on-failure
RestartSec=60
# the trainer gets SIGTERM and time to checkpoint and upload before SIGKILL
KillMode=mixed
TimeoutStopSec=170

[Install]
WantedBy=multi-user.target
CXRJAX_UNIT
systemctl daemon-reload
systemctl enable --now cxrjax-run.service
UNIT
  } >"$file"
}

# launch_node is called in a condition, where bash ignores set -e inside it, so every step
# that can fail returns its status itself.
launch_node() {  # TYPE SUBNET PROCESS-ID COORDINATOR SG ROOT-DEVICE IMAGE SOURCE-URL NFS-ADDRESS: prints "id private-ip"
  local type=$1 subnet=$2 pid=$3 coordinator=$4 sg=$5 root=$6 image=$7 src=$8 nfs=$9 user_data spot args=() status=0
  user_data=$(mktemp) || return
  write_user_data "$user_data" "$src" "$pid" "$coordinator" "$nfs" || { rm -f "$user_data"; return 1; }
  if ((DRY_RUN)); then
    printf '[dry-run] user-data of process %s:\n' "$pid" >&3
    sed 's/^/  | /' "$user_data" >&3
  fi
  # One node, persistent + stop: AWS stops it on interruption, keeps its EBS volume, and
  # starts it again when capacity returns; the systemd unit then resumes. A cluster,
  # one-time + terminate: its members shut down together and "up" relaunches them all.
  local kind=persistent interruption=stop shutdown=stop
  ((NODES == 1)) || { kind=one-time; interruption=terminate; shutdown=terminate; }
  spot="{\"MarketType\":\"spot\",\"SpotOptions\":{\"SpotInstanceType\":\"$kind\",\"InstanceInterruptionBehavior\":\"$interruption\"${MAX_PRICE:+,\"MaxPrice\":\"$MAX_PRICE\"}}}"
  args=(ec2 run-instances --image-id "$image" --instance-type "$type" --count 1
    --instance-initiated-shutdown-behavior "$shutdown"
    --subnet-id "$subnet" --security-group-ids "$sg"
    --iam-instance-profile "Name=cxrjax-$(run_name)"
    --instance-market-options "$spot"
    --metadata-options "HttpTokens=required,HttpPutResponseHopLimit=$HOP_LIMIT,HttpEndpoint=enabled"
    --block-device-mappings "[{\"DeviceName\":\"$root\",\"Ebs\":{\"VolumeSize\":$EBS_GB,\"VolumeType\":\"gp3\",\"Encrypted\":true,\"DeleteOnTermination\":true}}]"
    --user-data "file://$user_data"
    --tag-specifications "$(tag_spec instance "{Key=Name,Value=cxrjax-$(run_name)-$pid}" "{Key=cxrjax-process,Value=$pid}")"
    "$(tag_spec volume)"
    --query 'Instances[0].[InstanceId,PrivateIpAddress]')
  [[ -z $KEY_NAME ]] || args+=(--key-name "$KEY_NAME")
  aws_text "<instance-id-$pid> <private-ip-$pid>" "${args[@]}" || status=$?
  rm -f "$user_data"
  return "$status"
}

cmd_up() {
  validate_up
  local image=$AMI root vpc sg src out nfs="" types subnets
  IFS=, read -ra types <<<"$INSTANCE_TYPE"
  IFS=, read -ra subnets <<<"$SUBNET"
  out=$(aws_text '' ec2 describe-instances --filters "Name=tag:$RUN_TAG,Values=$(run_name)" \
    "Name=instance-state-name,Values=pending,running,stopping,stopped" --query 'Reservations[].Instances[].InstanceId')
  [[ -z $out ]] || die "run $(run_name) already has instances ($out); use status, or down first"
  aws_do iam get-instance-profile --instance-profile-name "cxrjax-$(run_name)" >/dev/null \
    || die "no instance profile cxrjax-$(run_name); create it first with: $0 iam-setup --s3-prefix $S3_PREFIX"
  if [[ $AMI == resolve:ssm:* ]]; then
    image=$(aws_text '<ami-from-ssm>' ssm get-parameter --name "${AMI#resolve:ssm:}" --query Parameter.Value)
  fi
  # The root volume is encrypted through its mapping, which needs the AMI's root device name.
  root=$(aws_text '<root-device-of-ami>' ec2 describe-images --image-ids "$image" --query 'Images[0].RootDeviceName')
  [[ $root == /dev/* || $root == '<root-device-of-ami>' ]] || die "AMI $image not found in $REGION (root device: $root)"
  if [[ -n $SECURITY_GROUP ]]; then
    audit_security_group "$SECURITY_GROUP"
    sg=$SECURITY_GROUP
  else
    vpc=$(aws_text '<vpc-of-subnet>' ec2 describe-subnets --subnet-ids "${subnets[@]}" --query 'Subnets[].VpcId')
    vpc=$(printf '%s\n' "$vpc" | tr '\t' '\n' | sort -u)
    [[ $vpc != *$'\n'* ]] || die "the subnets $SUBNET lie in several VPCs ($(echo "$vpc" | tr '\n' ' ')); give subnets of one VPC"
    sg=$(cluster_security_group "$vpc")
  fi
  src=$(ship_source)
  # Capacity fallback: each instance type (in order of preference) in each subnet, until one
  # launches. A refusal for capacity moves on; any other refusal ends up here.
  local type subnet plan=""
  for type in "${types[@]}"; do for subnet in "${subnets[@]}"; do plan+="${plan:+, then }$type in $subnet"; done; done
  ((DRY_RUN)) && printf '[dry-run] plan: %s; the calls below are the first attempt, a refusal for capacity moves on\n' "$plan" >&3
  for type in "${types[@]}"; do
    for subnet in "${subnets[@]}"; do
      ((NODES == 1)) || nfs=$(shared_file_system "$sg" "$subnet")
      if launch_members "$type" "$subnet" "$sg" "$root" "$image" "$src" "$nfs"; then
        ((DRY_RUN)) && return 0
        log "run $(run_name) is up ($type in $subnet); watch it with: $0 status --s3-prefix $S3_PREFIX"
        return 0
      fi
    done
  done
  die "no capacity: every instance type and subnet was refused ($plan; AWS's reasons above)." \
    "Allow more with INSTANCE_TYPE=a,b and SUBNET=x,y (other zones), or try again later"
}

# The refusals that another type or zone may not meet; anything else is an error to fix.
readonly CAPACITY_ERRORS='InsufficientInstanceCapacity|InsufficientCapacity|InsufficientHostCapacity|SpotMaxPriceTooLow|MaxSpotInstanceCountExceeded|Unsupported|InsufficientFreeAddressesInSubnet|VcpuLimitExceeded'

launch_members() {  # TYPE SUBNET SG ROOT IMAGE SRC NFS: all NODES members, or none (returns 1 on a capacity refusal)
  local type=$1 subnet=$2 sg=$3 root=$4 image=$5 src=$6 nfs=$7 node out id ip coordinator="" launched=() err reason
  err=$(mktemp)
  for ((node = 0; node < NODES; node++)); do
    # Process 0 learns its own address from IMDS; the others get it from its launch.
    id="" ip=""
    if out=$(launch_node "$type" "$subnet" "$node" "$coordinator" "$sg" "$root" "$image" "$src" "$nfs" 2>"$err"); then
      read -r id ip <<<"$out"
    fi
    if [[ $id != i-* && $id != '<instance-id-'* ]]; then
      reason=$(grep -v '^[[:space:]]*$' "$err" | tail -n 1)
      rm -f "$err"
      # A cluster is whole or nothing: members already launched would wait for this one forever.
      ((${#launched[@]} == 0)) || terminate "${launched[@]}"
      [[ $reason =~ $CAPACITY_ERRORS ]] \
        || die "launching process $node of $NODES ($type in $subnet) failed: ${reason:-no answer}"
      log "refused: $type in $subnet for process $node of $NODES: $reason"
      return 1
    fi
    launched+=("$id")
    ((node == 0)) && coordinator="$ip:$COORDINATOR_PORT"
    log "launched process $node of $NODES: $id ($ip), $type in $subnet"
  done
  rm -f "$err"
}

# ---------------------------------------------------------------- status, logs, down

run_instances() {  # "id state spot-request-id" per live instance of the run
  aws_text '<instance-id> running <spot-request-id>' ec2 describe-instances \
    --filters "Name=tag:$RUN_TAG,Values=$(run_name)" "Name=instance-state-name,Values=pending,running,stopping,stopped" \
    --query 'Reservations[].Instances[].[InstanceId,State.Name,SpotInstanceRequestId]'
}

cmd_status() {
  validate_common
  # shellcheck disable=SC2016  # the backquotes are a JMESPath literal
  aws_do ec2 describe-instances --filters "Name=tag:$RUN_TAG,Values=$(run_name)" --output table --query \
    'Reservations[].Instances[].{id:InstanceId,state:State.Name,type:InstanceType,process:Tags[?Key==`cxrjax-process`]|[0].Value,ip:PrivateIpAddress,spot:SpotInstanceRequestId}'
  local requests
  requests=$(run_instances | awk '$3 != "None" {print $3}')
  # shellcheck disable=SC2086  # one word per request id
  [[ -z $requests ]] || aws_do ec2 describe-spot-instance-requests --spot-instance-request-ids $requests \
    --output table --query 'SpotInstanceRequests[].{request:SpotInstanceRequestId,state:State,status:Status.Code,instance:InstanceId}'
  aws_do efs describe-file-systems --creation-token "$(efs_token)" --output table \
    --query 'FileSystems[].{shared_workdir:FileSystemId,state:LifeCycleState,bytes:SizeInBytes.Value}' \
    || log "warning: cannot list EFS file systems in $REGION; a cluster's file system $(efs_token) is not shown"
  if finished && ((!DRY_RUN)); then
    echo "training finished: $S3_PREFIX/workdir/done.json exists; end the run with: $0 down --s3-prefix $S3_PREFIX"
  fi
}

instance_log() {  # INSTANCE-ID [FROM-LINE]: the log's line count, then its last 200 lines (or 500 from FROM-LINE on), through SSM
  local id=$1 lines="tail -n 200" command state _try
  [[ -z ${2:-} ]] || lines="tail -n +$2 | head -n 500"
  command=$(aws_text '<command-id>' ssm send-command --instance-ids "$id" --document-name AWS-RunShellScript \
    --parameters "commands=[\"wc -l </opt/cxrjax/logs/run.log; $lines /opt/cxrjax/logs/run.log\"]" --query Command.CommandId)
  ((DRY_RUN)) && { aws_do ssm get-command-invocation --command-id "$command" --instance-id "$id"; return 0; }
  for _try in $(seq 30); do
    state=$(aws_text - ssm get-command-invocation --command-id "$command" --instance-id "$id" --query Status 2>/dev/null || echo Pending)
    [[ $state == Pending || $state == InProgress || $state == Delayed ]] || break
    sleep 2
  done
  aws_text - ssm get-command-invocation --command-id "$command" --instance-id "$id" --query StandardOutputContent
}

uploaded_logs() {  # the last 200 lines of each process's log in S3 (what terminated instances left)
  local process
  for process in $(aws_text 'process-0/' s3 ls "$S3_PREFIX/logs/" | awk '$1 == "PRE" {print $2}'); do
    echo "=== $S3_PREFIX/logs/${process}run.log (uploaded every SYNC_INTERVAL seconds and at the end)"
    if ((DRY_RUN)); then aws_do s3 cp "$S3_PREFIX/logs/${process}run.log" -; else
      aws --region "$REGION" s3 cp "$S3_PREFIX/logs/${process}run.log" - | tail -n 200
    fi
  done
}

cmd_logs() {  # each live instance's run log through SSM (or its console); else the logs in S3
  validate_common
  local id state _ out live=0
  local -A seen=()
  while :; do
    live=0
    while read -r id state _; do
      [[ -n $id ]] || continue
      live=1
      if ((CONSOLE)); then
        echo "=== $id ($state)"
        aws_do ec2 get-console-output --instance-id "$id" --latest --output text --query Output
        continue
      fi
      # The first look shows the last 200 lines; --follow then only what is new.
      if [[ -z ${seen[$id]:-} ]]; then
        echo "=== $id ($state)"
        out=$(instance_log "$id")
        seen[$id]=$(($(head -n 1 <<<"$out" | tr -cd 0-9) + 1))
        tail -n +2 <<<"$out"
      else
        out=$(instance_log "$id" "${seen[$id]}" | tail -n +2)
        [[ -z $out ]] || { awk -v id="$id" '{print "[" id "] " $0}' <<<"$out"; seen[$id]=$((seen[$id] + $(wc -l <<<"$out"))); }
      fi
    done < <(run_instances)
    if ((!live)) && ((${#seen[@]} == 0)); then
      log "run $(run_name) has no live instances; showing the logs its instances uploaded to S3"
      uploaded_logs
    fi
    ((FOLLOW && !DRY_RUN)) || return 0
    if finished; then log "training finished"; return 0; fi
    sleep "$LOGS_POLL_SECONDS"
  done
}

terminate() {  # INSTANCE-ID...: and wait until they are gone
  aws_do ec2 terminate-instances --instance-ids "$@" >/dev/null
  aws_do ec2 wait instance-terminated --instance-ids "$@"
  ((DRY_RUN)) || log "terminated $*"
}

end_instances() {  # cancel the persistent spot requests first, or AWS would relaunch the instances
  local ids=() requests=() id _state request
  while read -r id _state request; do
    [[ -n $id ]] || continue
    ids+=("$id")
    [[ $request == None || -z $request ]] || requests+=("$request")
  done < <(run_instances)
  ((${#requests[@]} == 0)) || aws_do ec2 cancel-spot-instance-requests --spot-instance-request-ids "${requests[@]}" >/dev/null
  if ((${#ids[@]})); then
    terminate "${ids[@]}"
  else
    log "run $(run_name) has no live instances"
  fi
}

cmd_down() {
  validate_common
  local sg
  end_instances
  # A cluster's EFS goes once the run has finished (its last upload is then in S3); an
  # unfinished run keeps it, and the group its mount target sits in, for "up" to resume from.
  local fs kept=0
  fs=$(run_file_system '<run-efs-id>')
  if [[ $fs != None && -n $fs ]]; then
    if finished; then
      delete_file_system "$fs"
      ((DRY_RUN)) || log "deleted EFS file system $fs"
    else
      kept=1
      log "kept EFS file system $fs and the security group of its mount target: the run has not finished," \
        "and \"up\" again resumes from the workdir there (its last upload is in $S3_PREFIX/workdir/)." \
        "To drop them anyway: delete its mount targets (aws efs describe-mount-targets --file-system-id $fs)," \
        "then aws efs delete-file-system --file-system-id $fs"
    fi
  fi
  sg=$(aws_text '<run-security-group-or-None>' ec2 describe-security-groups \
    --filters "Name=tag:$RUN_TAG,Values=$(run_name)" --query 'SecurityGroups[0].GroupId')
  if ((!kept)) && [[ $sg != None && -n $sg ]]; then delete_security_group "$sg"; fi
  log "checkpoints and results stay in $S3_PREFIX/workdir/"
}

finished() {  # whether the run's done.json is in S3 (under --dry-run: the call, and yes)
  ((DRY_RUN)) && { aws_do s3 ls "$S3_PREFIX/workdir/done.json"; return 0; }
  aws --region "$REGION" s3 ls "$S3_PREFIX/workdir/done.json" >/dev/null 2>&1
}

delete_security_group() {  # SG: retried while a deleted mount target's interface lets go of it
  local sg=$1
  ((DRY_RUN)) && { aws_do ec2 delete-security-group --group-id "$sg"; return 0; }
  retry 24 "$AWS_POLL_SECONDS" aws --region "$REGION" ec2 delete-security-group --group-id "$sg" 2>/dev/null \
    || aws --region "$REGION" ec2 delete-security-group --group-id "$sg"  # once more, to show why
}

# ---------------------------------------------------------------- keep

cmd_keep() {  # launch, then relaunch (with fallback) whenever the run lost a member, until done.json
  validate_up
  check_int MAX_RELAUNCHES 0
  ((!DRY_RUN)) || die "keep makes its launches with up, whose --dry-run shows them"
  local relaunches=0 looked=0 states running busy
  log "keep: run $(run_name), $NODES member(s), at most $MAX_RELAUNCHES relaunch(es), a look every ${KEEP_POLL_SECONDS}s"
  while :; do
    if finished; then
      log "keep: training finished ($S3_PREFIX/workdir/done.json); end the run with: $0 down --s3-prefix $S3_PREFIX"
      return 0
    fi
    states=$(run_instances | awk '{print $2}')
    running=$(grep -cE '^(pending|running)$' <<<"$states" || true)
    busy=$(grep -cE '^(stopping|shutting-down)$' <<<"$states" || true)
    # A member that is stopping may still be uploading its checkpoint: let it finish first.
    if ((running < NODES && busy == 0)); then
      if [[ -n $states ]] || ((looked)); then
        log "keep: interruption: $running of $NODES member(s) running (states: $(echo "$states" | tr '\n' ' '))"
        ((relaunches < MAX_RELAUNCHES)) \
          || die "keep: the retry budget of $MAX_RELAUNCHES relaunch(es) is spent; the checkpoints are in $S3_PREFIX/workdir/, \"keep\" again resumes from them"
        relaunches=$((relaunches + 1))
        # A cluster cannot go on without a member, and a stopped single node may wait long
        # for capacity in its zone: end what is left (a cluster's EFS stays), launch anew.
        end_instances
        log "keep: relaunch $relaunches of $MAX_RELAUNCHES"
      else
        log "keep: launching"
      fi
      # up as its own process, so that set -e holds in it; a refusal is retried at the next look.
      if "$0" up "${ARGS[@]}"; then
        log "keep: run $(run_name) launched; it resumes from $S3_PREFIX/workdir/"
      else
        log "keep: launching failed (above); next try in ${KEEP_POLL_SECONDS}s"
      fi
    fi
    looked=1
    sleep "$KEEP_POLL_SECONDS"
  done
}

# ---------------------------------------------------------------- cost

cmd_cost() {  # the current spot price times what the run measured (launch/run_cost.py)
  validate_common
  check_int NODES 1
  local zone="" filters=() out price priced_zone when tmp type=${INSTANCE_TYPE%%,*}
  if [[ -n $SUBNET ]]; then  # of several, the first (the run's first choice)
    zone=$(aws_text '<zone-of-subnet>' ec2 describe-subnets --subnet-ids "${SUBNET%%,*}" --query 'Subnets[0].AvailabilityZone')
    filters=(--filters "Name=availability-zone,Values=$zone")
  fi
  # The newest price per zone; without a subnet, the cheapest zone's.
  out=$(aws_text '<spot-price> <zone> <time>' ec2 describe-spot-price-history --instance-types "$type" \
    --product-descriptions Linux/UNIX --start-time "$(date -u +%FT%TZ)" "${filters[@]}" \
    --query 'sort_by(SpotPriceHistory, &to_number(SpotPrice))[0].[SpotPrice,AvailabilityZone,Timestamp]')
  read -r price priced_zone when <<<"$out"
  ((DRY_RUN)) || [[ $price =~ ^[0-9.]+$ ]] \
    || die "no spot price for $type in ${zone:-$REGION} (is it offered there?): AWS answered '$out'"
  ((DRY_RUN)) || echo "spot price of $type in $priced_zone at $when: \$$price per hour"
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # the path is fixed now
  trap "rm -rf '$tmp'" EXIT
  for name in metrics.jsonl config.json; do
    aws_do s3 cp --only-show-errors "$S3_PREFIX/workdir/$name" "$tmp/$name" \
      || die "no $S3_PREFIX/workdir/$name yet: the run uploads it every SYNC_INTERVAL seconds once training logs"
  done
  ((DRY_RUN)) || python3 "$SCRIPT_DIR/run_cost.py" --price "$price" --instances "$NODES" "$tmp/metrics.jsonl" "$tmp/config.json" \
    || exit 2
}

# ---------------------------------------------------------------- IAM

render_policy() {  # the instance policy for this run's prefix, from launch/iam_policy.json
  local bucket key account=$1
  bucket=${S3_PREFIX#s3://}
  key=${bucket#*/}
  bucket=${bucket%%/*}
  sed -e "s|\${BUCKET}|$bucket|g" -e "s|\${PREFIX}|$key|g" -e "s|\${REGION}|$REGION|g" \
    -e "s|\${ACCOUNT_ID}|$account|g" -e "s|\${WANDB_PARAMETER}|${WANDB_PARAMETER#/}|g" \
    "$SCRIPT_DIR/iam_policy.json"
}

cmd_iam_policy() {
  validate_common
  render_policy "$(aws_text '<account-id>' sts get-caller-identity --query Account)"
}

cmd_iam_setup() {  # role + instance profile named cxrjax-RUN, with only the rendered policy
  validate_common
  local name policy trust
  name="cxrjax-$(run_name)"
  policy=$(mktemp)
  trust=$(mktemp)
  render_policy "$(aws_text '<account-id>' sts get-caller-identity --query Account)" >"$policy"
  printf '%s\n' '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}' >"$trust"
  aws_do iam create-role --role-name "$name" --assume-role-policy-document "file://$trust" \
    --description "cxrjax run $(run_name): its own S3 prefix only" >/dev/null
  aws_do iam put-role-policy --role-name "$name" --policy-name "$name" --policy-document "file://$policy"
  aws_do iam create-instance-profile --instance-profile-name "$name" >/dev/null
  aws_do iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  rm -f "$policy" "$trust"
  log "instance profile $name grants $S3_PREFIX/* and the SSM parameter $WANDB_PARAMETER"
}

# ---------------------------------------------------------------- on the instance

imds_token() {
  curl -sS -f --max-time 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$IMDS/latest/api/token"
}

imds_get() {  # PATH under latest/
  local token
  token=$(imds_token) || return 1
  curl -sS -f --max-time 2 -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/$1"
}

# spot_watch polls IMDSv2 every SPOT_POLL_SECONDS. On an interruption notice it sends
# SIGTERM to PID (the trainer checkpoints and exits); on the first rebalance recommendation
# (an elevated risk of interruption) SIGUSR1 (a checkpoint, training goes on), or where the
# caller defines on_rebalance PID, that in the background (run: signal, then upload it).
spot_watch() {  # PID
  local pid=$1 token="" code notice warned=0 rebalanced=0
  notice=$(mktemp)
  while kill -0 "$pid" 2>/dev/null; do
    [[ -n $token ]] || token=$(imds_token 2>/dev/null) || token=""
    code=$(curl -s --max-time 2 -o "$notice" -w '%{http_code}' \
      -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/spot/instance-action") || code=000
    case $code in
      200)
        log "spot interruption notice $(tr -d '\n' <"$notice"); sending SIGTERM to $pid"
        kill -TERM "$pid" 2>/dev/null || true
        rm -f "$notice"
        return 0 ;;
      404) ;;  # no notice
      401) token="" ;;  # the token expired: take a new one
      *) ((warned)) || log "warning: instance metadata at $IMDS answered HTTP $code; still polling"; warned=1 ;;
    esac
    if ((!rebalanced)) && [[ -n $token ]]; then
      code=$(curl -s --max-time 2 -o "$notice" -w '%{http_code}' \
        -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/events/recommendations/rebalance") || code=000
      [[ $code != 401 ]] || token=""
      if [[ $code == 200 ]]; then
        rebalanced=1
        log "spot rebalance recommendation $(tr -d '\n' <"$notice"); sending SIGUSR1 to $pid for a checkpoint"
        if declare -F on_rebalance >/dev/null; then on_rebalance "$pid" & else kill -USR1 "$pid" 2>/dev/null || true; fi
      fi
    fi
    sleep "$SPOT_POLL_SECONDS"
  done
  rm -f "$notice"
}

cmd_watch_spot() {
  [[ $PID =~ ^[0-9]+$ ]] || die "watch-spot needs --pid PID"
  spot_watch "$PID"
}

s3_sync() { aws --region "$REGION" s3 sync --only-show-errors "$@"; }

newest_checkpoint() {  # WORKDIR: the newest finished orbax step in WORKDIR/checkpoints, or nothing
  local dir
  dir=$(find "$1/checkpoints" -mindepth 2 -maxdepth 2 -name _CHECKPOINT_METADATA 2>/dev/null \
    | sed 's|/_CHECKPOINT_METADATA$||; s|.*/||' | grep -E '^[0-9]+$' | sort -n | tail -n 1) || true
  printf '%s\n' "$dir"
}

newer_checkpoint() {  # WORKDIR STEP: whether a finished step newer than STEP is there
  local newest
  newest=$(newest_checkpoint "$1")
  [[ -n $newest && ( -z $2 || $newest -gt $2 ) ]]
}

wait_for_pull() {  # WORKDIR: until process 0 has pulled it (an hour at most)
  local work=$1
  [[ -e $work.pulled ]] && return 0
  log "waiting for process 0 to pull $S3_PREFIX/workdir/ into the shared $work"
  retry 1800 2 test -e "$work.pulled" || die "process 0 did not pull the workdir into $work within an hour"
}

cmd_run() {
  validate_common
  need RUN_CONFIG
  check_int NODES 1
  check_int PROCESS_ID 0 $((NODES - 1))
  check_int COORDINATOR_PORT 1024 65535
  ((NODES == 1)) || [[ -n $SHARED_DIR ]] \
    || die "NODES=$NODES needs SHARED_DIR, one directory that every process sees, for the workdir (up mounts the run's EFS at $CLUSTER_SHARED_DIR)"
  local home=${CXRJAX_HOME:-/opt/cxrjax} config=${RUN_CONFIG%%:*} work nih cache logs venv
  local config_arg size prepared wandb_key="" ip syncer trainer watcher status online=()
  # Local volume: data, venv, cache, logs. The workdir: there too, or on the shared mount.
  work="${SHARED_DIR:-$home}/work/$(run_name)"
  nih="$home/data/nih"
  cache="$home/jax-cache"
  logs="$home/logs"
  venv="$home/venv"
  config_arg="configs/$config.py${RUN_CONFIG#"$config"}"  # configs/NAME.py[:variant]
  mkdir -p "$nih" "$cache" "$logs"
  exec > >(tee -a "$logs/run.log") 2>&1
  log "run $(run_name): config $RUN_CONFIG, process $PROCESS_ID of $NODES, home $home, workdir $work"

  # Called in conditions, where set -e is off inside: each upload's status is kept by hand.
  sync_up() {  # every process its log; process 0 the workdir, which all of them share
    local failed=0
    if ((PROCESS_ID == 0)); then
      s3_sync "$work/" "$S3_PREFIX/workdir/" --exclude '*.orbax-checkpoint-tmp*' --exclude 'checkpoints/*' \
        || { log "uploading $work to $S3_PREFIX/workdir/ failed"; failed=1; }
      # S3 keeps the checkpoints orbax keeps: the steps it deleted here go there too (the
      # workdir was pulled from S3 first, so nothing that S3 alone holds is deleted).
      if [[ -d $work/checkpoints ]]; then
        s3_sync "$work/checkpoints/" "$S3_PREFIX/workdir/checkpoints/" --delete --exclude '*.orbax-checkpoint-tmp*' \
          || { log "uploading $work to $S3_PREFIX/workdir/ failed"; failed=1; }
      fi
    fi
    s3_sync "$logs/" "$S3_PREFIX/logs/process-$PROCESS_ID/" \
      || { log "uploading $logs to $S3_PREFIX/logs/process-$PROCESS_ID/ failed"; failed=1; }
    return "$failed"
  }
  on_rebalance() {  # PID: SIGUSR1 it, then upload the checkpoint the trainer saves (within 10 minutes)
    local before
    before=$(newest_checkpoint "$work")
    kill -USR1 "$1" 2>/dev/null || true
    retry 300 2 newer_checkpoint "$work" "$before" || { log "no checkpoint after the rebalance recommendation"; return 0; }
    log "rebalance: checkpoint $(newest_checkpoint "$work") saved; uploading it"
    sync_up || log "rebalance: upload failed; the periodic sync tries again"
  }
  # The watcher starts now, so a notice during set-up (pip, data) stops the run too; this
  # script passes SIGTERM and SIGUSR1 on to the trainer once it runs. SIGUSR1 is ignored
  # until then, and the trainer starts with it ignored until its own handler is in place.
  trap '' USR1
  spot_watch "$$" &
  watcher=$!
  cd "$REPO_DIR"
  [[ -f configs/$config.py ]] || die "configs/$config.py not found in $REPO_DIR"

  if [[ ! -x $venv/bin/cxrjax ]]; then
    log "installing cxrjax with GPU jax into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "${REPO_DIR}[gpu]"
  fi
  # The recipe decides the resolution; the prepared shards must match it.
  size=$("$venv/bin/python" -c 'import sys; from cxrjax.cli import load_config
print(load_config(sys.argv[1], []).data.image_size)' "$config_arg")
  prepared="$home/data/prepared-$size"

  # Prepared shards: this volume's, else an earlier instance's upload, else NIH + prepare.
  [[ -f $prepared/manifest.json ]] || s3_sync "$S3_PREFIX/prepared-$size/" "$prepared/"
  if [[ ! -f $prepared/manifest.json ]] && ((PROCESS_ID > 0)); then
    log "waiting for process 0 to prepare the data and upload $S3_PREFIX/prepared-$size/"
    until aws --region "$REGION" s3 ls "$S3_PREFIX/prepared-$size/manifest.json" >/dev/null 2>&1; do sleep 60; done
    s3_sync "$S3_PREFIX/prepared-$size/" "$prepared/"
  fi
  if [[ ! -f $prepared/manifest.json ]]; then
    if [[ ! -f $nih/.fetched ]]; then
      log "fetching NIH ChestX-ray14 from $S3_PREFIX/nih/"
      s3_sync "$S3_PREFIX/nih/" "$nih/"
      [[ -n $(ls -A "$nih") ]] || die "no NIH data under $S3_PREFIX/nih/; upload it once with: aws s3 sync /path/to/nih $S3_PREFIX/nih/"
      touch "$nih/.fetched"
    fi
    "$venv/bin/cxrjax" prepare --nih-dir "$nih" --out "$prepared" --image-size "$size"
    # Shards first, manifest last, so a half-finished upload never looks complete.
    s3_sync "$prepared/" "$S3_PREFIX/prepared-$size/" --exclude manifest.json
    aws --region "$REGION" s3 cp --only-show-errors "$prepared/manifest.json" "$S3_PREFIX/prepared-$size/manifest.json"
  fi

  # A workdir that was never pulled (a fresh volume or file system) starts from the run's
  # upload, so the trainer resumes there. Process 0 pulls; the marker beside the workdir
  # (never uploaded) tells the others that the pull is whole.
  if ((PROCESS_ID == 0)); then
    if [[ ! -e $work.pulled ]]; then
      log "pulling $S3_PREFIX/workdir/ into $work (nothing there on a first launch)"
      mkdir -p "$work"
      s3_sync "$S3_PREFIX/workdir/" "$work/"
      touch "$work.pulled"
    fi
  else
    wait_for_pull "$work"
  fi

  if ((NODES > 1)) && [[ -z $COORDINATOR ]]; then  # process 0 hosts the coordinator
    ip=$(imds_get meta-data/local-ipv4) || die "cannot read this instance's address from $IMDS"
    COORDINATOR="$ip:$COORDINATOR_PORT"
  fi
  if wandb_key=$(aws --region "$REGION" ssm get-parameter --name "$WANDB_PARAMETER" --with-decryption \
    --query Parameter.Value --output text 2>/dev/null); then
    log "wandb key read from SSM parameter $WANDB_PARAMETER: logging to wandb online"
    online=(--config.wandb.mode=online)
  else
    wandb_key=""
    log "no readable SSM parameter $WANDB_PARAMETER: wandb stays as the config says (offline by default)"
  fi

  sync_loop() {  # its sleep dies with it, so nothing lingers on the log pipe after the run
    local nap
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "$SYNC_INTERVAL" &
      nap=$!
      wait "$nap"
      sync_up || log "periodic S3 sync failed; next try in ${SYNC_INTERVAL}s"
    done
  }
  sync_loop &
  syncer=$!
  (  # the key reaches the trainer's environment only, never an argument list or a file
    export JAX_COMPILATION_CACHE_DIR=$cache
    if ((NODES > 1)); then
      export CXRJAX_COORDINATOR=$COORDINATOR CXRJAX_NUM_PROCESSES=$NODES CXRJAX_PROCESS_ID=$PROCESS_ID
    fi
    [[ -z $wandb_key ]] || export WANDB_API_KEY=$wandb_key
    exec "$venv/bin/cxrjax" train --config "$config_arg" --workdir "$work" "--config.$DATA_FIELD=$prepared" "${online[@]}"
  ) &
  trainer=$!
  wandb_key=""
  # A stop of this script (systemd, shutdown) reaches the trainer as the same request to checkpoint.
  trap 'log "stop requested: the trainer checkpoints and exits"; kill -TERM "$trainer" 2>/dev/null || true' TERM INT
  trap 'kill -USR1 "$trainer" 2>/dev/null || true' USR1
  while :; do
    status=0
    wait "$trainer" || status=$?
    kill -0 "$trainer" 2>/dev/null || break  # else a trapped signal interrupted the wait
  done
  trap - TERM INT
  trap '' USR1
  kill "$syncer" "$watcher" 2>/dev/null || true
  local upload="uploading $work to $S3_PREFIX/workdir/"
  ((PROCESS_ID == 0)) || upload="process 0 uploads the shared $work"
  if [[ -f $work/done.json ]]; then
    log "training finished; $upload"
  elif ((status == 0)); then
    log "trainer checkpointed and stopped early; $upload, so the next start resumes from it"
  else
    log "trainer failed with status $status; $upload"
  fi
  if ! sync_up && ((status == 0)); then
    status=1  # systemd starts the run again, and its first act is this upload's retry
    log "the final upload failed; exiting with status $status so that it is retried"
  fi
  return "$status"
}

# ---------------------------------------------------------------- main

main() {
  (($#)) || usage 2
  local command=$1
  shift
  ARGS=("$@")
  parse_args "$@"
  case $command in
    up) cmd_up ;;
    keep) cmd_keep ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    down) cmd_down ;;
    cost) cmd_cost ;;
    iam-policy) cmd_iam_policy ;;
    iam-setup) cmd_iam_setup ;;
    run) cmd_run ;;
    watch-spot) cmd_watch_spot ;;
    -h | --help | help) usage 0 ;;
    *) die "unknown command $command (see --help)" ;;
  esac
  ((!DRY_RUN)) || log "dry run: no AWS call was made"
}

main "$@"
