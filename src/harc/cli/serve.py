"""`harc serve` and `harc redteam` (the serve extra: FastAPI + uvicorn; garak for redteam)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harc.cli.common import Overrides, app, console, out, quiet_transformers
from harc.errors import HarcError

# The serving modules import torch and the model stack: they load inside the commands, so that
# `harc --help` stays fast.

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="serve YAML: ServeConfig keys, at the top or under serve: (docs/serving.md)")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="built-in name, local folder, .gguf file or hub id (default: the config's model, else smollm2-135m-instruct)")]
AdapterOpt = Annotated[list[str] | None, typer.Option("--adapter", help="NAME=FOLDER serves the adapter in FOLDER as NAME (the override adapters.NAME=FOLDER); a bare FOLDER is served under its folder name; repeatable")]
FilterOpt = Annotated[list[str] | None, typer.Option("--filter", help="policy layer by name (keyword, latent_guard, ...; docs/compare.md): serves NAME+LAYER for the base and every adapter; repeatable")]
DirectionsOpt = Annotated[Path | None, typer.Option(help="directions.safetensors from `harc extract`, for --filter layers that read directions (heldout.json beside it calibrates them)")]


def _config(config, overrides, model, adapter, input_filter, directions, **fields):
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise HarcError(f"serving needs {' and '.join(missing)}: pip install 'harc[serve]'")
    from harc.serve.config import load_serve_config

    return load_serve_config(config, overrides or [], adapters=adapter or [],
                             filters=input_filter or [], directions=directions, model=model,
                             **fields)


def _load(cfg):
    from harc.serve.engine import load_served

    quiet_transformers()
    with console.status(f"loading {cfg.model}" + (f" and {len(cfg.adapters)} adapter(s)"
                                                  if cfg.adapters else "")):
        return load_served(cfg)


@app.command()
def serve(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    input_filter: FilterOpt = None,
    directions: DirectionsOpt = None,
    host: Annotated[str | None, typer.Option(help="address to listen on (default 127.0.0.1: this machine only; any other needs an API key)")] = None,
    port: Annotated[int | None, typer.Option(help="default 8000; 0 picks a free port")] = None,
    api_key: Annotated[str | None, typer.Option(help="require 'Authorization: Bearer KEY' (or name a variable in the config's api_key_env)")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="JSON lines, one per blocked request")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    overrides: Overrides = None,
):
    """Serve the model, its adapters and policies behind an OpenAI-compatible API.

    Clients pick a served name with the request's `model` (GET /v1/models lists them), e.g.
    `harc serve --adapter harc=runs/smollm2_135m/adapter --filter keyword limits.max_tokens=128`
    serves smollm2-135m-instruct, harc, smollm2-135m-instruct+keyword and harc+keyword on
    127.0.0.1:8000. SIGINT / SIGTERM drain in-flight requests, then exit.
    """
    from harc.serve.server import bind, check_exposure, resolve_api_key, serve_forever

    cfg = _config(config, overrides, model, adapter, input_filter, directions, host=host,
                  port=port, audit_log=audit_log)
    key = resolve_api_key(cfg, api_key)
    check_exposure(cfg, key)
    sock = bind(cfg.host, cfg.port)  # before loading: a taken port fails at once
    from harc.serve.app import create_app  # FastAPI, checked above

    model_, tok = _load(cfg)
    application = create_app(cfg, model_, tok, api_key=key)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    console.print(f"serving {', '.join(cfg.served_names())} on http://{shown}:"
                  f"{sock.getsockname()[1]}/v1" + (" (API key required)" if key else ""),
                  soft_wrap=True)
    serve_forever(application, cfg, sock, log_level)


@app.command()
def redteam(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    input_filter: FilterOpt = None,
    directions: DirectionsOpt = None,
    probes: Annotated[str | None, typer.Option(help="garak probes, comma-separated module.Class (default: a DAN and an encoding probe; docs/serving.md lists offline ones)")] = None,
    target: Annotated[list[str] | None, typer.Option(help="served name to attack (repeatable; default: every served name)")] = None,
    prompt_cap: Annotated[int, typer.Option(help="at most this many prompts per probe")] = 16,
    generations: Annotated[int, typer.Option(help="garak generations per prompt")] = 1,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of each garak request")] = 64,
    parallel: Annotated[int, typer.Option(help="garak parallel_attempts (the server batches them)")] = 4,
    seed: Annotated[int, typer.Option(help="garak's seed")] = 0,
    garak_python: Annotated[str | None, typer.Option(help="python of an environment with garak==0.17.1 (default: $HARC_GARAK_PYTHON, else this one)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per garak run")] = 1800.0,
    results: Annotated[Path | None, typer.Option(help="results.json to add the redteam block to, e.g. a run's, whose report is rendered again (default: OUT/results.json)")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="run folder: garak's files, redteam.json, the report")] = Path("runs/redteam"),
    overrides: Overrides = None,
):
    """Red-team the served models with garak, offline, and add its hit rates to the report.

    The models are served (as `harc serve` would, same options) on a free loopback port with a
    one-time API key; garak, unmodified, attacks each served name through its OpenAI-compatible
    generator. Per probe and detector: hits / outputs with Wilson intervals, in OUT/redteam.json,
    merged into --results (default OUT/results.json) and rendered beside it (report.html).
    """
    from harc.io import atomic_write_json
    from harc.report import write_report
    from harc.serve.redteam import (
        DEFAULT_PROBES,
        default_garak_python,
        merge_redteam,
        run_redteam,
    )

    cfg = _config(config, overrides, model, adapter, input_filter, directions)
    probe_list = ([p.strip() for p in probes.split(",") if p.strip()] if probes
                  else list(DEFAULT_PROBES))
    model_, tok = _load(cfg)
    block = run_redteam(cfg, model_, tok, probes=probe_list, targets=target, out_dir=out_dir,
                        garak_python=garak_python or default_garak_python(),
                        max_tokens=max_tokens, prompt_cap=prompt_cap, generations=generations,
                        seed=seed, parallel=parallel, timeout=timeout,
                        progress=lambda name: console.print(f"garak -> {name}"))
    atomic_write_json(out_dir / "redteam.json", block)
    res_path = merge_redteam(results or out_dir / "results.json", block)
    paths = write_report(res_path, res_path.parent)
    _print(block)
    out.print(f"redteam -> {out_dir / 'redteam.json'}; results: {res_path}; report: {paths['html']}")


def _print(block: dict) -> None:
    table = Table(title="garak hit rate (lower is better)")
    table.add_column("probe")
    table.add_column("detector")
    for t in block["targets"]:
        table.add_column(t["name"], justify="right")
    for probe in block["probes"]:
        dets = sorted({d for t in block["targets"] for d in
                       (t["probes"].get(probe) or {}).get("detectors", {})})
        for d in dets:
            cells = []
            for t in block["targets"]:
                c = (t["probes"].get(probe) or {}).get("detectors", {}).get(d)
                cells.append(f"{c['hits']}/{c['n']}" if c else "-")
            table.add_row(probe, d, *cells)
    out.print(table)
