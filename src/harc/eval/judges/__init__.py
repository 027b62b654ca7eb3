"""Judges of responses (refusal, harmfulness), one per module, registered by name.

    from harc.eval.judges import get_judge
    verdicts = get_judge("refusal_string").judge(prompts, responses)
"""

from harc.eval.judges.base import JUDGES, Judge, Verdict, get_judge, list_judges, register_judge

__all__ = ["JUDGES", "Judge", "Verdict", "get_judge", "list_judges", "register_judge"]
