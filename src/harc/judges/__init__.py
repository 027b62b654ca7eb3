"""Judges of responses (refusal, harmfulness), one per module, registered by name.

    from harc.judges import get_judge
    verdicts = get_judge("refusal_string").judge(prompts, responses)
"""

from harc.judges.base import Judge, Verdict
from harc.judges.registry import get_judge, list_judges, register_judge

__all__ = ["Judge", "Verdict", "get_judge", "list_judges", "register_judge"]
