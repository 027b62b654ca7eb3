"""`harc compare`: training baselines, controls and policy layers against HARC, on the same data,
LoRA budget, seeds, steps, evaluation sets and judge, in one report.

The config is a `harc run` config (its top-level keys are the HARC run that every method shares)
with a `compare:` section (`CompareSettings`). Stages, each skipped when its inputs are unchanged,
so that the same command resumes, and `--only` can split the entries over several sessions:
    data, synth, extract, diagnose       `harc run`'s stages, shared by every method
    methods/base/eval/<policy>           the base model alone and under each policy layer
    latency                              each layer's added latency per benign request
    methods/<entry>/train                one run folder per trained entry
    methods/<entry>/eval/<policy>        the entry alone (and, in `stack_on`, under each layer)
    results.json, report/                every finished policy, whichever session ran it
    logs/                                the output of each `--jobs` process
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from harc._version import __version__
from harc.config import Config, apply_overrides, build, read_yaml, to_dict
from harc.data import load
from harc.errors import HarcError
from harc.eval import Evaluator, GenerationCache
from harc.eval.filters import FILTERS, get_filter
from harc.io import atomic_write_json, sha256_json
from harc.lora import load_adapter
from harc.methods import METHODS, PIPELINE_SECTIONS, TrainConfig, Trainer, config_from_raw
from harc.models import environment, unwrap
from harc.pipeline.config import RunConfig, load_run_config, plugin_spec
from harc.pipeline.jobs import entry_groups, run_groups
from harc.pipeline.run import Pipeline
from harc.pipeline.stages import Stage, read_jsonl
from harc.pipeline.sweep import (
    SweepSettings,
    expand_grid,
    select,
    validation_data,
    validation_scores,
    validation_split,
)
from harc.report.compare import tradeoff, write_compare_report

BASE = "base"


class CompareSettings(Config):
    """The `compare:` section.

    methods: trained entries, in order: a method name, or {name, method?, init?, **keys}: `method`
        defaults to the name; the keys override the shared config (HARC entries start from the
        whole top-level config, other methods from its `TrainConfig` keys only); `init: ENTRY`
        merges that earlier entry's adapter into the base before training (HARC followed by DPO).
    layers: policy layers (names, or {name, label?, **options}), each evaluated on the base model
        and on every entry of `stack_on`; `label` names the policy when a layer appears twice.
    stack_on: entries also evaluated under each policy layer.
    latency_n: validation harmless prompts timed per layer for its added latency.
    bootstrap: resamples of the harmful requests for the mean-ASR intervals.
    sweep: a grid of method keys (`harc.pipeline.sweep.SweepSettings`) whose entries are
        evaluated on a validation split only; the one the selection rule picks is then evaluated
        on the evaluation sets like any entry. With a sweep, every entry trains on the
        pseudo-harmful prompts left after the validation hold-out.
    """

    prefix: ClassVar[str] = "compare."

    methods: list[str | dict] = Field(default_factory=lambda: ["harc"])
    layers: list[str | dict] = Field(default_factory=list)
    stack_on: list[str] = Field(default_factory=lambda: ["harc"])
    latency_n: int = 32
    bootstrap: int = 2000
    sweep: SweepSettings | None = None

    def check(self) -> None:
        self.need(len(self.methods) > 0, "methods", "must list at least one method")
        self.need(self.latency_n >= 0, "latency_n", "must be >= 0")
        self.need(self.bootstrap >= 100, "bootstrap", "must be >= 100")


@dataclass
class Entry:
    name: str
    cfg: TrainConfig
    init: str | None = None
    sweep: bool = False  # a grid entry: validated; evaluated only if the rule picks it


@dataclass
class CompareConfig:
    run: RunConfig
    settings: CompareSettings
    entries: list[Entry]
    layers: list[tuple[str, str, dict]]  # (label, layer name, options)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _entry(spec, i: int, top: dict, base: Path | None) -> Entry:
    name, params = plugin_spec(spec, f"compare.methods[{i}]")
    method, init = params.pop("method", name), params.pop("init", None)
    if method not in METHODS:
        METHODS.get(method)  # the one-line error with a did-you-mean
    shared = top if method == "harc" else {k: v for k, v in top.items()
                                           if k in TrainConfig.model_fields}
    try:
        cfg = config_from_raw({**_merge(shared, params), "method": method}, base,
                              require_data=False)
    except HarcError as e:
        raise HarcError(f"compare.methods entry {name!r}: {e}") from None
    return Entry(name, cfg, init)


def load_compare_config(path: str | Path, overrides: list[str]) -> CompareConfig:
    """Read and validate the whole comparison (every method config and policy layer) before any
    model is loaded."""
    raw, base = read_yaml(path)
    raw = apply_overrides(raw, overrides)
    if raw.get("method", "harc") != "harc":
        raise HarcError("the top-level config of `harc compare` is the HARC run every method "
                        "shares; name other methods under compare.methods")
    rc = load_run_config(path, overrides)
    settings = build(CompareSettings, raw.get("compare") or {})
    top = {k: v for k, v in raw.items() if k not in PIPELINE_SECTIONS and k != "method"}
    entries = [_entry(spec, i, top, base) for i, spec in enumerate(settings.methods)]
    if settings.sweep is not None:
        grid = expand_grid(settings.sweep)
        entries += [_entry(spec, len(entries) + i, top, base) for i, spec in enumerate(grid)]
        for e in entries[-len(grid):]:
            e.sweep = True
    names = [BASE]
    for e in entries:
        if e.name in names:
            raise HarcError(f"compare.methods: the name {e.name!r} is taken; give the entry "
                            "another name")
        if e.init is not None and e.init not in names[1:]:
            raise HarcError(f"compare.methods entry {e.name!r}: init {e.init!r} must name an "
                            f"earlier entry (one of {names[1:]})")
        names.append(e.name)
    layers, labels = [], set()
    for i, spec in enumerate(settings.layers):
        lname, params = plugin_spec(spec, f"compare.layers[{i}]")
        label = params.pop("label", lname)
        FILTERS.create(lname, **params)  # unknown names and out-of-range options fail here
        if label in labels:
            raise HarcError(f"compare.layers: {label!r} appears twice; give one a label")
        labels.add(label)
        layers.append((label, lname, params))
    missing = [s for s in settings.stack_on if s not in names[1:]]
    if missing:
        raise HarcError(f"config key 'compare.stack_on' names no entry: {missing}; entries: "
                        f"{names[1:]}")
    return CompareConfig(rc, settings, entries, layers)


def stack_adapters(model, first: Path, second: Path):
    """`model` with `second` running on top of `first`: the function of `second` trained on
    `first` merged into the base (as the release's HARC + DPO is), with no merge; disabling the
    adapters gives the true base, so KL is measured against it as for every other entry."""
    peft = load_adapter(model, first)
    peft.load_adapter(str(second), adapter_name="second")
    peft.base_model.set_adapter(["default", "second"], inference_mode=True)
    return peft


class Compare:
    """The stages of `harc compare` over one folder; `run()` runs (or resumes) them."""

    def __init__(self, cc: CompareConfig, log=print, progress=None):
        self.cc, self.log = cc, log
        self.p = Pipeline(cc.run, log, progress)
        self.root = self.p.root

    def run(self, only: list[str] | None = None, jobs: int = 1,
            command: list[str] | None = None) -> dict:
        """Run (or resume) the shared stages, then the entries (those in `only`, or all), then
        the report over every finished policy; returns the report's paths. `only=[]` trains and
        evaluates nothing: the report over what is finished (the shared stages must be).

        jobs > 1 with `command` (this comparison's `harc compare` command line, without --only):
        once the shared stages and the base model are done, the entries run in up to `jobs`
        processes at once (`command --only GROUP`); this process then finishes what they left."""
        known = [e.name for e in self.cc.entries]
        unknown = [n for n in only or [] if n not in known]
        if unknown:
            raise HarcError(f"--only names no entry: {unknown}; entries: {known}")
        p = self.p
        p.shared_stages()
        self.split = self._validation_split()
        self.data = {e.name: self._prepare(e) for e in self.cc.entries}
        # Hashed once: every stage key of an entry (train, eval, validation) starts from it.
        self.data_hash = {name: sha256_json(d) for name, d in self.data.items()}
        if only == []:
            return self.report()
        self.evaluate(BASE, p.model, None, None, self._labels())
        if self.split is not None:
            self.validate(BASE, p.model, None, None)
        self.latency()
        if jobs > 1 and command:
            run_groups(entry_groups(self.cc.entries, only), jobs, command, self.root / "logs",
                       self.log)
        for e in self.cc.entries:
            if only is not None and e.name not in only:
                continue
            key = self._train_stage(e).hash
            if e.sweep:
                if not self._validation_stage(e.name, key).done():
                    self.ensure_adapter(e)
                    model = self._load(e)
                    self.validate(e.name, model, str(self._adapter(e.name)), key)
                    p.model = model.unload()
                continue
            self._evaluate_entry(e)
        choice = self.choice()
        if choice is not None and (only is None or choice["chosen"] in only):
            self._evaluate_entry(self._entry(choice["chosen"]))
        return self.report()

    def _evaluate_entry(self, e: Entry) -> None:
        """Train `e` if needed and evaluate it alone and under the layers it is stacked with."""
        p = self.p
        labels = [None, *(self._labels() if e.name in self.cc.settings.stack_on else [])]
        key = self._train_stage(e).hash
        if all(self._eval_stage(e.name, key, lab).done() for lab in labels):
            return
        self.ensure_adapter(e)
        model = self._load(e)
        self.evaluate(e.name, model, str(self._adapter(e.name)), key, labels[1:])
        p.model = model.unload()  # the bare base again, for the next entry

    # ---- the sweep: choices made on validation only
    def _validation_split(self):
        sw = self.cc.settings.sweep
        if sw is None:
            return None
        p = self.p
        pseudo = read_jsonl(p.synth_stage.dir / "pseudo.jsonl")
        evaluation = {"harmful": p.eval_data["harmful"], "benign": p.eval_data["benign"],
                      **p.eval_data["over_refusal"]}
        training = [{"prompt": t["prompt"]} for t in p.triples] + [{"prompt": x} for x in p.ext_h]
        split = validation_split(sw, load(sw.harmful), pseudo, evaluation=evaluation,
                                 training=training, pool=p.pseudo["train"])
        self.sweep_info = {"n_harmful": len(split.harmful), "n_pseudo": len(split.pseudo),
                           "pseudo_train": len(split.pseudo_train), "removed": split.removed,
                           "overlaps_with_evaluation": split.overlaps}
        return split

    def _validation_stage(self, entry: str, key: str | None) -> Stage:
        return Stage(self.root / "methods" / entry, "validation", [
            to_dict(self.p.ev), self.p.extract_stage.hash, key,
            sha256_json(validation_data(self.split))])

    def validate(self, entry: str, model, adapter: str | None, key: str | None) -> None:
        """`entry` on the validation split: attacks on the validation requests, false refusals
        on the held-out pseudo-harmful prompts (no plane, judge check or capability)."""
        p = self.p
        st = self._validation_stage(entry, key)
        if st.done():
            return
        self.log(f"validating {entry}")
        ev = p.ev.model_copy(update={"plane": False, "latent_judge": False, "capability": None})
        cache = GenerationCache(self.root / "methods" / entry / "validation.generations.jsonl")
        res = Evaluator(model, p.eval_chat, ev, name=entry, adapter=adapter, dirs=p.dirs,
                        plane_layer=p.plane_layer, cache=cache,
                        progress=p.progress).run(validation_data(self.split))
        atomic_write_json(st.dir / "run.json", res)
        st.finish()

    def choice(self) -> dict | None:
        """The selection rule over the validated grid entries (None until all are validated)."""
        if self.split is None:
            return None
        runs = {}
        for e in [x for x in self.cc.entries if x.sweep]:
            st = self._validation_stage(e.name, self._train_stage(e).hash)
            if not st.done():
                return None
            runs[e.name] = validation_scores(json.loads((st.dir / "run.json").read_text()))
        base = self._validation_stage(BASE, None)
        if not base.done():
            return None
        return {**select(runs, validation_scores(json.loads((base.dir / "run.json").read_text()))),
                "split": self.sweep_info}

    def _labels(self) -> list[str]:
        return [lab for lab, _, _ in self.cc.layers]

    # ---- training
    def _train_stage(self, e: Entry) -> Stage:
        p = self.p
        init = self._train_stage(self._entry(e.init)).hash if e.init else None
        # The data too: the sweep's hold-out decides which pseudo-harmful prompts train.
        return Stage(self.root / "methods" / e.name, "train", [
            to_dict(e.cfg), p.synth_stage.hash, p.extract_stage.hash, init,
            self.data_hash[e.name]])

    def _entry(self, name: str) -> Entry:
        return next(e for e in self.cc.entries if e.name == name)

    def _adapter(self, name: str) -> Path:
        return self.root / "methods" / name / "train" / "adapter"

    def _prepare(self, e: Entry) -> dict:
        """Fill in the entry's run folder, directions and data keys; returns its training data."""
        cfg = e.cfg
        cfg.output_dir = str(self.root / "methods" / e.name / "train")
        if "directions" in type(cfg).model_fields:
            cfg.directions = str(self.p.dirs_path)
        data = self.p.training_data(cfg)
        if self.split is not None:  # the validation hold-out never reaches training
            data["pseudo"] = self.split.pseudo_train
        return data

    def ensure_adapter(self, e: Entry) -> None:
        """Train `e` unless its adapter is here for the same inputs (an `init` entry first makes
        sure of its predecessor's)."""
        p, cfg = self.p, e.cfg
        st = self._train_stage(e)
        if st.done() and self._adapter(e.name).is_dir():
            return
        if e.init:
            self.ensure_adapter(self._entry(e.init))
        self.log(f"training {e.name} ({cfg.method}, {cfg.steps} steps)")
        # HARC + DPO: the earlier adapter merged into a copy of the base, as in the release.
        model = (load_adapter(copy.deepcopy(p.model), self._adapter(e.init)).merge_and_unload()
                 if e.init else p.model)
        use_cache = unwrap(p.model).config.use_cache
        t0 = time.time()
        trainer = Trainer(cfg, model, p.tok, self.data[e.name], directions=p.dirs, progress=True)
        trainer.train()
        rows = [r for r in read_jsonl(trainer.log_path) if "step_s" in r]
        st.finish({"wall_s": time.time() - t0, "steps": trainer.step,
                   "step_s": sum(r["step_s"] for r in rows) / max(len(rows), 1),
                   "method": cfg.method, "init": e.init})
        if not e.init:
            p.model = trainer.model.unload()  # evaluated as saved, like a resumed run
        unwrap(p.model).config.use_cache = use_cache  # training turns it off

    def _load(self, e: Entry):
        model = (stack_adapters(self.p.model, self._adapter(e.init), self._adapter(e.name))
                 if e.init else load_adapter(self.p.model, self._adapter(e.name)))
        model.eval()
        return model

    # ---- evaluation
    def _eval_stage(self, entry: str, key: str | None, label: str | None) -> Stage:
        p = self.p
        layer = next(((n, o) for lab, n, o in self.cc.layers if lab == label), None)
        name = entry if label is None else f"{entry}+{label}"
        return Stage(self.root / "methods" / entry / "eval", name, [
            to_dict(p.ev), p.extract_stage.hash, key, layer, p.val_h, p.val_b,
            sha256_json(p.eval_data)])

    def evaluate(self, entry: str, model, adapter: str | None, key: str | None,
                 layers: list[str]) -> None:
        """The model alone, then under each policy layer (one generation cache for all: a layer
        that only blocks prompts regenerates nothing)."""
        p = self.p
        cache = GenerationCache(self.root / "methods" / entry / "generations.jsonl")
        for label in [None, *layers]:
            st = self._eval_stage(entry, key, label)
            path = st.dir / "run.json"
            if st.done():
                continue
            name = entry if label is None else f"{entry}+{label}"
            self.log(f"evaluating {name}")
            layer, ev = None, p.ev
            if label is not None:
                lname, opts = next((n, o) for lab, n, o in self.cc.layers if lab == label)
                layer = get_filter(lname, **opts).bind(p.policy_context(model))
                # The plane and the latent judge read the model, which a layer does not change.
                ev = ev.model_copy(update={"plane": False, "latent_judge": False})
            res = Evaluator(model, p.eval_chat, ev, name=name, adapter=adapter,
                            input_filter=layer, dirs=p.dirs, plane_layer=p.plane_layer,
                            latent_threshold=p.latent_threshold, cache=cache,
                            progress=p.progress).run(p.eval_data)
            res["environment"] = environment()  # a report may be rendered elsewhere, later
            res["compare"] = {"entry": entry, "layer": label,
                              "parent": entry if label else (None if entry == BASE else BASE)}
            atomic_write_json(path, res)
            st.finish()

    def latency(self) -> dict:
        """Seconds per benign request with each layer and without, on the base model, at the
        evaluation's batch size (generation, flags and steering included; calibration not)."""
        p, n = self.p, self.cc.settings.latency_n
        prompts = p.val_b[:n]
        st = Stage(self.root, "latency", [self.cc.layers, prompts, to_dict(p.ev),
                                          p.extract_stage.hash, environment().get("card")])
        path = st.dir / "latency.json"
        if st.done():
            return json.loads(path.read_text())
        if not prompts or not self.cc.layers:
            return {}
        self.log(f"timing {len(self.cc.layers)} policy layers on {len(prompts)} benign requests")

        def timed(layer=None) -> float:
            ev = Evaluator(p.model, p.eval_chat, p.ev, name="latency", input_filter=layer,
                           dirs=p.dirs, plane_layer=p.plane_layer)
            t0 = time.perf_counter()
            ev.respond(prompts)
            return (time.perf_counter() - t0) / len(prompts)

        timed()  # warm-up: kernels, caches and allocator
        before = timed()
        layers = {label: timed(get_filter(lname, **opts).bind(p.policy_context(p.model)))
                  for label, lname, opts in self.cc.layers}
        # Plain timed before and after the layers: their difference shows the drift of the machine.
        plain = [before, timed()]
        mean = sum(plain) / 2
        out = {"n": len(prompts), "plain_s_per_request": mean, "plain_before_after": plain,
               "layers": {k: {"s_per_request": s, "added_s_per_request": s - mean}
                          for k, s in layers.items()}}
        atomic_write_json(path, out)
        st.finish()
        return out

    # ---- report
    def report(self) -> dict:
        """results.json and the report over every policy whose evaluation is finished."""
        p, cc = self.p, self.cc
        layers = [lab for lab, _, _ in cc.layers]
        plan = [(BASE, None, [None, *layers])]
        training, missing = {}, []
        choice = self.choice()
        for e in cc.entries:
            if e.sweep and (choice is None or e.name != choice["chosen"]):
                continue
            st = self._train_stage(e)
            marker = st.dir / "stage.json"
            if st.done():
                training[e.name] = {k: v for k, v in json.loads(marker.read_text()).items()
                                    if k not in ("inputs", "finished")}
            plan.append((e.name, st.hash, [None, *(layers if e.name in cc.settings.stack_on
                                                   else [])]))
        runs = []
        for entry, key, labels in plan:
            for label in labels:
                st = self._eval_stage(entry, key, label)
                if st.done():
                    runs.append(json.loads((st.dir / "run.json").read_text()))
                else:
                    missing.append(entry if label is None else f"{entry}+{label}")
        lat = self.root / "latency" / "latency.json"
        rc = cc.run
        results = {
            "title": f"Compare on {rc.train.model}",
            "harc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {"train": to_dict(rc.train), "eval": to_dict(rc.eval),
                       "run": to_dict(rc.run), "compare": to_dict(cc.settings),
                       "entries": {e.name: to_dict(e.cfg) for e in cc.entries}},
            # Where the evaluations ran (a --report-only run may be on another machine).
            "environment": next((r["environment"] for r in runs if "environment" in r),
                                environment()),
            "data": {**p.data_info, "validation": {"harmful": len(p.val_h),
                                                   "harmless": len(p.val_b)}},
            "judges": p.judges(runs),
            "runs": runs,
            "compare": {
                "entries": {e.name: {"method": e.cfg.method, "init": e.init,
                                     "training": training.get(e.name)} for e in cc.entries},
                "layers": {lab: {"layer": n, "options": o} for lab, n, o in cc.layers},
                "latency": json.loads(lat.read_text()) if lat.is_file() else {},
                "tradeoff": tradeoff(runs, cc.settings.bootstrap, seed=rc.run.seed),
                "sweep": choice,
                "missing": missing},
            "timings_s": p.timings,
        }
        atomic_write_json(self.root / "results.json", results)
        return write_compare_report(results, self.root / "report")


def run_compare(cc: CompareConfig, only: list[str] | None = None, log=print,
                progress=None, jobs: int = 1, command: list[str] | None = None) -> dict:
    """Run (or resume) `harc compare`; returns the paths of the report files."""
    return Compare(cc, log, progress).run(only, jobs, command)
