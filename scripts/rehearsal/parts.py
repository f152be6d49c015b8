"""The parts of the documented cluster, started on one machine, on 127.0.0.1 only.

- `ObjectStore`: moto's S3-compatible server (in memory) with one bucket: Tune's storage and
  MLflow's artifacts, as S3 is on AWS.
- `MlflowServer`: a real `mlflow server` (sqlite backend in the head's folder, artifacts
  proxied to the bucket), which can be stopped and started again on the same port.
- `Nodes`: a Ray head and workers as separate raylets (`ray.cluster_utils.Cluster`), each
  with its own folder: working directory, TMPDIR, DSDM_CACHE, MPLCONFIGDIR and Ray temp dir.
  Every Ray worker process loads the audit `sitecustomize` below, which records each file
  access (Python's audit events) under another node's folder or the driver's.

Every process is started in its own session and stopped with its whole group.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
REGION = "us-east-1"

# Every process of the rehearsal: loopback Ray, fake credentials (moto accepts any), and no
# lookup of EC2 instance metadata or of a proxy: nothing leaves 127.0.0.1.
BASE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "MPLBACKEND": "Agg", "GIT_PYTHON_REFRESH": "quiet", "OMP_WAIT_POLICY": "PASSIVE"}

# Loaded by every Python process a node's raylet starts (its PYTHONPATH); inert elsewhere.
AUDIT = r'''
import os, sys
_log = os.environ.get("DSDM_AUDIT_LOG")
if _log and (os.environ.get("DSDM_AUDIT_ALL") or any(a.endswith("default_worker.py") for a in sys.argv)):
    import json
    _node = os.environ.get("DSDM_AUDIT_NODE", "?")
    _forbid = [p for p in os.environ.get("DSDM_AUDIT_FORBID", "").split(os.pathsep) if p]
    # event -> how many of its first arguments are paths
    _events = {"open": 1, "os.mkdir": 1, "os.rename": 2, "os.remove": 1, "os.rmdir": 1, "os.truncate": 1,
               "os.symlink": 2, "os.link": 2, "os.chdir": 1, "shutil.copyfile": 2, "shutil.rmtree": 1,
               "os.utime": 1, "os.chmod": 1}
    _busy = []

    def _dsdm_audit(event, args):
        count = _events.get(event)
        if count is None or _busy:
            return
        _busy.append(1)
        try:
            for path in args[:count]:
                if hasattr(path, "__fspath__"):
                    path = os.fspath(path)
                if isinstance(path, bytes):
                    path = os.fsdecode(path)
                if not isinstance(path, str):
                    continue  # a file descriptor
                full = os.path.abspath(path)
                hit = next((r for r in _forbid if full == r or full.startswith(r + os.sep)), None)
                if hit is not None:
                    import time, traceback
                    # a read of a file that is not there finds nothing here, nor on a real cluster (e.g.
                    # linecache trying the driver's cwd, which Ray puts on every worker's sys.path)
                    lookup = event == "open" and not os.path.exists(full) and not (
                        any(c in args[1] for c in "wax+") if isinstance(args[1], str)
                        else args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                    line = json.dumps({"node": _node, "pid": os.getpid(), "time": time.time(), "event": event, "path": full,
                                       "under": hit, "lookup": bool(lookup), "stack": traceback.format_stack(limit=6)[:-1]})
                    fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    os.write(fd, (line + "\n").encode())
                    os.close(fd)
        finally:
            _busy.clear()

    sys.addaudithook(_dsdm_audit)
    _marks = os.environ.get("DSDM_AUDIT_MARKS")
    if _marks:
        open(os.path.join(_marks, f"{_node}-{os.getpid()}"), "w").close()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSDM_FAULT_", "RAY_ADDRESS", "DSDM_AUDIT"))}
    return {**env, **BASE_ENV, **extra}


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up in {timeout_s:.0f}s")


def http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open(url, timeout=2).status < 500
    except Exception:
        return False


@dataclass
class Service:
    """A server process in its own session; `stop` ends its whole process group."""
    cmd: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.process = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def stop(self, timeout_s: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_group(self.process, timeout_s)


def stop_group(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class ObjectStore:
    """moto_server on 127.0.0.1 with one bucket (in memory: gone when it stops)."""
    folder: Path
    bucket: str = "dsdm-rehearsal"
    port: int = 0
    service: Service | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def uri(self, path: str, port: int | None = None) -> str:
        """The `--storage` URI of `path` in the bucket (pyarrow's form, endpoint in the query)."""
        return (f"s3://{self.bucket}/{path}?endpoint_override={LOOPBACK}:{port or self.port}"
                f"&scheme=http&region={REGION}")

    def start(self) -> "ObjectStore":
        self.port = free_port()
        self.service = Service([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                               process_env(), self.folder / "moto.log", self.folder)
        self.service.start()
        wait_for(lambda: http_ok(self.endpoint + "/moto-api/"), 60, "moto_server")
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


@dataclass
class MlflowServer:
    """`mlflow server`, sqlite on the head, artifacts proxied to the bucket; restartable on its port."""
    folder: Path  # the head's folder: mlflow.db lives here
    store: ObjectStore
    port: int = 0
    service: Service | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 120, wait: bool = True) -> "MlflowServer":
        self.port = self.port or free_port()
        db = self.folder / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
               "--artifacts-destination", f"s3://{self.store.bucket}/mlflow-artifacts",
               "--host", LOOPBACK, "--port", str(self.port), "--workers", "1"]
        self.service = Service(cmd, process_env(MLFLOW_S3_ENDPOINT_URL=self.store.endpoint),
                               self.folder / "mlflow" / "server.log", db.parent)
        self.service.start()
        self.starts += 1
        if wait:
            self.wait(timeout_s)
        return self

    def wait(self, timeout_s: float = 120) -> None:
        wait_for(lambda: http_ok(self.url + "/health"), timeout_s, "mlflow server")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class NodeSpec:
    name: str
    cpus: float
    gpus: float = 0
    resources: dict = field(default_factory=dict)


class Nodes:
    """A Ray head and workers on loopback; node NAME's folder is root/NAME (cwd/, tmp/, cache/, ray/).
    The driver's folder (root/driver) and every other node's folder are off limits to a node's
    workers: `violations()` lists what the audit saw."""

    def __init__(self, root: Path, specs: list[NodeSpec], object_store_mb: int = 150):
        self.root, self.specs, self.object_store_mb = root, {s.name: s for s in specs}, object_store_mb
        self.driver = root / "driver"
        self.audit = root / "audit"
        self.cluster = None
        self.nodes: dict = {}  # name -> ray._private.node.Node
        self.removed: list[str] = []

    def folder(self, name: str) -> Path:
        return self.root / name

    def start(self) -> "Nodes":
        os.environ.update(BASE_ENV)  # before Ray is imported (loopback); the raylets inherit the S3 credentials
        self.audit.mkdir(parents=True, exist_ok=True)
        (self.audit / "marks").mkdir(exist_ok=True)
        (self.audit / "sitecustomize.py").write_text(AUDIT)
        self.driver.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(self.specs.values()):
            self._add(spec, head=i == 0)
        self.cluster.wait_for_nodes()
        return self

    def _add(self, spec: NodeSpec, head: bool = False) -> None:
        from ray.cluster_utils import Cluster

        args, here = self._node_args(spec), os.getcwd()
        os.chdir(self.folder(spec.name) / "cwd")  # a raylet's workers start in its cwd
        try:
            if head:
                self.cluster = Cluster(initialize_head=True, head_node_args=args)
                self.nodes[spec.name] = self.cluster.head_node
            else:
                self.nodes[spec.name] = self.cluster.add_node(**args)
        finally:
            os.chdir(here)

    def restore(self, name: str) -> None:
        """A removed worker node back (a fresh raylet on the same folder), as an autoscaler replaces it."""
        self._add(self.specs[name])
        self.cluster.wait_for_nodes()

    def _node_args(self, spec: NodeSpec) -> dict:
        folder = self.folder(spec.name)
        for sub in ("cwd", "tmp", "cache", "ray", "mpl"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        others = [str(self.folder(n)) for n in self.specs if n != spec.name]
        env = {"TMPDIR": str(folder / "tmp"), "DSDM_CACHE": str(folder / "cache"), "MPLCONFIGDIR": str(folder / "mpl"),
               "PYTHONPATH": os.pathsep.join([str(self.audit), str(REPO)]),
               "DSDM_AUDIT_LOG": str(folder / "audit.jsonl"), "DSDM_AUDIT_NODE": spec.name,
               "DSDM_AUDIT_MARKS": str(self.audit / "marks"),
               "DSDM_AUDIT_FORBID": os.pathsep.join([*others, str(self.driver)])}
        return {"num_cpus": spec.cpus, "num_gpus": spec.gpus, "resources": {spec.name: 1, **spec.resources},
                "temp_dir": str(folder / "ray"), "env_vars": env,
                "object_store_memory": self.object_store_mb * 1024 * 1024}

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def name_of(self, node_id: str) -> str:
        return next((n for n, node in self.nodes.items() if node.node_id.startswith(node_id)), node_id[:8])

    def remove(self, name: str) -> None:
        """The node and every process on it gone at once (a spot instance reclaimed)."""
        self.cluster.remove_node(self.nodes[name], allow_graceful=False)
        self.removed.append(name)

    def accesses(self) -> list[dict]:
        """What the audit recorded on every node: accesses, and `lookup`s of files not there."""
        out = []
        for name in self.specs:
            log = self.folder(name) / "audit.jsonl"
            if log.is_file():
                out += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return out

    def violations(self) -> list[dict]:
        return [a for a in self.accesses() if not a.get("lookup")]

    def audited_processes(self) -> dict[str, int]:
        """{node: Ray worker processes that ran under the audit}: proof that the audit was on."""
        counts: dict[str, int] = {}
        for mark in (self.audit / "marks").iterdir():
            counts[mark.name.rsplit("-", 1)[0]] = counts.get(mark.name.rsplit("-", 1)[0], 0) + 1
        return counts

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def driver_env(nodes: Nodes, **extra: str) -> dict[str, str]:
    """The driver's environment on the head: the head's caches, the repository on PYTHONPATH."""
    head = nodes.folder(next(iter(nodes.specs)))
    return process_env(PYTHONPATH=str(REPO), DSDM_CACHE=str(head / "cache"), MPLCONFIGDIR=str(head / "mpl"),
                       TMPDIR=str(nodes.driver / "tmp"), **extra)
