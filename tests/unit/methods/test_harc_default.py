"""Paper-faithful HARC stays bit-identical: the default config's terms and gradients on fixed
inputs equal the values recorded before the opt-in improvements were added (commit 16b1ec7)."""

import pytest
from train_helpers import make_trainer, perturb_lora

from harc.methods.batching import collate

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

# Recorded on the code before any improvement key existed (torch CPU, float32, one thread).
GOLDEN = {"couple": 0.5479350686073303, "couple_resp": 0.6943172812461853,
          "kl": 0.013682195916771889, "ce": 5.987288475036621}
GOLDEN_GRAD_SQ = 5.73110495047094



def test_default_terms_and_gradients_are_unchanged(tmp_path):
    tr = make_trainer(tmp_path)
    perturb_lora(tr.model)
    tr.model.train()
    assert tr.method.layers == [1, 3] and tr.method.terms == ("couple", "couple_resp", "kl", "ce")
    mb = collate(tr.sampler(0), tr.chat.tail_len, tr.chat.tokenizer.pad_token_id, 8)
    terms, _ = tr.method.micro_step(mb, 0.5)
    assert set(terms) == set(GOLDEN)
    for k, want in GOLDEN.items():
        assert float(terms[k]) == pytest.approx(want, rel=1e-6, abs=1e-9), k
    grad_sq = sum(float(p.grad.double().square().sum())
                  for p in tr.model.parameters() if p.grad is not None)
    assert grad_sq == pytest.approx(GOLDEN_GRAD_SQ, rel=1e-6)
    assert tr.method.weights() == {"couple": 1.0, "couple_resp": 1.0, "kl": 10.0, "ce": 1.0}
