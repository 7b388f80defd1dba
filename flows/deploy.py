"""`python -m flows.deploy` (`make deploy`): register every deployment in prefect.yaml with the server.

Equivalent to `prefect --no-prompt deploy --all`, one deployment at a time, then checked against the
API. Why not `--all` itself: with the locked FastAPI (0.154), Prefect 3.8.8's CLI fails right after
creating each deployment, when it asks the server for the pool's online workers with an explicit
`"limit": null` that the server now rejects (HTTP 422 on /work_pools/<pool>/workers/filter). The
deployment is already registered by then, but `--all` stops after the first one. Deploying one by
one and verifying each through the API gives the same result and a truthful exit status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
KNOWN_CLI_FAILURE = "/workers/filter"


def deployment_names(prefect_file: Path = PROJECT / "prefect.yaml") -> list[tuple[str, str]]:
    """(flow name, deployment name) of each deployment; the flow name comes from the entrypoint."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load(prefect_file.read_text())
    return [(load_flow_from_entrypoint(str(PROJECT / d["entrypoint"])).name, d["name"]) for d in spec["deployments"]]


def deploy_all(prefect_file: Path = PROJECT / "prefect.yaml") -> list[str]:
    """Deploy each deployment of ``prefect_file``; returns their ``flow/deployment`` names.

    Raises RuntimeError naming the deployments that the API does not know afterwards.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    prefect = str(Path(sys.executable).with_name("prefect"))
    names = deployment_names(prefect_file)
    for _, deployment in names:
        done = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file", str(prefect_file),
                               "--name", deployment], cwd=PROJECT, capture_output=True, text=True)
        if done.returncode != 0 and KNOWN_CLI_FAILURE not in done.stdout + done.stderr:
            raise RuntimeError(f"prefect deploy --name {deployment} failed:\n{done.stdout}\n{done.stderr}")
    missing = []
    with get_client(sync_client=True) as client:
        for flow_name, deployment in names:
            try:
                client.read_deployment_by_name(f"{flow_name}/{deployment}")
            except ObjectNotFound:
                missing.append(f"{flow_name}/{deployment}")
    if missing:
        raise RuntimeError(f"not registered: {', '.join(missing)}")
    return [f"{flow_name}/{deployment}" for flow_name, deployment in names]


def main() -> int:
    for name in deploy_all():
        print(f"deployed {name}")
    print("start a worker (make worker), then: prefect deployment run train-ssd/train-ssd --param data=DIR "
          "--param output=RUN_DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
