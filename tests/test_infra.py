"""infra/: the Dockerfiles, the compose stack, the KubeRay manifests and the Prefect deployment file are
checked against the code they run: every command line parses with our CLI (or with `ray start`'s own
parser), config values validate, images and volumes are consistent, services bind loopback only."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from embedpipe.flows.cli import build_parser
from embedpipe.flows.config import config_from_args

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGES = {"embedpipe:cpu": INFRA / "Dockerfile", "embedpipe:cuda": INFRA / "Dockerfile.cuda"}


def check_embedpipe(argv: list[str]) -> None:
    """An `embedpipe ...` command line parses, and its run config (preset, --set, flags) validates."""
    assert argv[0] == "embedpipe", argv
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on a bad command line
    if args.command in ("run", "deploy"):
        config_from_args(args, check_inputs=False)
    if args.command == "deploy":
        from embedpipe.flows.deploy import check_cron

        check_cron(args.cron)


def check_ray_start(argv: list[str]) -> None:
    """A `ray start ...` command line parses with Ray's own CLI definition."""
    from ray.scripts.scripts import start

    assert argv[:2] == ["ray", "start"], argv
    start.make_context("start", argv[2:])


def check_command(argv: list[str]) -> None:
    if argv[0] == "embedpipe":
        check_embedpipe(argv)
    elif argv[0] == "ray":
        check_ray_start(argv)
    elif argv[0] == "prefect":
        assert argv[1:4] == ["server", "start", "--host"], argv
    else:
        raise AssertionError(f"unexpected command {argv}")


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of an `a && exec b` shell line."""
    out = []
    for part in script.split("&&"):
        argv = shlex.split(part)
        out.append(argv[1:] if argv[0] == "exec" else argv)
    return out


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfiles(image):
    text = IMAGES[image].read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and ln[0] != "#"]
    assert lines[0].startswith(("FROM ", "ARG ")) and any(ln.startswith("FROM ") for ln in lines)
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            assert all((ROOT / s).exists() for s in sources), line
    assert 'ENTRYPOINT ["embedpipe"]' in lines
    assert f"-t {image} ." in text  # the build command in its header makes the tag the manifests use
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "embedpipe" in pyproject["project"]["scripts"]
    for pin in ("torch", "torchvision"):
        (wanted,) = [d for d in pyproject["project"]["dependencies"] if d.startswith(f"{pin}==")]
        assert wanted in text, (pin, wanted)


def test_compose_stack():
    spec = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = spec["services"]
    assert set(services) == {"prefect-server", "ray-head", "ray-worker", "pipeline"}
    for name, svc in services.items():
        assert svc["image"] in IMAGES, name
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # loopback only
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith(".") or source in spec["volumes"], (name, vol)
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services), name
        entry, command = svc["entrypoint"], svc["command"]
        if entry == ["sh", "-c"]:
            commands = shell_commands(command[0])
        else:
            commands = [entry + command]
        for argv in commands:
            check_command(argv)
    # the pipeline joins the Ray head and reaches the Prefect server over the stack's network
    pipeline = shell_commands(services["pipeline"]["command"][0])
    assert pipeline[0][:4] == ["ray", "start", "--address", "ray-head:6379"]
    deploy = build_parser().parse_args(pipeline[-1][1:])
    assert deploy.command == "deploy" and deploy.ray_address == "ray-head:6379"
    head = services["ray-head"]["command"]
    assert head[head.index("--port") + 1] == "6379"
    assert services["pipeline"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "--host" in services["prefect-server"]["command"]
    assert services["prefect-server"]["ports"] == ["127.0.0.1:4200:4200"]


def _ray_start_params(params: dict) -> list[str]:
    """rayStartParams as the `ray start` flags KubeRay passes (values are strings in KubeRay's schema)."""
    argv = []
    for key, value in params.items():
        assert isinstance(value, str), (key, value)
        argv += [f"--{key}"] if value == "true" and key == "disable-usage-stats" else [f"--{key}", value]
    return argv


def _check_pod(template: dict) -> None:
    spec = template["spec"]
    volumes = {v["name"] for v in spec["volumes"]}
    for c in spec["containers"]:
        assert c["image"] in IMAGES, c["image"]
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "embedpipe-ray-auth"
        assert c["resources"]["requests"] == c["resources"]["limits"]


def _check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    check_ray_start(["ray", "start", "--head", *_ray_start_params(head["rayStartParams"])])
    _check_pod(head["template"])
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        params = _ray_start_params(group["rayStartParams"])
        check_ray_start(["ray", "start", "--address", "head:6379", *params])
        _check_pod(group["template"])
    import ray

    assert spec["rayVersion"] == ray.__version__


def test_kuberay_raycluster():
    doc = yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])
    gpu = [g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (container,) = gpu[0]["template"]["spec"]["containers"]
    assert container["image"] == "embedpipe:cuda" and container["resources"]["limits"]["nvidia.com/gpu"]


def test_kuberay_rayjob():
    doc = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    check_embedpipe(argv)
    assert build_parser().parse_args(argv[1:]).ray_address == "auto"
    _check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_prefect_deployment_file():
    from prefect.flows import Flow, load_flow_from_entrypoint

    from embedpipe.flows.deploy import ENTRYPOINT, check_cron, update_run
    from embedpipe.storage.contracts.config import Config

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["entrypoint"] == ENTRYPOINT
    flow = load_flow_from_entrypoint(dep["entrypoint"])
    assert isinstance(flow, Flow) and flow.fn is update_run.fn
    cfg = Config.model_validate(dep["parameters"]["config"])  # the whole run config, validated
    assert cfg.images == "/data/images" and str(cfg.out) == "/runs/nightly"
    for schedule in dep["schedules"]:
        check_cron(schedule["cron"])
    assert dep["work_pool"]["name"] and dep["concurrency_limit"]["limit"] == 1
    assert "prefect deploy --all --prefect-file infra/prefect.yaml" in (INFRA / "prefect.yaml").read_text()
