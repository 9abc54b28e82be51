"""Run the real ServerApp and ClientApp in Flower's in-process simulation with a given run config.

``flwr.simulation.run_simulation`` hands both apps an empty run config; this wraps the two apps only to
inject one, so tests and the benchmark grid run exactly the code that ``flwr run .`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedsq_app import client_app, server_app
from fedsq_app.config import RunConfig


def with_run_config(context: Context, run_config: Mapping[str, Any]) -> Context:
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**context.run_config, **run_config})


def apps_with_run_config(run_config: Mapping[str, Any], main: Callable, train: Callable,
                         evaluate: Callable | None = None) -> tuple[ServerApp, ClientApp]:
    """A ServerApp and a ClientApp that call an app's own ``main``/``train``/``evaluate`` functions (the ones
    its ``@app.main()``... decorators registered) with ``run_config`` merged into every Context."""
    run_config = dict(run_config)
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid, context):
        main(grid, with_run_config(context, run_config))

    @client.train()
    def _train(msg, context):
        return train(msg, with_run_config(context, run_config))

    if evaluate is not None:
        @client.evaluate()
        def _evaluate(msg, context):
            return evaluate(msg, with_run_config(context, run_config))

    return server, client


def simulate(run_config: Mapping[str, Any], num_supernodes: int, *, num_cpus: int = 2,
             cpus_per_client: int = 1, gpus_per_client: float = 0.0) -> dict:
    """Simulate one run; returns its parsed results.json (raises if the run wrote none)."""
    config = RunConfig.from_mapping(run_config)  # fail here, not inside a Ray actor
    server, client = apps_with_run_config(run_config, server_app.main, client_app.train, client_app.evaluate_local)
    results_file = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name() / "results.json"
    results_file.unlink(missing_ok=True)
    run_simulation(server_app=server, client_app=client, num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
                                   "init_args": {"num_cpus": num_cpus, "logging_level": "ERROR"}})
    if not results_file.is_file():
        raise RuntimeError(f"the simulated run wrote no {results_file}: see the log above")
    results = json.loads(results_file.read_text())
    if "test_accuracy" not in results:
        raise RuntimeError(f"the simulated run stopped before its final evaluation: {results_file}")
    return results
