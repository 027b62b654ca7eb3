"""`harc run`: data -> synth -> extract -> diagnose -> evaluate base -> train -> evaluate HARC -> report.

Every stage writes its artifacts into one run folder with a `stage.json` holding the hash of its
inputs; a stage whose hash matches is skipped, so an interrupted run resumes where it stopped
(training resumes from its last checkpoint by itself).

A run config is a training config (`harc.train.HarcConfig`) plus two optional sections:
`eval:` (`harc.evaluate.EvalConfig`) and `run:` (`RunSettings` below).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harc.errors import HarcError
from harc.io import atomic_write_json, sha256_json


@dataclass
class RunSettings:
    """Pipeline options (the `run:` section).

    harmful / harmful_eval / harmless / pseudo: registry names or files of the data profile;
    the evaluation harmful set is held out and everything else is de-duplicated against it.
    harmful / harmless (the extraction prompts, also the source of synthesised triples) default
    to the training config's `data.extract_harmful` / `data.extract_harmless`, else advbench /
    harc-benign; n_extract defaults to `data.extract_n`.
    over_refusal_eval: extra over-refusal sets for evaluation (e.g. an XSTest path); the held-out
    half of `pseudo` is always evaluated.
    n_extract: prompts per side for the prompt directions (null: `data.extract_n`).
    n_synth: harmful prompts given on-policy triples (extraction + training); synth_tokens: tokens
    generated per synthetic text.
    filters: input filters evaluated as extra policies ("keyword", "latent"), alone and with HARC.
    plane_attacks: attack families placed on the harmfulness-refusal plane in diagnose.
    judge_data: human-labelled refusal sets (`harc judge-check --data` specs, e.g. an XSTest
    completions folder or "pyrit") on which the primary judge's accuracy is measured and reported.
    """

    harmful: str | None = None
    harmful_eval: str = "harmbench"
    harmless: str | None = None
    pseudo: str = "harc-pseudo-harmful"
    over_refusal_eval: list[str] = field(default_factory=list)
    n_extract: int | None = None
    n_synth: int = 200
    synth_tokens: int = 48
    batch_size: int = 16
    filters: list[str] = field(default_factory=list)
    plane_attacks: list[str] = field(default_factory=lambda: ["dan", "code_attack", "deep_inception"])
    judge_data: list[str] = field(default_factory=list)
    seed: int = 0

    def check(self) -> None:
        for key in ("n_extract", "n_synth", "synth_tokens", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise HarcError(f"run.{key} must be positive, got {getattr(self, key)}")
        from harc.filters import check_filter_name

        for f in self.filters:
            check_filter_name(f)


@dataclass
class RunConfig:
    train: object  # HarcConfig
    eval: object  # EvalConfig
    run: RunSettings
    out: Path


def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    """Read and validate the whole run config before any model is loaded."""
    import yaml

    from harc.attacks.base import build_config
    from harc.evaluate import eval_config_from_dict
    from harc.train import config_from_raw, read_yaml_config

    raw, base = read_yaml_config(path) if path is not None else ({}, None)
    sections = {"eval": dict(raw.pop("eval", None) or {}), "run": dict(raw.pop("run", None) or {})}
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        head, dot, tail = key.partition(".")
        if sep and dot and head in sections:
            sections[head][tail] = yaml.safe_load(value)
        else:
            rest.append(item)
    train = config_from_raw(raw, base, rest, require_data=False)
    ev = eval_config_from_dict(sections["eval"])
    run = build_config(RunSettings, sections["run"], "run")
    # A paper config names its extraction sets and size in `data:`; `run:` may override them.
    run.harmful = run.harmful or train.data.extract_harmful or "advbench"
    run.harmless = run.harmless or train.data.extract_harmless or "harc-benign"
    run.n_extract = run.n_extract or train.data.extract_n
    if not train.data.val_n:
        raise HarcError("config key 'data.val_n': harc run needs held-out prompts (got 0)")
    return RunConfig(train, ev, run, Path(train.output_dir))


class Stage:
    """A pipeline stage folder that is skipped when its inputs hash is unchanged."""

    def __init__(self, root: Path, name: str, inputs: object):
        self.dir = root / name
        self.hash = sha256_json(inputs)[:20]

    def done(self) -> bool:
        marker = self.dir / "stage.json"
        return marker.exists() and json.loads(marker.read_text()).get("inputs") == self.hash

    def finish(self, info: dict | None = None) -> None:
        atomic_write_json(self.dir / "stage.json",
                          {"inputs": self.hash, "finished": time.time(), **(info or {})})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_pipeline(rc: RunConfig, log=print, progress=None) -> dict:
    """Run (or resume) every stage; returns the paths of the report files."""
    from harc import diagnose as dg
    from harc.chat import ChatFormat
    from harc.data import dedupe_against, load, prepare_sets, split
    from harc.data.profile import DataProfile
    from harc.data.synth import synth_triples, write_jsonl
    from harc.directions import Directions, extract_directions
    from harc.evaluate import Evaluator, GenerationCache, environment, judge_agreement
    from harc.models import load_model
    from harc.report import write_report
    from harc.train import HarcTrainer, config_dict

    cfg, ev, rs, root = rc.train, rc.eval, rc.run, rc.out
    root.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda desc, total: (lambda n=1: None))
    timings: dict[str, float] = {}

    # data: de-duplicated, disjoint splits; the evaluation prompts are fixed first.
    t0 = time.time()
    profile = DataProfile(harmful=rs.harmful, harmful_eval=rs.harmful_eval, harmless=rs.harmless,
                          pseudo=rs.pseudo)
    sets = prepare_sets(profile, seed=rs.seed)
    pseudo = split(sets["pseudo"], (0.5, 0.5), seed=rs.seed, names=("train", "eval"))
    over_sets = {f"{rs.pseudo} (held out)": [r["prompt"] for r in pseudo["eval"]]}
    for name in rs.over_refusal_eval:
        recs, _ = dedupe_against(load(name), pseudo["train"])
        over_sets[name] = [r["prompt"] for r in recs]
    harmful_pool = sets["harmful_extract"] + sets["harmful_train"]
    data_info = {"sizes": {k: len(v) for k, v in sets.sets.items()},
                 "pseudo_train": len(pseudo["train"]), "pseudo_eval": len(pseudo["eval"]),
                 "removed_near_duplicates": sets.removed, "overlaps": sets.overlaps}
    atomic_write_json(root / "data.json", data_info)
    timings["data"] = time.time() - t0

    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    log(f"loading {cfg.model}")
    model, tok = load_model(cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation)
    chat = ChatFormat(tok, system_prompt=cfg.system_prompt, raw_template=cfg.raw_template,
                      max_prompt_tokens=cfg.max_prompt_tokens,
                      max_response_tokens=cfg.max_response_tokens)
    # Jailbreak templates are long: evaluation and the plane see them whole, not cut to the
    # training limit.
    eval_chat = ChatFormat(tok, system_prompt=cfg.system_prompt, raw_template=cfg.raw_template,
                           max_prompt_tokens=ev.max_prompt_tokens,
                           max_response_tokens=cfg.max_response_tokens)

    # synth: on-policy (prompt, refusal, completion) triples and benign answers.
    t0 = time.time()
    n_syn = min(rs.n_synth, len(harmful_pool))
    harm_syn = [r["prompt"] for r in harmful_pool[:n_syn]]
    safe_syn = [r["prompt"] for r in (sets["harmless_extract"] + sets["harmless_train"])[:n_syn]]
    pseudo_prompts = [r["prompt"] for r in pseudo["train"]]
    synth = Stage(root, "synth", [cfg.model, chat.template_hash(), harm_syn, safe_syn,
                                  pseudo_prompts, rs.synth_tokens])
    if not synth.done():
        log(f"synthesising {n_syn} triples and benign answers on-policy")
        triples, helpful = synth_triples(
            model, chat, harm_syn, safe_syn, max_new_tokens=rs.synth_tokens,
            batch_size=rs.batch_size, progress=progress("synth", 2 * n_syn + n_syn))
        from harc.data.synth import answered_pairs
        from harc.generation import generate

        answers = generate(model, chat, pseudo_prompts, max_new_tokens=rs.synth_tokens,
                           batch_size=rs.batch_size)
        pseudo_pairs, pseudo_refused = answered_pairs(pseudo_prompts, answers)
        write_jsonl(synth.dir / "triples.jsonl", triples)
        write_jsonl(synth.dir / "helpful.jsonl", helpful)
        write_jsonl(synth.dir / "pseudo.jsonl", pseudo_pairs)
        synth.finish({"triples": len(triples), "helpful": len(helpful),
                      "pseudo_kept": len(pseudo_pairs), "pseudo_refused": pseudo_refused,
                      "refusal_sources": _count(t["refusal_source"] for t in triples),
                      "completion_sources": _count(t["completion_source"] for t in triples)})
    triples = _jsonl(synth.dir / "triples.jsonl")
    helpful = _jsonl(synth.dir / "helpful.jsonl")
    timings["synth"] = time.time() - t0

    # extract: the base directions.
    t0 = time.time()
    n_ext = min(rs.n_extract, len(sets["harmful_extract"]), len(sets["harmless_extract"]))
    ext_h = [r["prompt"] for r in sets["harmful_extract"][:n_ext]]
    ext_b = [r["prompt"] for r in sets["harmless_extract"][:n_ext]]
    # Training sets the config names (e.g. Circuit-Breakers for a paper reproduction) also give
    # the response-side directions, as in the reference; else the on-policy synthetic sets.
    from harc.train import load_records

    cfg_harm = load_records(cfg.data.harmful, cfg.data.harmful_n) if cfg.data.harmful else None
    cfg_safe = load_records(cfg.data.harmless, cfg.data.harmless_n) if cfg.data.harmless else None
    resp_h = cfg_harm[: cfg.data.extract_n] if cfg_harm else triples
    resp_b = cfg_safe[: cfg.data.extract_n] if cfg_safe else helpful
    extract = Stage(root, "extract", [synth.hash, ext_h, ext_b, cfg.n_boot, cfg.n_resp_tokens,
                                      cfg.data.harmful, cfg.data.harmless, cfg.data.extract_n])
    dirs_path = extract.dir / "directions.safetensors"
    pairs_args = dict(harmful_completions=[(t["prompt"], t["completion"]) for t in resp_h],
                      refusals=[(t["prompt"], t["refusal"]) for t in resp_h],
                      helpful=[(p["prompt"], p["response"]) for p in resp_b],
                      n_resp_tokens=cfg.n_resp_tokens, batch_size=rs.batch_size)
    if not extract.done():
        log("extracting the four directions")
        total = len(ext_h) + len(ext_b) + 2 * len(resp_h) + len(resp_b)
        dirs = extract_directions(model, chat, harmful=ext_h, harmless=ext_b, n_boot=cfg.n_boot,
                                  seed=cfg.seed, progress=progress("extract", total),
                                  provenance={"datasets": asdict(profile)}, **pairs_args)
        dirs.save(dirs_path)
        extract.finish({"prompts": {"harmful": rs.harmful, "harmless": rs.harmless, "n": n_ext},
                        "response_pairs": {"harmful": cfg.data.harmful or "synthesised",
                                           "harmless": cfg.data.harmless or "synthesised"}})
    dirs = Directions.load(dirs_path, model)
    timings["extract"] = time.time() - t0

    # diagnose: geometry, selection, held-out check, plane.
    t0 = time.time()
    k = cfg.k_final
    geo = dg.geometry(dirs, k=k, score=cfg.layer_score, low=cfg.band[0], high_offset=cfg.band[1])
    val_h = [r["prompt"] for r in sets["harmful_validate"]][: cfg.data.val_n]
    val_b = [r["prompt"] for r in sets["harmless_validate"]][: cfg.data.val_n]
    diag = Stage(root, "diagnose", [extract.hash, k, cfg.layer_score, cfg.band, val_h, val_b,
                                    rs.plane_attacks])
    layers = geo["selected_layers"]
    plane_layer = layers[len(layers) // 2] if layers else None
    if not diag.done():
        log(f"diagnosing: selected layers {layers}")
        held = dg.heldout_check(model, chat, dirs, val_h, val_b, layers, rs.batch_size)
        from harc.attacks.registry import get_attack

        plane_sets = {"harmless": val_b, "harmful (direct)": val_h}
        for name in rs.plane_attacks:
            plane_sets[name] = [p.prompt for p in get_attack(name).apply(
                [{"prompt": p} for p in val_h])]
        plane = {"layer": plane_layer,
                 "points": dg.plane_points(model, eval_chat, dirs, plane_sets, plane_layer,
                                           rs.batch_size)}
        dg.write_plots(geo, diag.dir, plane)
        dg.write_diagnosis(diag.dir, geo, held, plane)
        diag.finish()
    # The latent judge's threshold: the model's own response-side harmfulness reading, fitted on
    # the synthetic harmful openings vs refusals (training data, never evaluation data).
    from harc.directions import response_projections
    from harc.judges.latent import fit_threshold

    cal = triples[:64]
    scores = response_projections(
        model, chat, [(t["prompt"], t["completion"]) for t in cal]
        + [(t["prompt"], t["refusal"]) for t in cal], dirs, [plane_layer],
        n_tokens=cfg.n_resp_tokens, batch_size=rs.batch_size)[:, 0, 0].tolist()
    latent_threshold = fit_threshold(scores, [True] * len(cal) + [False] * len(cal))
    timings["diagnose"] = time.time() - t0

    # evaluation data and the base model's evaluation (before the adapter is attached).
    eval_data = {
        "harmful": [{"prompt": r["prompt"], "category": r.get("category")}
                    for r in sets["harmful_eval"][: ev.n_harmful]],
        "over_refusal": {n: p[: ev.n_over_refusal] for n, p in over_sets.items()},
        "benign": [r["prompt"] for r in sets["harmless_validate"]][: ev.n_benign],
        "capability": load(ev.capability, limit=ev.n_capability) if ev.capability else [],
    }

    def evaluate(name, m, adapter=None, input_filter=None):
        stage = Stage(root / "eval", name, [asdict(ev), extract.hash, adapter and _mtime(adapter),
                                            getattr(input_filter, "name", None),
                                            [r["prompt"] for r in eval_data["harmful"]]])
        result_path = stage.dir / "run.json"
        if stage.done():
            return json.loads(result_path.read_text())
        log(f"evaluating {name}")
        cache = GenerationCache(stage.dir / "generations.jsonl")
        res = Evaluator(m, eval_chat, ev, name=name, adapter=adapter, input_filter=input_filter,
                        dirs=dirs, plane_layer=plane_layer, latent_threshold=latent_threshold,
                        cache=cache,
                        progress=progress).run(eval_data)
        atomic_write_json(result_path, res)
        stage.finish()
        return res

    t0 = time.time()
    runs = [evaluate("base", model)]
    for f in rs.filters:
        runs.append(evaluate(f"base+{f}", model, input_filter=_filter(f, model, eval_chat, dirs,
                                                                        plane_layer, val_h, val_b)))
    timings["eval_base"] = time.time() - t0

    # train (resumes from its own checkpoints).
    t0 = time.time()
    cfg.output_dir = str(root / "train")
    cfg.directions = str(dirs_path)
    # Training data: the config's own sets when it names them, else the on-policy synthetic
    # sets. Never a jailbreak-wrapped prompt.
    train_data = {
        "harmful": cfg_harm or triples,
        "harmless": cfg_safe or helpful,
        "pseudo": (load_records(cfg.data.pseudo, cfg.data.pseudo_n) if cfg.data.pseudo
                   else _jsonl(synth.dir / "pseudo.jsonl")),
        "val_harmful": val_h, "val_harmless": val_b}
    # Record what was trained on (the adapter's config and model card show it).
    cfg.data.harmful = cfg.data.harmful or str(synth.dir / "triples.jsonl")
    cfg.data.harmless = cfg.data.harmless or str(synth.dir / "helpful.jsonl")
    cfg.data.pseudo = cfg.data.pseudo or str(synth.dir / "pseudo.jsonl")
    if not train_data["pseudo"]:
        train_data.pop("pseudo")
        cfg.batch.pseudo = 0
    adapter_dir = root / "train" / "adapter"
    train_stage = Stage(root, "train", [config_dict(cfg), synth.hash, extract.hash])
    if not train_stage.done():
        log(f"training HARC for {cfg.steps} steps")
        trainer = HarcTrainer(cfg, model, tok, train_data, directions=dirs, progress=True)
        trainer.train()
        peft_model = trainer.model
        train_stage.finish({"layers": trainer.layers})
    else:
        from harc.models import load_adapter

        peft_model = load_adapter(model, adapter_dir)
    peft_model.eval()
    timings["train"] = time.time() - t0

    t0 = time.time()
    runs.append(evaluate("harc", peft_model, adapter=str(adapter_dir)))
    for f in rs.filters:
        runs.append(evaluate(f"harc+{f}", peft_model, str(adapter_dir),
                             _filter(f, peft_model, eval_chat, dirs, plane_layer, val_h, val_b)))
    timings["eval_harc"] = time.time() - t0

    # geometry after training: directions re-extracted with the adapter on.
    after_stage = Stage(root, "geometry_after", [train_stage.hash, extract.hash])
    after_path = after_stage.dir / "directions.safetensors"
    if not after_stage.done():
        after = extract_directions(peft_model, chat, harmful=ext_h, harmless=ext_b,
                                   n_boot=cfg.n_boot, seed=cfg.seed, **pairs_args)
        after.save(after_path)
        after_stage.finish()
    geo_after = dg.geometry(Directions.load(after_path), k=k, score=cfg.layer_score,
                            low=cfg.band[0], high_offset=cfg.band[1])

    judges = {"primary": ev.judge, "latent_threshold": latent_threshold,
              "agreement": judge_agreement(runs)}
    if rs.judge_data:
        from harc.judges.check import judge_check, load_labelled
        from harc.judges.registry import get_judge

        labelled = [r for spec in rs.judge_data for r in load_labelled(spec, "skip")]
        m = judge_check(get_judge(ev.judge), labelled)
        judges["accuracy"] = {ev.judge: {**{k: m[k] for k in ("accuracy", "precision", "recall",
                                                              "kappa", "n")},
                                         "data": ", ".join(rs.judge_data)}}

    log_rows = []
    log_file = root / "train" / "log.jsonl"
    if log_file.exists():
        log_rows = [r for r in _jsonl(log_file) if "loss" in r]
    results = {
        "title": f"HARC on {cfg.model}",
        "harc_version": __import__("harc").__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"train": config_dict(cfg), "eval": asdict(ev), "run": asdict(rs)},
        "environment": environment(),
        "data": {**data_info, "sets": asdict(profile)},
        "judges": judges,
        "runs": runs,
        "geometry": {"before": _geo_for_report(geo), "after": _geo_for_report(geo_after)},
        "training": {"steps": cfg.steps, "log": log_rows},
        "timings_s": timings,
    }
    atomic_write_json(root / "results.json", results)
    from harc.export import export_adapter

    export_adapter(adapter_dir, dirs_path, results)
    return write_report(results, root / "report")


def _geo_for_report(geo: dict) -> dict:
    out = {k: geo[k] for k in ("cos_ref_harm", "ci_lo", "ci_hi", "score_variant_d", "score_legacy",
                               "selected_layers")}
    out["cross_cos"] = {str(s): geo["cross_cos"][s] for s in geo["selected_layers"]}
    if geo["band"]:
        out["band"] = [geo["band"][0], geo["band"][-1]]
    return out


def _filter(name, model, chat, dirs, layer, val_h, val_b):
    from harc.filters import KeywordFilter, LatentFilter

    if name == "keyword":
        return KeywordFilter()
    return LatentFilter.calibrate(model, chat, dirs, layer, val_h, val_b)


def _mtime(path: str) -> float:
    files = sorted(Path(path).glob("adapter_model*.safetensors"))
    return files[0].stat().st_mtime if files else 0.0


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out
