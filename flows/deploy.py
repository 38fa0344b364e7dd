"""Scheduled ingestion: a Prefect deployment that brings a run directory up to date with its images.

``update_run`` is the deployed flow. It rebuilds the run's Config from the deployment's parameters and
runs ``UPDATE`` (module:function), which brings ``cfg.out`` up to date with ``cfg.images``: ``reindex``
of a finished run (new inputs extracted, live indices updated), the pipeline for a new or unfinished
one. The deployment is either served by this process (``serve``: Prefect's Runner, one subprocess per
flow run, against the Prefect server of PREFECT_API_URL) or written as a prefect.yaml-style file for
``prefect deploy`` and a process work pool.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.errors import InputError

log = logging.getLogger("embedpipe.deploy")

UPDATE = "embedpipe.flows.pipeline:update"  # what a scheduled run executes: (Config, wait) -> metrics
ENTRYPOINT = "embedpipe.flows.deploy.update_run"  # module-path entrypoint of the deployed flow
# One run of a deployment at a time: a run directory is updated by one process, and a run that is due
# while the previous one still works is cancelled (the next one picks up whatever it would have done).
CONCURRENCY = {"limit": 1, "collision_strategy": "CANCEL_NEW"}


@flow(name="embedpipe-update", validate_parameters=False)
def update_run(config: dict[str, Any]) -> dict[str, Any]:
    """Bring the run at ``config['out']`` up to date with the images at ``config['images']``."""
    module, name = UPDATE.split(":")
    update = getattr(importlib.import_module(module), name)  # imported here: the CLI starts faster
    # a scheduled run exists to bring the run up to date: it waits for a writer holding the run directory
    return update(Config.model_validate(config), wait=True)


def check_cron(cron: str) -> str:
    """The cron string, or one ``InputError`` line when Prefect's cron schedule rejects it."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone="UTC")
    except ValueError as err:
        raise InputError(f"--cron {cron!r}: not a valid cron schedule") from err
    return cron


def deployment_config(cfg: Config) -> dict[str, Any]:
    """The ``config`` parameter of the deployment: the run's Config as JSON, paths made absolute so the
    scheduled runs do not depend on their working directory."""
    data = cfg.model_dump(mode="json")
    data["out"] = str(Path(cfg.out).resolve())
    if cfg.images and "://" not in cfg.images and Path(cfg.images).exists():
        data["images"] = str(Path(cfg.images).resolve())
    return data


def default_name(cfg: Config) -> str:
    return f"update-{Path(cfg.out).resolve().name}"


def deployment_yaml(cfg: Config, name: str, cron: str, work_pool: str) -> dict[str, Any]:
    """A prefect.yaml-style project file with one deployment of ``update_run`` (``prefect deploy --all
    --prefect-file FILE`` registers it; a worker of ``work_pool``, type process, runs it)."""
    return {
        "name": "embedpipe",
        "prefect-version": importlib.metadata.version("prefect"),
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": os.getcwd()}}],
        "deployments": [
            {
                "name": name,
                "description": f"bring {deployment_config(cfg)['out']} up to date with {cfg.images}",
                "entrypoint": ENTRYPOINT,
                "parameters": {"config": deployment_config(cfg)},
                "schedules": [{"cron": cron, "timezone": "UTC", "active": True}],
                "concurrency_limit": dict(CONCURRENCY),
                "work_pool": {"name": work_pool, "work_queue_name": "default", "job_variables": {}},
                "tags": ["embedpipe"],
            }
        ],
    }


def write_deployment_yaml(path: Path, cfg: Config, name: str, cron: str, work_pool: str) -> Path:
    text = yaml.safe_dump(deployment_yaml(cfg, name, cron, work_pool), sort_keys=False)
    header = (
        "# embedpipe scheduled ingestion. Register and run it with a Prefect server and a process worker:\n"
        f"#   prefect work-pool create {work_pool} --type process\n"
        f"#   prefect deploy --all --prefect-file {path}\n"
        f"#   prefect worker start --pool {work_pool}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + text)
    tmp.replace(path)
    return path


def api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def serve(cfg: Config, name: str, cron: str) -> None:
    """Create (or update) the deployment on the Prefect server and run its scheduled flow runs until
    interrupted; stopping pauses the schedule."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.types.entrypoint import EntrypointType

    if not api_url():
        raise InputError("deploy needs a Prefect server: set PREFECT_API_URL")
    log.info("deployment %s: %s, cron '%s' (UTC), Prefect API %s", name, ENTRYPOINT, cron, api_url())
    update_run.serve(
        name=name,
        cron=cron,
        parameters={"config": deployment_config(cfg)},
        description=f"bring {deployment_config(cfg)['out']} up to date with {cfg.images}",
        tags=["embedpipe"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        global_limit=ConcurrencyLimitConfig(**CONCURRENCY),
        limit=1,
        print_starting_message=False,
    )
