"""Check Ray cluster launcher YAMLs offline, before `ray up`.

    python cluster/validate.py cluster/aws-gpu.yaml [more.yaml ...]

Each file goes through Ray's own config preparation and validation (the schema shipped inside
the installed ray, `ray/autoscaler/ray-schema.json`, via `prepare_config` + `validate_config`,
the steps `ray up` runs before it talks to a cloud), then through this project's rules:

- the container image is `rayproject/ray:<installed ray version>-pyXY[-cpu|-gpu|-cuNNN]`;
- set-up exports the synced checkout's HEAD commit and `pip install -e`s it with that exact Ray;
- every `ray start` runs with `RAY_AUTH_MODE=token` and the token file is mounted;
- the dashboard listens on loopback only; no extra inbound rule is open to the internet
  except SSH (22);
- cloud GPU node types declare the GPUs their machine type has, run on spot/preemptible
  capacity with explicit min/max counts, and there is a 1-GPU and an 8-GPU type.

Exit code 0 when every file passes and has no REPLACE_WITH_... placeholder left, else 1.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
REMOTE_GIT = "~/prance_git"  # where file_mounts put the checkout's .git
REMOTE_ROOT = "~/prance"  # where set-up exports the HEAD commit and installs it
TOKEN_FILE = "~/.ray/auth_token"  # Ray's default token path
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # prance.train.placement reads it to size the cluster
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>[^-]+)-(?P<python>py\d+)(?:-(?P<flavour>cpu|gpu|cu\d+))?$")
PLACEHOLDER_RE = re.compile(r"REPLACE_WITH_[A-Z0-9_]+")
INSTALL_RE = re.compile(r"\bpip install(?:\s+-[^e\s]\S*)*\s+-e\s+" + re.escape(REMOTE_ROOT) + r"(?=\s|$)")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}
CLOUD_PROVIDERS = {"aws", "gcp"}

# Machine types with GPUs -> (GPUs, vCPUs). A GPU type whose machine is not listed must carry
# GCP `guestAccelerators`; add a row here when you use another machine type.
GPU_MACHINES = {
    # AWS
    "g5.xlarge": (1, 4), "g5.2xlarge": (1, 8), "g5.4xlarge": (1, 16), "g5.8xlarge": (1, 32),
    "g6.2xlarge": (1, 8), "g6e.2xlarge": (1, 8), "g5.48xlarge": (8, 192),
    "p4d.24xlarge": (8, 96), "p4de.24xlarge": (8, 96), "p5.48xlarge": (8, 192),
    # Google Cloud (accelerator-optimized machines come with their GPUs)
    "g2-standard-4": (1, 4), "g2-standard-8": (1, 8), "g2-standard-96": (8, 96),
    "a2-highgpu-1g": (1, 12), "a2-highgpu-8g": (8, 96), "a2-ultragpu-8g": (8, 96), "a3-highgpu-8g": (8, 208),
}


def installed_ray_version() -> str:
    import ray

    return ray.__version__


def load(path: str | Path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return config


def ray_prepare_and_validate(config: dict) -> dict:
    """What `ray up` does to the file before it contacts a cloud: fill in the provider's
    defaults, merge set-up commands, check docker settings and node-type counts, then
    validate against ray-schema.json. Raises Ray's own exceptions; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def placeholders(text: str) -> list[str]:
    return sorted(set(PLACEHOLDER_RE.findall(text)))


def _commands(config: dict, key: str) -> list[str]:
    return [str(c) for c in config.get(key) or []]


def _ray_start_commands(prepared: dict) -> list[tuple[str, str]]:
    out = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        out += [(key, c) for c in _commands(prepared, key) if re.search(r"\bray start\b", c)]
    return out


def _image_problems(config: dict, ray_version: str, gpu_types: list[str]) -> list[str]:
    docker = config.get("docker") or {}
    images = {k: docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)}
    for name, node_type in (config.get("available_node_types") or {}).items():
        if (node_type.get("docker") or {}).get("worker_image"):
            images[f"{name}.docker.worker_image"] = node_type["docker"]["worker_image"]
    if not images:
        return ["no container image: set docker.image (or head_image and worker_image) to rayproject/ray:<version>-..."]
    problems, pythons = [], set()
    for key, image in images.items():
        m = IMAGE_RE.match(str(image))
        if not m:
            problems.append(f"docker {key} {image!r} is not pinned as rayproject/ray:{ray_version}-pyXY[-cpu|-gpu|-cuNNN]")
            continue
        if m["version"] != ray_version:
            problems.append(f"docker {key} {image!r} pins Ray {m['version']}, the installed Ray is {ray_version}")
        pythons.add(m["python"])
        worker_side = key != "head_image"
        if gpu_types and worker_side and m["flavour"] == "cpu":
            problems.append(f"docker {key} {image!r} is a CPU image but GPU node types {gpu_types} use it")
    if len(pythons) > 1:
        problems.append(f"head and worker images use different Pythons {sorted(pythons)}: Ray needs the same on every node")
    return problems


def _setup_problems(prepared: dict, ray_version: str) -> list[str]:
    problems = []
    mounts = prepared.get("file_mounts") or {}
    if str(mounts.get(REMOTE_GIT, "")).rstrip("/") not in (".git", str(REPO_ROOT / ".git")):
        problems.append(f"file_mounts must sync the checkout's repository: {REMOTE_GIT}: .git")
    pin = re.compile(r"ray\[[^\]]*\]==" + re.escape(ray_version) + r"\b")
    lists = {"head": _commands(prepared, "head_setup_commands"), "worker": _commands(prepared, "worker_setup_commands")}
    for name, node_type in (prepared.get("available_node_types") or {}).items():
        if "worker_setup_commands" in node_type:  # a node type's own list replaces the global ones
            lists[f"node type {name}"] = [str(c) for c in node_type["worker_setup_commands"]]
    for who, cmds in lists.items():
        text = "\n".join(cmds)
        export = next((c for c in cmds if f"--git-dir {REMOTE_GIT} archive HEAD" in c and f"tar -x -C {REMOTE_ROOT}" in c), None)
        install = next((i for i, c in enumerate(cmds) if INSTALL_RE.search(c)), None)
        if export is None:
            problems.append(f"{who} set-up does not export the checkout's HEAD commit: git --git-dir {REMOTE_GIT} archive HEAD | tar -x -C {REMOTE_ROOT}")
        if install is None:
            problems.append(f"{who} set-up does not install the project: pip install -e {REMOTE_ROOT} \"ray[...]=={ray_version}\"")
        elif not pin.search(cmds[install]):
            problems.append(f"{who} set-up installs the project without pinning ray[...]=={ray_version}: {cmds[install]!r}")
        elif export is not None and cmds.index(export) > install:
            problems.append(f"{who} set-up installs {REMOTE_ROOT} before exporting the commit into it")
        if "ray-wheels" in text or "ray-3.0.0.dev0" in text:
            problems.append(f"{who} set-up installs a nightly Ray wheel (Ray's default setup_commands leaked in: set setup_commands)")
    return problems


def _provider_package_problems(config: dict, prepared: dict) -> list[str]:
    """The head's autoscaler needs the packages Ray's own defaults install for the provider."""
    from ray.autoscaler._private.providers import _get_default_config

    defaults = _get_default_config(config["provider"])
    wanted = set()
    for cmd in _commands(defaults, "head_setup_commands"):
        for tok in shlex.split(cmd, comments=True)[2:] if cmd.startswith("pip install") else []:
            if not tok.startswith("-"):
                wanted.add(re.split(r"[<>=!\[ ]", tok, maxsplit=1)[0].lower())
    have = " ".join(_commands(prepared, "head_setup_commands")).lower()
    return [
        f"head set-up does not install {pkg}, which Ray's autoscaler needs on {config['provider']['type']}"
        for pkg in sorted(wanted)
        if not re.search(r"(^|[\s'\"])" + re.escape(pkg) + r"($|[\s<>=!'\"\[])", have)
    ]


def _auth_problems(prepared: dict) -> list[str]:
    problems = []
    starts = _ray_start_commands(prepared)
    if not any(k == "head_start_ray_commands" for k, _ in starts) or not any(k == "worker_start_ray_commands" for k, _ in starts):
        problems.append("head_start_ray_commands and worker_start_ray_commands must both run `ray start`")
    for key, cmd in starts:
        before = cmd[: re.search(r"\bray start\b", cmd).start()]
        if not re.search(r"(^|[\s;])(export\s+)?RAY_AUTH_MODE=token\b", before):
            problems.append(f"{key}: `ray start` runs without RAY_AUTH_MODE=token (token auth off): {cmd!r}")
    if TOKEN_FILE not in (prepared.get("file_mounts") or {}):
        problems.append(f"file_mounts must copy the Ray token to every node: {TOKEN_FILE}: {TOKEN_FILE}")
    return problems


def _exposure_problems(config: dict, prepared: dict) -> list[str]:
    problems = []
    for key, cmd in _ray_start_commands(prepared):
        if key != "head_start_ray_commands":
            continue
        m = re.search(r"--dashboard-host[=\s]+(\S+)", cmd)
        if m and m.group(1).strip("'\"") not in LOOPBACK:
            problems.append(f"the dashboard listens on {m.group(1)}: use --dashboard-host=127.0.0.1 and SSH port forwarding")
        if BOOTSTRAP_CONFIG not in cmd:
            problems.append(f"the head's `ray start` lacks --autoscaling-config={BOOTSTRAP_CONFIG}")
    provider = config.get("provider") or {}
    for rule in (provider.get("security_group") or {}).get("IpPermissions") or []:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges") or []} | {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []}
        ssh_only = rule.get("FromPort") == 22 and rule.get("ToPort") == 22 and str(rule.get("IpProtocol")).lower() == "tcp"
        if cidrs & OPEN_TO_ALL and not ssh_only:
            problems.append(
                f"security_group rule opens ports {rule.get('FromPort')}-{rule.get('ToPort')}/{rule.get('IpProtocol')} to the whole "
                "internet: only SSH (22) may be; reach the dashboard and MLflow through SSH port forwarding"
            )
    for name, node_type in (config.get("available_node_types") or {}).items():
        node_config = node_type.get("node_config") or {}
        if node_config.get("SecurityGroupIds"):
            problems.append(f"node type {name} sets its own SecurityGroupIds: their rules cannot be checked offline")
        if (node_config.get("tags") or {}).get("items"):
            problems.append(f"node type {name} sets GCP network tags: firewall rules they select cannot be checked offline")
    return problems


def _gpu_count(node_config: dict) -> tuple[int | None, int | None]:
    """(GPUs, vCPUs) the machine type has; (None, None) when it is not known here."""
    accelerators = node_config.get("guestAccelerators") or []
    machine = node_config.get("InstanceType") or node_config.get("machineType")
    gpus, cpus = GPU_MACHINES.get(str(machine), (None, None))
    if accelerators:
        gpus = sum(int(a.get("acceleratorCount", 0)) for a in accelerators)
    return gpus, cpus


def _is_spot(node_config: dict) -> bool:
    market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "")
    scheduling = node_config.get("scheduling") or {}
    if isinstance(scheduling, list):  # Ray's older GCP examples write a list of one-key maps
        scheduling = {k: v for item in scheduling for k, v in item.items()}
    return (
        str(market).lower() == "spot"
        or str(scheduling.get("provisioningModel", "")).upper() == "SPOT"
        or scheduling.get("preemptible") is True
    )


def _node_type_problems(config: dict) -> tuple[list[str], list[str]]:
    """(problems, names of GPU worker types) for cloud providers."""
    problems, gpu_types = [], []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    sizes = set()
    for name, node_type in types.items():
        declared = (node_type.get("resources") or {}).get("GPU", 0)
        gpus, cpus = _gpu_count(node_type.get("node_config") or {})
        if name == head:
            if declared or gpus:
                problems.append(f"head node type {name} has GPUs: the head runs drivers, the dashboard and MLflow; use a CPU machine")
            continue
        if gpus is None and not declared:
            continue  # a CPU worker type
        if gpus is None:
            problems.append(f"node type {name} declares GPU: {declared} on a machine type not known to cluster/validate.py: add it to GPU_MACHINES")
            continue
        gpu_types.append(name)
        if declared != gpus:
            problems.append(f"node type {name} declares GPU: {declared} but its machine has {gpus} GPU(s): set resources: {{GPU: {gpus}}}")
        declared_cpus = (node_type.get("resources") or {}).get("CPU")
        if cpus is not None and declared_cpus is not None and declared_cpus > cpus:
            problems.append(f"node type {name} declares CPU: {declared_cpus} but its machine has {cpus} vCPUs")
        if "min_workers" not in node_type or "max_workers" not in node_type:
            problems.append(f"GPU node type {name} must set min_workers and max_workers")
        if not _is_spot(node_type.get("node_config") or {}):
            problems.append(f"GPU node type {name} is on-demand: use spot (AWS InstanceMarketOptions) or SPOT provisioning (GCP scheduling)")
        sizes.add(gpus)
    for size in (1, 8):
        if size not in sizes:
            problems.append(f"no {size}-GPU worker type")
    return problems, gpu_types


def check(config: dict, ray_version: str | None = None) -> list[str]:
    """Every problem of one cluster config; [] when Ray accepts it and our rules hold.
    Placeholders are not problems here (see `placeholders`)."""
    ray_version = ray_version or installed_ray_version()
    try:
        prepared = ray_prepare_and_validate(config)
    except Exception as e:  # jsonschema.ValidationError, ValueError, click.ClickException (Ray's abort), AssertionError
        first = (str(getattr(e, "message", "") or e) or type(e).__name__).splitlines()[0]
        return [f"ray rejects the config: {type(e).__name__}: {first}"]
    cloud = config["provider"]["type"] in CLOUD_PROVIDERS
    problems, gpu_types = _node_type_problems(config) if cloud else ([], [])
    problems += _image_problems(config, ray_version, gpu_types if cloud else list(prepared["available_node_types"]))
    problems += _setup_problems(prepared, ray_version)
    problems += _provider_package_problems(config, prepared)
    problems += _auth_problems(prepared)
    problems += _exposure_problems(config, prepared)
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    import logging

    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)  # "refers to a file" and max-worker notes
    failed = False
    for path in paths:
        try:
            text = Path(path).read_text()
            problems = check(load(path))
        except (OSError, ValueError, yaml.YAMLError) as e:
            problems, text = [f"cannot read: {e}"], ""
        todo = placeholders(text)
        if todo:
            problems.append(f"fill in before `ray up`: {', '.join(todo)} (docs/cluster.md)")
        for p in problems:
            print(f"{path}: {p}")
        if not problems:
            print(f"{path}: ok")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
