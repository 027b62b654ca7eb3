"""`harc serve` and `harc redteam` as typer command functions, mounted by harc.cli:

    app.command("serve")(serve_cmd)
    app.command("redteam")(redteam_cmd)

Until then `python -m harc.serve serve|redteam` runs them on harc's CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harc.errors import HarcError

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="serve YAML (ServeConfig keys)")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="built-in name, local folder, .gguf file or hub id")]
AdapterOpt = Annotated[list[str] | None, typer.Option(
    "--adapter", help="NAME=FOLDER (or FOLDER: named after it) served under NAME (repeatable)")]
FilterOpt = Annotated[list[str] | None, typer.Option(
    "--filter", help="keyword or latent: adds a policy NAME+FILTER for the base and every "
    "adapter (repeatable)")]
DirectionsOpt = Annotated[Path | None, typer.Option(
    help="directions.safetensors for the latent filter")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="config overrides key=value (dots for nesting)")]


def _quiet() -> None:
    import warnings

    import transformers

    # PEFT still calls a transformers property that transformers 5 deprecates; nothing to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_config(config: Path | None, overrides: list[str] | None, *, model: str | None = None,
                 adapter: list[str] | None = None, input_filter: list[str] | None = None,
                 directions: Path | None = None, **fields):
    """ServeConfig from the YAML, `key=value` overrides and the command-line options."""
    from harc.serve.config import ServeConfig, load_serve_config

    for a in adapter or []:
        name, sep, path = a.partition("=")
        name, path = (name, path) if sep else (Path(a).name, a)
        fields[f"adapters.{name}"] = path
    cfg = load_serve_config(config, overrides, model=model, **fields)
    if not input_filter:
        return cfg
    layers = {"keyword": {"type": "keyword"}}
    if "latent" in input_filter:
        if directions is None:
            raise HarcError("the latent filter needs --directions")
        layers["latent"] = {"type": "latent", "directions": str(directions)}
    raw = cfg.model_dump(mode="json", exclude_none=True)
    for f in input_filter:
        if f not in layers:
            raise HarcError(f"unknown filter {f!r}; choose keyword or latent")
        for base in [cfg.base_name, *cfg.adapters]:
            raw["policies"][f"{base}+{f}"] = {"base": base, "layers": [layers[f]]}
    from pydantic import ValidationError

    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as e:
        raise HarcError(f"serve config: {e.errors()[0]['msg']}") from None


def resolve_api_key(cfg, api_key: str | None) -> str | None:
    if api_key:
        return api_key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "")
        if not key:
            raise HarcError(f"api_key_env names {cfg.api_key_env}, which is empty or unset")
        return key
    return None


def _load(cfg):
    from harc.serve.engine import load_served

    _quiet()
    with console.status(f"loading {cfg.model}" + (f" and {len(cfg.adapters)} adapter(s)"
                                                  if cfg.adapters else "")):
        return load_served(cfg)


def serve_cmd(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    input_filter: FilterOpt = None,
    directions: DirectionsOpt = None,
    host: Annotated[str | None, typer.Option(help="default 127.0.0.1 (loopback only)")] = None,
    port: Annotated[int | None, typer.Option(help="default 8000")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="require 'Authorization: Bearer KEY' (or set api_key_env in the config)")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="JSON lines of blocked requests")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    overrides: Overrides = None,
):
    """Serve the model, its adapters and policies behind an OpenAI-compatible API."""
    from harc.serve.app import create_app
    from harc.serve.server import bind, check_exposure, serve_forever

    cfg = build_config(config, overrides, model=model, adapter=adapter, input_filter=input_filter,
                       directions=directions, host=host, port=port,
                       audit_log=str(audit_log) if audit_log else None)
    key = resolve_api_key(cfg, api_key)
    check_exposure(cfg, key)
    sock = bind(cfg.host, cfg.port)  # before loading: a taken port fails at once
    model_, tok = _load(cfg)
    app = create_app(cfg, model_, tok, api_key=key)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    console.print(f"serving {', '.join(cfg.served_names())} on http://{shown}:"
                  f"{sock.getsockname()[1]}/v1" + (" (API key required)" if key else ""),
                  soft_wrap=True)
    serve_forever(app, cfg, sock, log_level)


def redteam_cmd(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    input_filter: FilterOpt = None,
    directions: DirectionsOpt = None,
    probes: Annotated[str, typer.Option(
        help="garak probes, comma-separated (module.Class)")] = "dan.Dan_11_0,encoding.InjectBase64",
    target: Annotated[list[str] | None, typer.Option(
        help="served name to attack (repeatable; default: all)")] = None,
    prompt_cap: Annotated[int, typer.Option(help="at most this many prompts per probe")] = 16,
    generations: Annotated[int, typer.Option(help="garak generations per prompt")] = 1,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of each garak request")] = 64,
    parallel: Annotated[int, typer.Option(help="garak parallel_attempts (the server batches them)")] = 4,
    seed: int = 0,
    garak_python: Annotated[str | None, typer.Option(
        help="python of the environment with garak (default: $HARC_GARAK_PYTHON or this one)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per garak run")] = 1800.0,
    results: Annotated[Path | None, typer.Option(
        help="results.json to add the redteam block to (default: OUT/results.json)")] = None,
    out_dir: Annotated[Path, typer.Option(
        "--out", help="run folder: garak files, redteam.json, report")] = Path("runs/redteam"),
    overrides: Overrides = None,
):
    """Red-team the served models with garak (offline) and add the hit rates to the report."""
    from harc.io import atomic_write_json
    from harc.report import write_report
    from harc.serve.redteam import default_garak_python, run_redteam
    from harc.serve.report_section import merge_redteam, mount_section

    cfg = build_config(config, overrides, model=model, adapter=adapter, input_filter=input_filter,
                       directions=directions)
    probe_list = [p.strip() for p in probes.split(",") if p.strip()]
    model_, tok = _load(cfg)
    block = run_redteam(cfg, model_, tok, probes=probe_list, targets=target, out_dir=out_dir,
                        garak_python=garak_python or default_garak_python(),
                        max_tokens=max_tokens, prompt_cap=prompt_cap, generations=generations,
                        seed=seed, parallel=parallel, timeout=timeout,
                        progress=lambda name: console.print(f"garak -> {name}"))
    atomic_write_json(out_dir / "redteam.json", block)
    res_path = merge_redteam(results or out_dir / "results.json", block)
    mount_section()
    paths = write_report(res_path, res_path.parent)
    _print(block)
    out.print(f"redteam -> {out_dir / 'redteam.json'}; report: {paths['html']}")


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
