"""cluster.yaml (Ray cluster launcher, AWS) and docs/cluster.md: checked offline, no cloud.

The schema is the one shipped in the installed ray wheel (ray/autoscaler/ray-schema.json),
so a Ray upgrade that changes the launcher format shows up here.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
GPU_FAMILIES = re.compile(r"^(g4dn|g5|g5g|g6|g6e|gr6|p3|p4d|p4de|p5|p5e|p5en)\.")


@pytest.fixture(scope="module")
def raw() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(raw) -> dict:
    return yaml.safe_load(raw)


@pytest.fixture(scope="module")
def schema() -> dict:
    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def _walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any, Any]]:
    """(path, key, value) for every mapping entry, and (path, None, item) for list items."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path, None, v
            yield from _walk(v, path + (i,))


def _worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def _gpu_type(config: dict) -> dict:
    gpus = [t for t in _worker_types(config).values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert len(gpus) == 1, "expected exactly one GPU worker node type"
    return gpus[0]


def _all_commands(config: dict) -> list[str]:
    return [c for key in COMMAND_KEYS for c in config.get(key) or []]


def _settings_env(config: dict, tmp_path: Path, head_ip: str | None = "10.1.2.3") -> dict[str, str]:
    """Run the settings part of setup_commands in a sandbox HOME and read the env file back."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / ".bashrc").write_text("# stock bashrc\n")
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if head_ip:
        env["RAY_HEAD_IP"] = head_ip
    for cmd in config["setup_commands"][:3]:
        assert "curl" not in cmd and "install" not in cmd, "settings commands must come first"
        subprocess.run(["bash", "-c", cmd], env=env, check=True, capture_output=True, timeout=30)
    out = subprocess.run(["bash", "-c", ". ~/.dsdm_env && env -0"], env=env, check=True,
                         capture_output=True, timeout=30).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


# --- schema -------------------------------------------------------------------------------

def test_cluster_yaml_validates_against_ray_schema(config, schema):
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_yaml_passes_ray_up_offline_checks(config):
    """What `ray up` does before it talks to AWS: fill in defaults, merge commands, validate."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # private API: moved in a newer Ray
        pytest.skip(f"ray's launcher internals moved: {e}")
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # setup_commands run on both kinds of node, in front of the node-specific ones
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def _drop_node_config(c: dict) -> None:
    del c["available_node_types"][c["head_node_type"]]["node_config"]


def _max_workers_as_string(c: dict) -> None:
    next(iter(_worker_types(c).values()))["max_workers"] = "2"


def _fractional_gpu_resource(c: dict) -> None:
    next(iter(_worker_types(c).values()))["resources"]["GPU"] = 0.5


def _unknown_top_level_key(c: dict) -> None:
    c["settings"] = {"DSDM_DATA": "/data"}  # only `metadata` may carry free-form settings


def _unknown_auth_key(c: dict) -> None:
    c["auth"]["aws_access_key_id"] = "placeholder"


def _no_provider(c: dict) -> None:
    del c["provider"]


@pytest.mark.parametrize("break_it", [_drop_node_config, _max_workers_as_string, _fractional_gpu_resource,
                                      _unknown_top_level_key, _unknown_auth_key, _no_provider])
def test_cluster_schema_rejects_malformed_copy(config, schema, break_it):
    bad = copy.deepcopy(config)
    break_it(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --- no credentials -------------------------------------------------------------------------

_CRED_TEXT = [
    (re.compile(r"aws_access_key_id|aws_secret_access_key|aws_session_token", re.I), "AWS key name"),
    (re.compile(r"secret", re.I), "the word 'secret'"),
    (re.compile(r"passw(or)?d\s*[=:]", re.I), "password assignment"),
    (re.compile(r"RAY_AUTH_TOKEN(?!_PATH)"), "inline Ray token variable"),
    (re.compile(r"bearer\s+\S", re.I), "bearer token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"), "private key block"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "AWS access key id"),
    (re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])"), "long hex string (token?)"),
    (re.compile(r"(?<![A-Za-z0-9+/])(?=[A-Za-z0-9+/]*\d)(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])"
                r"[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])"), "40-char key-like string"),
    (re.compile(r"\w*token\w*\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{16,}", re.I), "token value"),
]
_CRED_KEYS = re.compile(r"access_key|secret|passw|credential|api_?key|^token$|auth_token$|session_token", re.I)


def credential_findings(text: str) -> list[str]:
    return [f"{why}: {m.group(0)[:12]}..." for rx, why in _CRED_TEXT for m in rx.finditer(text)]


def test_cluster_yaml_has_no_credentials(raw, config):
    assert credential_findings(raw) == []
    assert credential_findings(CLUSTER_DOC.read_text()) == []
    for path, key, value in _walk(config):
        if key is not None and path[:1] != ("file_mounts",):  # file_mounts keys are remote paths
            assert not _CRED_KEYS.search(str(key)), f"credential-like key {key!r} at {path}"
    assert set(config["auth"]) == {"ssh_user"}, "no key material in auth: Ray makes its own key pair"
    for key in config["provider"]:
        assert not _CRED_KEYS.search(key) and key != "aws_credentials"
    # the Ray token reaches the nodes as a file copied from the launching machine, never inline
    for remote, local in config["file_mounts"].items():
        if "token" in remote:
            assert local.startswith(("~/", "/")) and local.endswith("auth_token"), local


@pytest.mark.parametrize("planted", [
    lambda: "aws_access_key_id: " + "AKIA" + "Q" * 16,
    lambda: "AKIA" + "7" * 16,
    lambda: "mlflow server --backend-store-uri postgresql://dsdm:" + "x" * 8 + "@db/mlflow # password=" + "x" * 8,
    lambda: "export RAY_AUTH_TOKEN=" + secrets.token_hex(32),
    lambda: "file_mounts: {'~/.ray/auth_token': '" + secrets.token_hex(32) + "'}",
    lambda: "  ray_token: " + secrets.token_urlsafe(24),
    lambda: "key: " + "Ab1/" * 10,
])
def test_cluster_credential_scan_catches_planted_values(planted):
    """The scan above is not vacuous: each planted credential is reported."""
    assert credential_findings(planted())


# --- node types -----------------------------------------------------------------------------

def test_cluster_gpu_worker_declares_gpu_resource(config):
    gpu = _gpu_type(config)
    assert isinstance(gpu["resources"]["GPU"], int) and gpu["resources"]["GPU"] >= 1
    assert gpu["resources"].get("CPU", 1) >= 1
    assert GPU_FAMILIES.match(gpu["node_config"]["InstanceType"]), gpu["node_config"]["InstanceType"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert gpu["max_workers"] >= 1
    # workers write Tune results to S3 themselves: they need an instance profile
    assert gpu["node_config"].get("IamInstanceProfile"), "GPU workers need an instance profile for S3"

    head = config["available_node_types"][config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert not GPU_FAMILIES.match(head["node_config"]["InstanceType"]), "the head is a CPU node"
    assert head.get("max_workers", 0) == 0


# --- settings -------------------------------------------------------------------------------

def test_cluster_settings_sit_at_the_top(raw, config, tmp_path):
    top_keys = [(i, m.group(1)) for i, line in enumerate(raw.splitlines())
                if (m := re.match(r"^([A-Za-z_]+):", line))]
    names = [k for _, k in top_keys]
    assert names[:2] == ["cluster_name", "metadata"], names
    meta_start, meta_end = top_keys[1][0], top_keys[2][0]
    placeholders = [i for i, line in enumerate(raw.splitlines())
                    if "CHANGE-ME" in line and not line.lstrip().startswith("#")]
    assert placeholders, "the S3 bucket and AMI are placeholders to fill in"
    assert all(meta_start < i < meta_end for i in placeholders), "every placeholder sits in the settings"
    # the anchors really feed the config
    s = config["metadata"]["dsdm_settings"]
    gpu = _gpu_type(config)
    assert config["provider"]["region"] == s["region"]
    assert gpu["node_config"]["InstanceType"] == s["gpu_instance_type"]
    assert gpu["max_workers"] == config["max_workers"] == s["gpu_workers_max"]
    assert config["setup_commands"][0] == s["write_env"]


def test_cluster_settings_reach_every_node_environment(config, tmp_path):
    env = _settings_env(config, tmp_path)
    assert Path(env["DSDM_DATA"]).is_absolute()
    assert env["DSDM_STORAGE"].startswith("s3://"), "multi-node Tune needs shared (S3) storage"
    assert env["DSDM_MLFLOW_ARTIFACTS"].startswith("s3://")
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["DSDM_MLFLOW_URI"] == "http://10.1.2.3:5000", "workers reach MLflow on the head's IP"
    assert env["PATH"].split(":")[0].endswith("/dsdm-venv/bin")
    # re-running setup (a second `ray up`) keeps one hook in ~/.bashrc and one URI line
    _settings_env(config, tmp_path)
    home = tmp_path / "home"
    assert (home / ".bashrc").read_text().count(".dsdm_env") == 1
    assert (home / ".dsdm_env").read_text().count("DSDM_MLFLOW_URI") == 1


def test_cluster_commands_are_valid_bash(config):
    if not shutil.which("bash"):
        pytest.skip("bash not found")
    for cmd in _all_commands(config):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"


# --- project install ------------------------------------------------------------------------

def test_cluster_setup_installs_this_project(config):
    mounts = config["file_mounts"]
    remote_repo = [remote for remote, local in mounts.items() if local == "."]
    assert len(remote_repo) == 1, "the checkout (run `ray up` from the repo root) is synced to the nodes"
    remote_repo = remote_repo[0]
    assert 'name = "dsdm"' in (ROOT / "pyproject.toml").read_text()
    installs = [c for c in config["setup_commands"] if re.search(r"\bpip install\b", c)]
    # with the search extra (Ray, Optuna, MLflow, ...): the nodes run tune/ and ablations/
    assert any(re.search(rf"(^|\s)-e\s+{re.escape(remote_repo)}\[search\](\s|$)", c) for c in installs), installs
    # Ray on the nodes == Ray that runs `ray up` (here: the project's venv)
    env_line = config["metadata"]["dsdm_settings"]["write_env"]
    assert f"DSDM_RAY_VERSION={ray.__version__}" in env_line
    assert any('"ray[default,tune]==$DSDM_RAY_VERSION"' in c for c in installs)
    # .venv and data stay home: rsync follows .gitignore, and .gitignore lists them
    assert ".gitignore" in config["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored or ".venv" in ignored
    assert any(".git" in p for p in config["rsync_exclude"])


def test_cluster_head_runs_mlflow_server_with_sql_backend(config):
    servers = [c for c in config["head_setup_commands"] if "mlflow server" in c]
    assert len(servers) == 1
    argv = shlex.split(servers[0])
    after = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    backend = after["--backend-store-uri"]
    assert re.match(r"^(sqlite:///|postgresql(\+\w+)?://|mysql(\+\w+)?://)", backend), backend
    if backend.startswith("sqlite:///"):  # an absolute path on the head, never the cwd
        assert backend[len("sqlite:///"):].startswith(("/", "$HOME/")), backend
    assert after["--host"] == "0.0.0.0" and after["--port"] == "5000"
    assert after["--artifacts-destination"] == "$DSDM_MLFLOW_ARTIFACTS"
    # one server, on the head only, and `ray up` waits until it answers
    assert not any("mlflow server" in c for c in config["setup_commands"] + config.get("worker_setup_commands", []))
    assert any("/health" in c for c in config["head_setup_commands"])


def test_cluster_start_commands_are_token_auth_aware(config):
    head = " ; ".join(config["head_start_ray_commands"])
    worker = " ; ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert cmd.startswith(". ~/.dsdm_env"), "RAY_AUTH_MODE and the venv come from ~/.dsdm_env"
    assert "RAY_AUTH_MODE=token" in config["metadata"]["dsdm_settings"]["write_env"]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# --- docs -----------------------------------------------------------------------------------

def _doc_commands(prefix: str) -> list[list[str]]:
    text = CLUSTER_DOC.read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^(\s*[A-Z_]+=\S*\s+)*", "", line.split(" #", 1)[0]).strip()  # VAR=value prefixes
            if line.split()[: len(prefix.split())] == prefix.split():
                out.append(shlex.split(line))
    return out


def test_cluster_doc_covers_the_run():
    text = CLUSTER_DOC.read_text()
    assert "## Run on a Ray cluster" in text
    for needle in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit", "--working-dir .",
                   "python -m tune.search", "--address auto", "--storage", "--mlflow-uri",
                   "ray attach cluster.yaml -p 5000", "RAY_AUTH_MODE=token", "ray down cluster.yaml",
                   "ray get-auth-token --generate"):
        assert needle in text, needle


def test_cluster_doc_uses_existing_ray_cli_flags():
    from click.testing import CliRunner
    from ray.scripts.scripts import cli

    groups = {"job"}
    commands = _doc_commands("ray")
    assert commands
    runner = CliRunner()
    helps: dict[tuple, str] = {}
    for words in commands:
        words = words[1: words.index("--")] if "--" in words else words[1:]
        sub = tuple(words[:2]) if words[0] in groups else tuple(words[:1])
        if sub not in helps:
            res = runner.invoke(cli, [*sub, "--help"])
            assert res.exit_code == 0, f"ray {' '.join(sub)}: {res.output}"
            helps[sub] = res.output
        for flag in (w.split("=", 1)[0] for w in words[len(sub):] if w.startswith("-")):
            assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", helps[sub], re.M), \
                f"`ray {' '.join(sub)}` has no flag {flag}"


def test_cluster_doc_search_flags_exist():
    try:
        from tune.search import build_parser
    except ImportError as e:
        pytest.skip(f"tune.search not importable yet: {e}")
    known = {s for a in build_parser()._actions for s in a.option_strings}
    entry = [w for words in _doc_commands("ray job submit") if "--" in words
             for w in words[words.index("--") + 1:]]
    assert entry[:3] == ["python", "-m", "tune.search"], entry
    flags = {w.split("=", 1)[0] for w in entry if w.startswith("--")}
    assert flags and flags <= known, sorted(flags - known)
