"""The on-node part of a cxrjax spot run (SkyPilot's run step calls it through
`g5_24xlarge.sh run`): data and workdir from S3, the trainer, the spot watcher, the S3 sync,
and an exit code that tells SkyPilot's jobs controller what happened:

    0          the run is done (done.json in the workdir; results uploaded)
    75         stopped early with a checkpoint (a spot notice, a stop request): resume it;
               launch/skypilot.yaml lists it in job_recovery.recover_on_exit_codes
    any other  a failure (the trainer's own status, or 1): retried at most
               max_restarts_on_errors times

SkyPilot does not pass spot notices to the task (skypilot #5041), so the watcher polls
IMDSv2 itself. Checkpoints go to S3 by `aws s3 sync` (the node's venv has the AWS CLI), not
through a mounted bucket, whose newest checkpoint can be incomplete after a preemption.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

DONE, PREEMPTED, FAILED = 0, 75, 1
IMDS = os.environ.get("CXRJAX_IMDS_ENDPOINT", "http://169.254.169.254")
SPOT_POLL = float(os.environ.get("CXRJAX_SPOT_POLL_SECONDS", "5"))
HEARTBEAT = float(os.environ.get("CXRJAX_HEARTBEAT_SECONDS", "10"))
PEER_TIMEOUT = float(os.environ.get("CXRJAX_PEER_TIMEOUT_SECONDS", "90"))
STOP_GRACE = float(os.environ.get("CXRJAX_STOP_GRACE_SECONDS", "30"))
UPLOAD_RETRY = float(os.environ.get("CXRJAX_UPLOAD_RETRY_SECONDS", "5"))
NOTICE = "meta-data/spot/instance-action"
REBALANCE = "meta-data/events/recommendations/rebalance"

log = logging.getLogger("cxrjax.node")
FORMAT = logging.Formatter("[cxrjax %(asctime)s] %(message)s", "%H:%M:%S")


# ---------------------------------------------------------------- IMDSv2


class Imds:
    """IMDSv2: a session token from PUT api/token, then GETs carrying it (401 without)."""

    def __init__(self, endpoint: str = IMDS):
        self.endpoint, self.token = endpoint.rstrip("/"), ""

    def _token(self) -> str:
        request = urllib.request.Request(
            f"{self.endpoint}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
        )
        with urllib.request.urlopen(request, timeout=2) as reply:
            return reply.read().decode()

    def get(self, path: str) -> tuple[int, str]:
        """(HTTP status, body); status 0 when the service cannot be reached."""
        try:
            self.token = self.token or self._token()
            request = urllib.request.Request(
                f"{self.endpoint}/latest/{path}", headers={"X-aws-ec2-metadata-token": self.token}
            )
            with urllib.request.urlopen(request, timeout=2) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 401:
                self.token = ""  # expired: take a new one next time
            return e.code, ""
        except OSError:
            return 0, ""


class SpotWatcher(threading.Thread):
    """Polls for a spot interruption notice (then `on_notice()`) and the first rebalance
    recommendation (then `on_rebalance()`), until `stop()`."""

    def __init__(self, on_notice, on_rebalance, imds: Imds | None = None, poll: float = SPOT_POLL):
        super().__init__(daemon=True)
        self.imds, self.poll, self.on_notice, self.on_rebalance = imds or Imds(), poll, on_notice, on_rebalance
        self.noticed = threading.Event()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        warned = rebalanced = False
        while not self._halt.is_set():
            status, body = self.imds.get(NOTICE)
            if status == 200:
                log.info(f"spot interruption notice {body.strip()}; stopping the trainer (SIGTERM) for a checkpoint")
                self.noticed.set()
                self.on_notice()
                return
            if status not in (404, 401) and not warned:
                log.warning(f"instance metadata at {self.imds.endpoint} answered HTTP {status}; still polling")
                warned = True
            if not rebalanced and self.imds.token:
                status, body = self.imds.get(REBALANCE)
                if status == 200:
                    rebalanced = True
                    log.info(f"spot rebalance recommendation {body.strip()}; asking the trainer for a checkpoint")
                    threading.Thread(target=self.on_rebalance, daemon=True).start()
            self._halt.wait(self.poll)


# ---------------------------------------------------------------- S3 through the AWS CLI


class S3:
    def __init__(self, prefix: str, region: str):
        self.prefix, self.region = prefix, region

    def aws(self, *args: str, check: bool = True) -> bool:
        result = subprocess.run(["aws", "--region", self.region, *args], capture_output=True, text=True)
        if result.returncode and check:
            log.error(f"aws {' '.join(args[:2])} failed: {(result.stderr or result.stdout).strip()[-500:]}")
        return result.returncode == 0

    def pull(self, key: str, local: Path, *extra: str) -> bool:
        return self.aws("s3", "sync", "--only-show-errors", f"{self.prefix}/{key}", str(local), *extra)

    def push(self, local: Path, key: str, *extra: str) -> bool:
        return self.aws("s3", "sync", "--only-show-errors", str(local), f"{self.prefix}/{key}", *extra)

    def exists(self, key: str) -> bool:
        return self.aws("s3", "ls", f"{self.prefix}/{key}", check=False)

    def put(self, local: Path, key: str) -> bool:
        return self.aws("s3", "cp", "--only-show-errors", str(local), f"{self.prefix}/{key}")


# ---------------------------------------------------------------- the run


def newest_step(work: Path) -> int | None:
    """The newest finished checkpoint step: orbax renames a step's temporary folder to its
    number when the save is complete."""
    from cxrjax.workdir import CHECKPOINTS

    steps = [int(p.name) for p in (work / CHECKPOINTS).glob("*") if p.name.isdigit() and p.is_dir()]
    return max(steps, default=None)


class Node:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        home = Path(args.home)
        self.home, self.venv, self.logs = home, home / "venv", home / "logs"
        self.work = Path(args.shared_dir or home) / "work" / args.run
        self.s3 = S3(args.s3_prefix, args.region)
        self.trainer: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self.peer_lost = ""

    # -- signals: a stop (SkyPilot cancel, shutdown, notice) is a checkpoint request
    def stop(self, *_) -> None:
        self.stop_requested.set()
        if self.trainer and self.trainer.poll() is None:
            self.trainer.send_signal(signal.SIGTERM)

    def checkpoint(self, *_) -> None:
        if self.trainer and self.trainer.poll() is None:
            self.trainer.send_signal(signal.SIGUSR1)

    def rebalance(self) -> None:
        """SIGUSR1, then upload the checkpoint it produces (within ten minutes)."""
        before = newest_step(self.work)
        self.checkpoint()
        for _ in range(300):
            step = newest_step(self.work)
            if step is not None and (before is None or step > before):
                log.info(f"rebalance: checkpoint {step} saved; uploading it")
                self.sync()
                return
            time.sleep(2)
        log.warning("no checkpoint after the rebalance recommendation")

    def sync(self) -> bool:
        """Process 0 the (shared) workdir, every process its log; False if an upload failed.
        S3 keeps the checkpoints orbax keeps (--delete on checkpoints/ only)."""
        from cxrjax.workdir import CHECKPOINTS

        ok = True
        if self.a.process_id == 0 and self.work.is_dir():
            ok &= self.s3.push(
                self.work, "workdir", "--exclude", "*.orbax-checkpoint-tmp*", "--exclude", f"{CHECKPOINTS}/*"
            )
            if (self.work / CHECKPOINTS).is_dir():
                ok &= self.s3.push(
                    self.work / CHECKPOINTS,
                    f"workdir/{CHECKPOINTS}",
                    "--delete",
                    "--exclude",
                    "*.orbax-checkpoint-tmp*",
                )
        ok &= self.s3.push(self.logs, f"logs/process-{self.a.process_id}")
        return ok

    def record_instance(self) -> None:
        """What was actually launched, for `g5_24xlarge.sh cost`: type, zone, market, nodes."""
        imds = Imds()
        fields = {
            "instance_type": "meta-data/instance-type",
            "availability_zone": "meta-data/placement/availability-zone",
            "lifecycle": "meta-data/instance-life-cycle",
        }
        info = {
            name: (body if status == 200 else None)
            for name, (status, body) in ((n, imds.get(p)) for n, p in fields.items())
        }
        info.update(nodes=self.a.nodes, process_id=self.a.process_id, time=time.time())
        (self.logs / "instance.json").write_text(json.dumps(info))
        log.info(f"instance: {info}")

    def prepared(self, size: int) -> Path:
        """This volume's shards, else an earlier node's upload, else NIH + `cxrjax prepare`."""
        out = self.home / "data" / f"prepared-{size}"
        key = f"prepared-{size}"
        if not (out / "manifest.json").exists():
            self.s3.pull(key, out)
        while not (out / "manifest.json").exists() and self.a.process_id > 0:
            log.info(f"waiting for process 0 to prepare the data and upload {self.a.s3_prefix}/{key}/")
            self.wait(60)
            self.s3.pull(key, out)
        if not (out / "manifest.json").exists():
            nih = self.home / "data" / "nih"
            log.info(f"fetching NIH ChestX-ray14 from {self.a.s3_prefix}/nih/")
            self.s3.pull("nih", nih)
            self.wait(0)
            if not nih.is_dir() or not any(nih.iterdir()):
                raise SystemExit(
                    f"no NIH data under {self.a.s3_prefix}/nih/; upload it once with: aws s3 sync /path/to/nih {self.a.s3_prefix}/nih/"
                )
            self.run_checked(
                [
                    str(self.venv / "bin" / "cxrjax"),
                    "prepare",
                    "--nih-dir",
                    str(nih),
                    "--out",
                    str(out),
                    "--image-size",
                    str(size),
                ]
            )
            self.wait(0)
            # Shards first, manifest last, so a half-finished upload never looks complete.
            self.s3.push(out, key, "--exclude", "manifest.json")
            self.s3.put(out / "manifest.json", f"{key}/manifest.json")
        return out

    def run_checked(self, command: list[str]) -> None:
        code = subprocess.run(command).returncode
        if code:
            raise SystemExit(f"{command[0]} {command[1]} failed with status {code}")

    def wait(self, seconds: float) -> None:
        """Sleep, unless a stop (a notice) comes first: then end the set-up."""
        if self.stop_requested.wait(seconds):
            raise Preempted("stopped during set-up")

    def pull_workdir(self) -> None:
        """A workdir never pulled (a new volume or shared file system) starts from the run's
        upload. Process 0 pulls; the marker beside the workdir tells the others it is whole."""
        marker = self.work.with_name(self.work.name + ".pulled")
        if self.a.process_id == 0:
            if not marker.exists():
                log.info(f"pulling {self.a.s3_prefix}/workdir/ into {self.work} (nothing there on a first launch)")
                self.work.mkdir(parents=True, exist_ok=True)
                if not self.s3.pull("workdir", self.work):
                    raise SystemExit(f"cannot pull {self.a.s3_prefix}/workdir/")
                marker.touch()
            return
        for _ in range(1800):
            if marker.exists():
                return
            self.wait(2)
        raise SystemExit(f"process 0 did not pull the workdir into {self.work} within an hour")

    def heartbeat(self) -> None:
        """Several nodes: each touches its file beside the shared workdir; a peer whose file
        falls PEER_TIMEOUT behind ours (its node died) stops this node too, so SkyPilot can
        recover the cluster instead of a trainer waiting on a dead peer."""
        beats = self.work.with_name(self.work.name + ".nodes")
        beats.mkdir(parents=True, exist_ok=True)
        mine = beats / f"process-{self.a.process_id}"
        mine.write_text("alive")
        started = mine.stat().st_mtime  # a peer's file from an earlier launch counts once rewritten
        while self.trainer is None or self.trainer.poll() is None:
            mine.write_text("alive")
            for peer in range(self.a.nodes):
                path = beats / f"process-{peer}"
                if peer == self.a.process_id or not path.exists() or path.read_text() != "alive":
                    continue
                if path.stat().st_mtime < started:
                    continue
                behind = mine.stat().st_mtime - path.stat().st_mtime
                if behind > PEER_TIMEOUT:
                    self.peer_lost = f"process {peer} has not been heard from for {behind:.0f} s (its node is gone)"
                    log.error(f"{self.peer_lost}; stopping this node so that SkyPilot recovers the cluster")
                    self.stop()
                    if self.trainer is not None and self.trainer.poll() is None:
                        try:
                            self.trainer.wait(STOP_GRACE)
                        except subprocess.TimeoutExpired:
                            self.trainer.kill()
                    return
            time.sleep(HEARTBEAT)
        mine.write_text("exited")

    def main(self) -> int:
        from cxrjax.errors import InputError
        from cxrjax.workdir import read_done

        self.logs.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.logs / "run.log")
        handler.setFormatter(FORMAT)
        logging.getLogger().addHandler(handler)
        log.info(
            f"run {self.a.run}: config {self.a.run_config}, process {self.a.process_id} of {self.a.nodes}, workdir {self.work}"
        )
        watcher = SpotWatcher(self.stop, self.rebalance)
        watcher.start()  # a notice during set-up (pip, data) stops the run there too
        try:
            self.record_instance()
            self.s3.push(self.logs, f"logs/process-{self.a.process_id}")
            from cxrjax.config import load_config

            name, _, variant = self.a.run_config.partition(":")
            config_arg = f"configs/{name}.py" + (f":{variant}" if variant else "")
            size = load_config(config_arg, []).data.image_size
            self.wait(0)
            prepared = self.prepared(size)
            self.wait(0)
            self.pull_workdir()
            code = self.train(config_arg, prepared)
        except Preempted as e:
            log.info(f"{e}; exiting {PREEMPTED} so that SkyPilot resumes the run on a new node")
            self.s3.push(self.logs, f"logs/process-{self.a.process_id}")
            return PREEMPTED
        finally:
            watcher.stop()
        try:
            done = read_done(self.work) is not None
        except InputError as e:  # a done.json that is not the trainer's: not done, and say why
            log.error(str(e))
            done, code = False, code or FAILED
        if self.peer_lost:
            verdict = FAILED
            log.error(f"exiting {FAILED}: {self.peer_lost}")
        elif done:
            verdict = DONE
            log.info("training finished")
        elif code == 0:
            verdict = PREEMPTED
            log.info(f"the trainer checkpointed and stopped early; exiting {PREEMPTED} so that SkyPilot resumes it")
        else:
            verdict = code if code > 0 and code != PREEMPTED else FAILED
            log.error(f"the trainer failed with status {code}; exiting {verdict}")
        for attempt in range(3):  # the checkpoint or the results must reach S3
            if self.sync():
                break
            log.warning(f"upload {attempt + 1} of 3 failed")
            time.sleep(UPLOAD_RETRY)
        else:
            log.error(f"the final upload to {self.a.s3_prefix}/workdir/ failed; exiting {FAILED}")
            return FAILED
        return verdict

    def train(self, config_arg: str, prepared: Path) -> int:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(self.home / "jax-cache"))
        if self.a.nodes > 1:
            env.update(
                CXRJAX_COORDINATOR=self.a.coordinator,
                CXRJAX_NUM_PROCESSES=str(self.a.nodes),
                CXRJAX_PROCESS_ID=str(self.a.process_id),
            )
        command = [str(self.venv / "bin" / "cxrjax"), "train", "--config", config_arg, "--workdir", str(self.work)]
        command.append(f"--config.data.prepared={prepared}")
        key = subprocess.run(
            ["aws", "--region", self.a.region, "ssm", "get-parameter", "--name", self.a.wandb_parameter,
             "--with-decryption", "--query", "Parameter.Value", "--output", "text"],
            capture_output=True, text=True,
        )  # fmt: skip
        if key.returncode == 0:
            log.info(f"wandb key read from SSM parameter {self.a.wandb_parameter}: logging to wandb online")
            env["WANDB_API_KEY"] = key.stdout.strip()  # the trainer's environment only
            command.append("--config.wandb.mode=online")
        else:
            log.info(f"no readable SSM parameter {self.a.wandb_parameter}: wandb stays as the config says")
        if self.stop_requested.is_set():
            raise Preempted("stopped during set-up")
        self.trainer = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_trainer_preexec,
        )
        tee = threading.Thread(target=self.tee, args=(self.trainer.stdout,), daemon=True)
        tee.start()
        if self.a.nodes > 1:
            threading.Thread(target=self.heartbeat, daemon=True).start()
        syncer = threading.Event()

        def sync_loop():
            while not syncer.wait(self.a.sync_interval):
                if not self.sync():
                    log.warning(f"periodic S3 sync failed; next try in {self.a.sync_interval} s")

        threading.Thread(target=sync_loop, daemon=True).start()
        code = self.trainer.wait()
        tee.join(10)
        syncer.set()
        return code

    def tee(self, stream) -> None:
        """The trainer's output to this node's stdout (SkyPilot's job log) and run.log."""
        with open(self.logs / "run.log", "ab") as copy:
            for line in iter(stream.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                copy.write(line)
                copy.flush()


def _trainer_preexec() -> None:
    """In the trainer before exec: SIGUSR1 ignored until its own handler is in place, and
    (Linux) killed with this process, so a run step that dies leaves no trainer behind."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Preempted(Exception):
    """Stopped before training began: nothing to checkpoint, resume on a new node."""


def watch_spot(pid: int) -> int:
    """`g5_24xlarge.sh watch-spot --pid PID`: SIGTERM on a notice, SIGUSR1 on a rebalance."""

    def send(sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    watcher = SpotWatcher(lambda: send(signal.SIGTERM), lambda: send(signal.SIGUSR1))
    watcher.start()
    while watcher.is_alive():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            watcher.stop()
            break
        watcher.join(0.2)
    return 0


def main(argv: list[str] | None = None) -> int:
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(FORMAT)
    logging.basicConfig(level=logging.INFO, handlers=[console])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch-spot")
    watch.add_argument("--pid", type=int, required=True)
    run = sub.add_parser("run")
    for name in ("s3-prefix", "region", "run", "run-config", "wandb-parameter", "home"):
        run.add_argument(f"--{name}", required=True)
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument("--process-id", type=int, default=0)
    run.add_argument("--coordinator", default="")
    run.add_argument("--shared-dir", default="")
    run.add_argument("--sync-interval", type=float, default=600)
    args = parser.parse_args(argv)
    if args.command == "watch-spot":
        return watch_spot(args.pid)
    node = Node(args)
    signal.signal(signal.SIGTERM, node.stop)
    signal.signal(signal.SIGINT, node.stop)
    signal.signal(signal.SIGUSR1, node.checkpoint)
    try:
        return node.main()
    except SystemExit as e:
        if isinstance(e.code, str):
            log.error(e.code)
            return FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
