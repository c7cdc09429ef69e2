"""Shared by the launch tests: a committed throwaway repository for the script to ship,
the script run as a subprocess with no real AWS setting, and moto's server on loopback.

Nothing here reaches a network beyond 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

# Recognizable fake secrets: none of them may show up in any output, user-data or S3 object.
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fakeSECRETkey0do0not0print0ZZZ",
    "AWS_SESSION_TOKEN": "fakeSESSIONtoken0do0not0print0YYY",
    "WANDB_API_KEY": "fakeWANDBkey0from0env0XXX",
}
WANDB_IN_SSM = "fakeWANDBkey0in0ssm0WWW"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any real AWS or wandb setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WANDB_"))}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    env.update(extra)
    return env


STUB_CONFIG = '''"""Stub recipe for the launch tests: only the resolution matters to `run`."""
import ml_collections


def get_config(variant=""):
    return ml_collections.ConfigDict({"data": {"image_size": 48 if variant else 40}})
'''


@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    """A committed copy of launch/ with a stub configs/demo.py, for `up` to ship."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(LAUNCH, root / "launch")
    (root / "configs").mkdir()
    (root / "configs" / "demo.py").write_text(STUB_CONFIG)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "stub"], check=True)
    return root


def script(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [str(repo / "launch" / "g5_24xlarge.sh"), *args],
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_no_secret(text: str, where: str) -> None:
    for name, value in {**SECRETS, "ssm wandb key": WANDB_IN_SSM}.items():
        assert value not in text, f"{name} leaked into {where}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def aws(tmp_path_factory):
    """moto's server mode on 127.0.0.1 with a VPC, subnet, bucket and the SSM wandb key.

    One per test process: moto keeps its accounts in the process, so a second server would
    see the first one's. Tests keep apart by run name (their S3 prefix and tags)."""
    pytest.importorskip("flask", reason="moto's server mode needs moto[server] (dev extras)")
    if shutil.which("aws") is None:
        pytest.fail("the aws CLI is not installed: install the dev extras (awscli)")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = clean_env(
        AWS_ACCESS_KEY_ID="AKIAFAKEFAKEFAKE",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        CXRJAX_AWS_POLL_SECONDS="1",  # moto changes a resource's state at once
        **SECRETS,
    )
    session = boto3.Session(
        aws_access_key_id="AKIAFAKEFAKEFAKE",
        aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    clients = {name: session.client(name, endpoint_url=endpoint) for name in ("ec2", "s3", "iam", "ssm", "efs")}
    vpc = clients["ec2"].create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    # A zone with g5 instances (moto, like AWS, offers none in us-east-1e).
    subnet = clients["ec2"].create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")["Subnet"][
        "SubnetId"
    ]
    ami = clients["ec2"].describe_images()["Images"][0]["ImageId"]
    clients["s3"].create_bucket(Bucket="cxrjax-bucket")
    clients["ssm"].put_parameter(Name="/cxrjax/wandb-api-key", Value=WANDB_IN_SSM, Type="SecureString")
    yield {"env": env, "vpc": vpc, "subnet": subnet, "ami": ami, **clients}
    server.stop()


def s3_objects(s3, prefix: str) -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket="cxrjax-bucket", Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket="cxrjax-bucket", Key=o["Key"])["Body"].read() for o in listing}


def load_run_cost():
    """launch/run_cost.py as a module: it lives beside the script, outside the package."""
    spec = importlib.util.spec_from_file_location("run_cost", LAUNCH / "run_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording_aws(directory: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose `aws` writes each call's service and action to a log, then runs the
    real CLI. The script always calls `aws --region R SERVICE ACTION ...`."""
    real = shutil.which("aws")
    assert real, "the aws CLI is not installed: install the dev extras (awscli)"
    bin_dir, log = directory / "recording-bin", directory / "aws-calls"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "aws").write_text(
        f'#!/bin/bash\nprintf "%s %s\\n" "$3" "$4" >>{shlex.quote(str(log))}\nexec {shlex.quote(real)} "$@"\n'
    )
    (bin_dir / "aws").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def dry_run_calls(stdout: str) -> list[str]:
    """'SERVICE ACTION' of each call a --dry-run printed."""
    return [" ".join(line.split()[4:6]) for line in stdout.splitlines() if line.startswith("[dry-run] aws ")]


def refusing_aws(directory: Path, refusals: dict[str, str]) -> dict[str, str]:
    """A PATH whose `aws` fails any call whose words contain a key of `refusals`, printing
    that key's message as the AWS CLI prints a service error (exit 254); every other call
    runs the real CLI. Stands in for AWS refusing a launch or an upload."""
    real = shutil.which("aws")
    assert real, "the aws CLI is not installed: install the dev extras (awscli)"
    bin_dir = directory / "refusing-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    cases = "".join(
        f"  *{shlex.quote(pattern)}*) printf '%s\\n' {shlex.quote(message)} >&2; exit 254 ;;\n"
        for pattern, message in refusals.items()
    )
    (bin_dir / "aws").write_text(f'#!/bin/bash\ncase "$*" in\n{cases}esac\nexec {shlex.quote(real)} "$@"\n')
    (bin_dir / "aws").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


CAPACITY_ERROR = (
    "An error occurred (InsufficientInstanceCapacity) when calling the RunInstances operation: "
    "We currently do not have sufficient g5.24xlarge capacity in the Availability Zone you requested"
)
