import json
import sys

import pytest
from tiny import tiny_model, tiny_tokenizer

from harc.errors import HarcError
from harc.eval import EvalConfig
from harc.eval.capability import INSTALL_HINT, lm_eval_scores


def _evalcfg(d=None):
    from harc.config import build

    return build(EvalConfig, d or {})


pytestmark = pytest.mark.unit

# A 5-item multiple-choice task scored by log-likelihood, read from a local JSON-lines file (the
# `json` builder of `datasets`), so that nothing is fetched from the hub.
TASK_YAML = """\
task: harc_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_scores_on_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(
        json.dumps({"question": f"How do I bake bread {i}?", "choices": ["knead", "sea", "sky"],
                    "answer": i % 3}) + "\n" for i in range(5)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf"))

    scores = lm_eval_scores(tiny_model("llama"), tiny_tokenizer("chatml"), ["harc_tiny_mc"],
                            batch_size=4, include_path=str(tasks))
    assert set(scores) == {"harc_tiny_mc"}
    row = scores["harc_tiny_mc"]
    assert 0.0 <= row["acc"] <= 1.0 and row["acc"] * 5 == pytest.approx(round(row["acc"] * 5))
    assert row["acc_stderr"] >= 0 and row["n"] == 5
    assert all(isinstance(v, float | int) for v in row.values())  # no labels, JSON-ready

    with pytest.raises(HarcError, match="no task 'no_such_task'"):
        lm_eval_scores(None, None, ["no_such_task"], include_path=str(tasks))


def test_missing_lm_eval_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(HarcError) as err:
        lm_eval_scores(None, None, ["mmlu"])
    assert "\n" not in str(err.value) and INSTALL_HINT in str(err.value)
    # an evaluation config that asks for lm-eval tasks fails when it is read, not at the end
    with pytest.raises(HarcError, match="harc\\[lm-eval\\]"):
        _evalcfg({"lm_eval_tasks": ["mmlu"]})
    assert _evalcfg({}).lm_eval_tasks == []
