"""`harc run`: data -> synth -> extract -> diagnose -> evaluate base -> train -> evaluate the
adapter -> geometry after -> report, one method per stage.

Every stage writes its artifacts into one run folder with a `stage.json` holding the hash of its
inputs (the model's weights fingerprint among them); a stage whose hash matches is skipped, keeping
the duration it took when it ran (training resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from harc._version import __version__
from harc.chat import ChatFormat
from harc.config import to_dict
from harc.data import dedupe_against, load, prepare_sets, sample_across, split
from harc.data.profile import DataProfile
from harc.directions import Directions, extract_directions, response_projections
from harc.errors import HarcError
from harc.eval import Evaluator, GenerationCache, adapter_fingerprint
from harc.eval.attacks import get_attack
from harc.eval.filters import PolicyContext, get_filter
from harc.eval.judges import get_judge
from harc.eval.judges.check import judge_check, load_labelled
from harc.eval.judges.latent import fit_threshold
from harc.eval.results import judge_agreement
from harc.export import export_adapter
from harc.generation import generate
from harc.geometry import geometry, heldout_check, plane_points
from harc.io import atomic_write_json, check_writable
from harc.layers import plane_layer
from harc.lora import load_adapter
from harc.methods import Trainer
from harc.methods.data import load_records
from harc.models import environment, load_model, model_fingerprint
from harc.pipeline.config import RunConfig, plugin_spec
from harc.pipeline.stages import Stage, read_jsonl
from harc.report import write_report
from harc.report.diagnose import write_diagnosis, write_plots
from harc.synth import answered_pairs, synth_triples, write_jsonl


class Pipeline:
    """The stages of `harc run` over one run folder; `run()` runs (or resumes) them all."""

    def __init__(self, rc: RunConfig, log=print, progress=None):
        self.rc, self.cfg, self.ev, self.rs, self.root = rc, rc.train, rc.eval, rc.run, rc.out
        self.log = log
        self.progress = progress or (lambda desc, total: (lambda n=1: None))
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []  # stages found done with the same inputs
        self._stages: list[tuple[Stage, bool]] = []  # (stage, reused) of the current timed step

    def _timed(self, name: str, fn, *args, **kw):
        """Run one step; its timing is the measured one, or, when every stage it holds was
        reused, the time those stages took when they ran."""
        t0, self._stages = time.time(), []
        out = fn(*args, **kw)
        took = time.time() - t0
        if self._stages and all(reused for _, reused in self._stages):
            known = [st.seconds for st, _ in self._stages]
            took = sum(known) if None not in known else self._previous_timings.get(name, took)
        self.timings[name] = took
        return out

    def _reuse(self, st: Stage) -> bool:
        """Whether a stage is done with the same inputs (then it is skipped, and said so)."""
        reused = st.done()
        self._stages.append((st, reused))
        if reused:
            name = st.dir.relative_to(self.root).as_posix()
            self.skipped.append(name)
            self.log(f"{name}: skipped, done by an earlier run with the same inputs")
        return reused

    def run(self) -> dict:
        """Run (or resume) every stage; returns the paths of the report files."""
        self.shared_stages()
        runs = self._timed("eval_base", self.evaluate_all, "base", self.model, None)
        self._timed("train", self.train)
        runs += self._timed("eval_harc", self.evaluate_all, "harc", self.peft_model,
                            str(self.adapter_dir))
        geo_after = self._timed("geometry_after", self.geometry_after)
        return self.report(runs, geo_after)

    def shared_stages(self) -> None:
        """What every use of the run folder starts with (`harc run`, `harc compare`): the data,
        the model, synthesis, the directions, the diagnosis and the evaluation sets."""
        # Where the last run put its timings (stages finished by older versions record none).
        prev = self.root / "results.json"
        try:
            self._previous_timings = json.loads(prev.read_text()).get("timings_s", {}) \
                if prev.is_file() else {}
        except ValueError:
            self._previous_timings = {}
        check_writable(self.root, 200 << 20)
        self._timed("data", self.prepare_data)
        self.load()
        self._timed("synth", self.synthesise)
        self._timed("extract", self.extract)
        self._timed("diagnose", self.diagnose)
        self.eval_data = self._eval_data()

    def load(self) -> None:
        """The model, its training chat format and its evaluation chat format."""
        cfg = self.cfg
        self.log(f"loading {cfg.model}")
        self.model, self.tok = load_model(cfg.model, dtype=cfg.torch_dtype,
                                          attn_implementation=cfg.attn_implementation,
                                          trust_remote_code=self.rc.trust_remote_code)
        self.fingerprint = model_fingerprint(self.model)
        self.chat = self._chat(cfg.max_prompt_tokens)
        # Jailbreak templates are long: evaluation and the plane see them whole, not cut to the
        # training limit.
        self.eval_chat = self._chat(self.ev.max_prompt_tokens)

    def _chat(self, max_prompt_tokens: int) -> ChatFormat:
        c = self.cfg
        return ChatFormat(self.tok, system_prompt=c.system_prompt, raw_template=c.raw_template,
                          max_prompt_tokens=max_prompt_tokens,
                          max_response_tokens=c.max_response_tokens)

    # ---- data: de-duplicated, disjoint splits; the evaluation prompts are fixed first.
    def prepare_data(self) -> None:
        rs = self.rs
        self.profile = DataProfile(harmful=rs.harmful, harmful_eval=rs.harmful_eval,
                                   harmless=rs.harmless, pseudo=rs.pseudo)
        sets = self.sets = prepare_sets(self.profile, seed=rs.seed)
        self.pseudo = split(sets["pseudo"], (0.5, 0.5), seed=rs.seed, names=("train", "eval"))
        self.over_sets = {f"{rs.pseudo} (held out)": [r["prompt"] for r in self.pseudo["eval"]]}
        for name in rs.over_refusal_eval:
            recs, _ = dedupe_against(load(name), self.pseudo["train"])
            self.over_sets[name] = [r["prompt"] for r in recs]
        self.data_info = {"sizes": {k: len(v) for k, v in sets.sets.items()},
                          "pseudo_train": len(self.pseudo["train"]),
                          "pseudo_eval": len(self.pseudo["eval"]),
                          "removed_near_duplicates": sets.removed, "overlaps": sets.overlaps}
        atomic_write_json(self.root / "data.json", self.data_info)
        d = self.cfg.data  # the training sets a config names are read now, before the model
        self.cfg_harm = load_records(d.harmful, d.harmful_n) if d.harmful else None
        self.cfg_safe = load_records(d.harmless, d.harmless_n) if d.harmless else None
        n = self.cfg.data.val_n
        self.val_h = [r["prompt"] for r in sets["harmful_validate"]][:n]
        self.val_b = [r["prompt"] for r in sets["harmless_validate"]][:n]
        for name in ("harmful_extract", "harmless_extract", "harmful_validate",
                     "harmless_validate", "harmful_eval"):
            if not sets[name]:
                raise HarcError(f"the {name.replace('_', ' ')} set is empty after "
                                f"de-duplication ({self.data_info['removed_near_duplicates']} "
                                "near-duplicates removed): give larger or more varied sets in "
                                "the run: section")

    # ---- synth: on-policy (prompt, refusal, completion) triples and benign answers.
    def synthesise(self) -> None:
        sets, rs = self.sets, self.rs
        harmful_pool = sets["harmful_extract"] + sets["harmful_train"]
        n_syn = min(rs.n_synth, len(harmful_pool))
        harm = [r["prompt"] for r in harmful_pool[:n_syn]]
        safe = [r["prompt"] for r in (sets["harmless_extract"] + sets["harmless_train"])[:n_syn]]
        # Pseudo-harmful answers only as many as training draws (none when the config names its
        # own set or draws none): a 24-step run used 24 of the 75 it once generated.
        c = self.cfg
        need = 0 if c.data.pseudo or not c.batch.pseudo else _draws(c, c.batch.pseudo)
        pseudo = [r["prompt"] for r in self.pseudo["train"]][:need]
        st = self.synth_stage = Stage(self.root, "synth", [
            self.cfg.model, self.fingerprint, self.chat.template_hash(), harm, safe, pseudo,
            rs.synth_tokens])
        if not self._reuse(st):
            self.log(f"synthesising {n_syn} triples and benign answers on-policy")
            triples, helpful = synth_triples(
                self.model, self.chat, harm, safe, max_new_tokens=rs.synth_tokens,
                batch_size=rs.batch_size, progress=self.progress("synth", 3 * n_syn))
            answers = generate(self.model, self.chat, pseudo, max_new_tokens=rs.synth_tokens,
                               batch_size=rs.batch_size,
                               progress=self.progress("synth: pseudo-harmful answers",
                                                      len(pseudo))) if pseudo else []
            pseudo_pairs, pseudo_refused = answered_pairs(pseudo, answers)
            write_jsonl(st.dir / "triples.jsonl", triples)
            write_jsonl(st.dir / "helpful.jsonl", helpful)
            write_jsonl(st.dir / "pseudo.jsonl", pseudo_pairs)
            st.finish({"triples": len(triples), "helpful": len(helpful),
                       "pseudo_kept": len(pseudo_pairs), "pseudo_refused": pseudo_refused,
                       "refusal_sources": _count(t["refusal_source"] for t in triples),
                       "completion_sources": _count(t["completion_source"] for t in triples)})
        self.triples = read_jsonl(st.dir / "triples.jsonl")
        self.helpful = read_jsonl(st.dir / "helpful.jsonl")

    # ---- extract: the base directions.
    def extract(self) -> None:
        cfg, rs, sets = self.cfg, self.rs, self.sets
        n_ext = min(rs.n_extract, len(sets["harmful_extract"]), len(sets["harmless_extract"]))
        self.ext_h = [r["prompt"] for r in sets["harmful_extract"][:n_ext]]
        self.ext_b = [r["prompt"] for r in sets["harmless_extract"][:n_ext]]
        # Training sets the config names (e.g. Circuit-Breakers for a paper reproduction) also
        # give the response-side directions, as in the reference; else the on-policy sets.
        d = cfg.data
        resp_h = self.cfg_harm[: d.extract_n] if self.cfg_harm else self.triples
        resp_b = self.cfg_safe[: d.extract_n] if self.cfg_safe else self.helpful
        st = self.extract_stage = Stage(self.root, "extract", [
            self.synth_stage.hash, self.ext_h, self.ext_b, cfg.n_boot, cfg.n_resp_tokens,
            d.harmful, d.harmless, d.extract_n])
        self.dirs_path = st.dir / "directions.safetensors"
        # The held-out prompts beside the directions: what `harc diagnose` checks on and the
        # latent filter of `harc eval --directions` calibrates on (never evaluation prompts).
        atomic_write_json(st.dir / "heldout.json", {"harmful": self.val_h, "harmless": self.val_b})
        self.pairs_args = dict(harmful_completions=[(t["prompt"], t["completion"]) for t in resp_h],
                               refusals=[(t["prompt"], t["refusal"]) for t in resp_h],
                               helpful=[(p["prompt"], p["response"]) for p in resp_b],
                               n_resp_tokens=cfg.n_resp_tokens, batch_size=rs.batch_size)
        if not self._reuse(st):
            self.log("extracting the four directions")
            total = len(self.ext_h) + len(self.ext_b) + 2 * len(resp_h) + len(resp_b)
            dirs = extract_directions(self.model, self.chat, harmful=self.ext_h,
                                      harmless=self.ext_b, n_boot=cfg.n_boot, seed=cfg.seed,
                                      progress=self.progress("extract", total),
                                      provenance={"datasets": asdict(self.profile)},
                                      **self.pairs_args)
            dirs.save(self.dirs_path)
            st.finish({"prompts": {"harmful": rs.harmful, "harmless": rs.harmless, "n": n_ext},
                       "response_pairs": {"harmful": d.harmful or "synthesised",
                                          "harmless": d.harmless or "synthesised"}})
        self.dirs = Directions.load(self.dirs_path, self.model)

    # ---- diagnose: geometry, selection, held-out check, plane; the latent judge's threshold.
    def diagnose(self) -> None:
        cfg, rs = self.cfg, self.rs
        k = cfg.k_final
        self.geo = geometry(self.dirs, k=k, score=cfg.layer_score, low=cfg.band[0],
                            high_offset=cfg.band[1])
        st = Stage(self.root, "diagnose", [self.extract_stage.hash, k, cfg.layer_score, cfg.band,
                                           self.val_h, self.val_b, rs.plane_attacks, rs.plane_n])
        layers = self.geo["selected_layers"]
        if not layers:
            raise HarcError(f"no layer selected: k_final={k} with band {cfg.band} on a model of "
                            f"{self.dirs.n_slots - 1} layers; lower k_final or narrow band")
        self.plane_layer = plane_layer(layers)
        if not self._reuse(st):
            self.log(f"diagnosing: selected layers {layers}")
            held = heldout_check(self.model, self.chat, self.dirs, self.val_h, self.val_b, layers,
                                 rs.batch_size)
            val_h, val_b = self.val_h[: rs.plane_n], self.val_b[: rs.plane_n]
            plane_sets = {"harmless": val_b, "harmful (direct)": val_h}
            for name in rs.plane_attacks:
                plane_sets[name] = [p.prompt for p in get_attack(name).apply(
                    [{"prompt": p} for p in val_h])]
            points = {}
            for name, prompts in plane_sets.items():  # one line each: long templates take time
                self.log(f"diagnose: {len(prompts)} {name} prompts on the plane")
                points.update(plane_points(self.model, self.eval_chat, self.dirs,
                                           {name: prompts}, self.plane_layer, rs.batch_size))
            plane = {"layer": self.plane_layer, "points": points}
            write_plots(self.geo, st.dir, plane)
            write_diagnosis(st.dir, self.geo, held, plane)
            # Only the latent judge reads the threshold: without it, 128 forwards are saved.
            st.finish({"latent_threshold": self._latent_threshold() if self.ev.latent_judge
                       else None})
        self.latent_threshold = st.record.get("latent_threshold")
        if self.ev.latent_judge and self.latent_threshold is None:  # diagnosed without it
            self.latent_threshold = self._latent_threshold()

    def _latent_threshold(self) -> float:
        """The latent judge's threshold: the model's own response-side harmfulness reading,
        fitted on the synthetic harmful openings vs refusals (training data, never evaluation
        data)."""
        cal = self.triples[:64]
        scores = response_projections(
            self.model, self.chat, [(t["prompt"], t["completion"]) for t in cal]
            + [(t["prompt"], t["refusal"]) for t in cal], self.dirs, [self.plane_layer],
            n_tokens=self.cfg.n_resp_tokens, batch_size=self.rs.batch_size)[:, 0, 0].tolist()
        return fit_threshold(scores, [True] * len(cal) + [False] * len(cal))

    # ---- evaluation
    def _eval_data(self) -> dict:
        ev, sets = self.ev, self.sets
        return {
            "harmful": [{"prompt": r["prompt"], "category": r.get("category")}
                        for r in sets["harmful_eval"][: ev.n_harmful]],
            "over_refusal": {n: p[: ev.n_over_refusal] for n, p in self.over_sets.items()},
            "benign": [r["prompt"] for r in sets["harmless_validate"]][: ev.n_benign],
            # Spread over the item kinds (arithmetic, facts, instructions): the file's first items
            # are all arithmetic.
            "capability": (sample_across(load(ev.capability), ev.n_capability, seed=self.rs.seed)
                           if ev.capability else []),
        }

    def evaluate(self, name: str, model, adapter: str | None = None, input_filter=None) -> dict:
        stage = Stage(self.root / "eval", name, [
            to_dict(self.ev), self.extract_stage.hash, adapter_fingerprint(adapter),
            input_filter.record() if input_filter is not None else None,
            [r["prompt"] for r in self.eval_data["harmful"]]])
        result_path = stage.dir / "run.json"
        if self._reuse(stage):
            return json.loads(result_path.read_text())
        self.log(f"evaluating {name}")
        res = Evaluator(model, self.eval_chat, self.ev, name=name, adapter=adapter,
                        input_filter=input_filter, dirs=self.dirs, plane_layer=self.plane_layer,
                        latent_threshold=self.latent_threshold,
                        cache=GenerationCache(stage.dir / "generations.jsonl"),
                        progress=self.progress).run(self.eval_data)
        atomic_write_json(result_path, res)
        stage.finish()
        return res

    def evaluate_all(self, name: str, model, adapter: str | None) -> list[dict]:
        """The model alone, then with each configured policy layer."""
        runs = [self.evaluate(name, model, adapter)]
        for spec in self.rs.filters:
            fname, params = plugin_spec(spec, "run.filters")
            layer = get_filter(fname, **params).bind(self.policy_context(model))
            runs.append(self.evaluate(f"{name}+{fname}", model, adapter, layer))
        return runs

    def policy_context(self, model) -> PolicyContext:
        """What a policy layer guarding `model` calibrates on: the validation prompts and the
        synthetic harmful openings and benign answers (never evaluation data)."""
        n = self.cfg.data.val_n
        return PolicyContext(model, self.eval_chat, self.dirs, self.plane_layer, self.val_h,
                             self.val_b, batch_size=self.rs.batch_size,
                             harmful_openings=[(t["prompt"], t["completion"])
                                               for t in self.triples[:n]],
                             benign_answers=[(t["prompt"], t["response"])
                                             for t in self.helpful[:n]])

    # ---- train (resumes from its own checkpoints).
    def train(self) -> None:
        cfg = self.cfg
        cfg.output_dir = str(self.root / "train")
        cfg.directions = str(self.dirs_path)
        data = self.training_data(cfg)
        self.adapter_dir = self.root / "train" / "adapter"
        st = self.train_stage = Stage(self.root, "train", [to_dict(cfg), self.synth_stage.hash,
                                                           self.extract_stage.hash])
        if not self._reuse(st):
            self.log(f"training {cfg.method} for {cfg.steps} steps")
            trainer = Trainer(cfg, self.model, self.tok, data, directions=self.dirs, progress=True)
            trainer.train()
            self.peft_model = trainer.model
            st.finish({"layers": trainer.method.adapter_meta().get("layers")})
        else:
            self.peft_model = load_adapter(self.model, self.adapter_dir)
        self.peft_model.eval()

    def training_data(self, cfg) -> dict:
        """The training sets of `cfg`, whose data keys are filled in with what is used."""
        # Training data: the config's own sets when it names them, else the on-policy synthetic
        # sets. Never a jailbreak-wrapped prompt.
        synth_dir = self.synth_stage.dir
        data = {"harmful": self.cfg_harm or self.triples,
                "harmless": self.cfg_safe or self.helpful,
                "pseudo": (load_records(cfg.data.pseudo, cfg.data.pseudo_n) if cfg.data.pseudo
                           else read_jsonl(synth_dir / "pseudo.jsonl")),
                "val_harmful": self.val_h, "val_harmless": self.val_b}
        # Record what was trained on (the adapter's config and model card show it).
        cfg.data.harmful = cfg.data.harmful or str(synth_dir / "triples.jsonl")
        cfg.data.harmless = cfg.data.harmless or str(synth_dir / "helpful.jsonl")
        cfg.data.pseudo = cfg.data.pseudo or str(synth_dir / "pseudo.jsonl")
        if not data["pseudo"]:
            data.pop("pseudo")
            cfg.batch.pseudo = 0
        return data

    # ---- geometry after training: directions re-extracted with the adapter on.
    def geometry_after(self) -> dict:
        cfg = self.cfg
        st = Stage(self.root, "geometry_after", [self.train_stage.hash, self.extract_stage.hash])
        path = st.dir / "directions.safetensors"
        if not self._reuse(st):
            self.log("re-extracting the directions with the adapter on")
            pa = self.pairs_args
            total = (len(self.ext_h) + len(self.ext_b) + len(pa["harmful_completions"])
                     + len(pa["refusals"]) + len(pa["helpful"]))
            after = extract_directions(self.peft_model, self.chat, harmful=self.ext_h,
                                       harmless=self.ext_b, n_boot=cfg.n_boot, seed=cfg.seed,
                                       progress=self.progress("geometry after", total), **pa)
            after.save(path)
            st.finish()
        return geometry(Directions.load(path), k=cfg.k_final, score=cfg.layer_score,
                        low=cfg.band[0], high_offset=cfg.band[1])

    # ---- report
    def judges(self, runs: list[dict]) -> dict:
        ev, rs = self.ev, self.rs
        out = {"primary": ev.judge, "latent_threshold": self.latent_threshold,
               "agreement": judge_agreement(runs)}
        if rs.judge_data:
            labelled = [r for spec in rs.judge_data for r in load_labelled(spec, "skip")]
            m = judge_check(get_judge(ev.judge), labelled)
            out["accuracy"] = {ev.judge: {**{k: m[k] for k in ("accuracy", "precision", "recall",
                                                                "kappa", "n")},
                                          "data": ", ".join(rs.judge_data)}}
        return out

    def report(self, runs: list[dict], geo_after: dict) -> dict:
        cfg = self.cfg
        log_file = self.root / "train" / "log.jsonl"
        log_rows = [r for r in read_jsonl(log_file) if "loss" in r] if log_file.exists() else []
        results = {
            "title": f"HARC on {cfg.model}",
            "harc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {"train": to_dict(cfg), "eval": to_dict(self.ev), "run": to_dict(self.rs)},
            "environment": environment(),
            "data": {**self.data_info, "sets": asdict(self.profile)},
            "judges": self.judges(runs),
            "runs": runs,
            "geometry": {"before": _geo_for_report(self.geo), "after": _geo_for_report(geo_after)},
            "training": {"steps": cfg.steps, "log": log_rows},
            "timings_s": self.timings,
            "skipped_stages": self.skipped,
        }
        atomic_write_json(self.root / "results.json", results)
        export_adapter(self.adapter_dir, self.dirs_path, results)
        return write_report(results, self.root / "report")


def run_pipeline(rc: RunConfig, log=print, progress=None) -> dict:
    """Run (or resume) every stage of `harc run`; returns the paths of the report files."""
    return Pipeline(rc, log, progress).run()


def _geo_for_report(geo: dict) -> dict:
    out = {k: geo[k] for k in ("cos_ref_harm", "ci_lo", "ci_hi", "score_variant_d", "score_legacy",
                               "selected_layers")}
    out["cross_cos"] = {str(s): geo["cross_cos"][s] for s in geo["selected_layers"]}
    if geo["band"]:
        out["band"] = [geo["band"][0], geo["band"][-1]]
    return out


def _draws(cfg, per_micro_batch: int) -> int:
    """Rows of one kind a training run draws (`MicroBatchSampler`: whole bucketing windows of
    micro-batches)."""
    width = cfg.bucket_window or cfg.grad_accum
    return -(-cfg.steps * cfg.grad_accum // width) * width * per_micro_batch


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out
