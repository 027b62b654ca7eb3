"""Jailbreak attacks, one per module, registered by name.

    from harc.eval.attacks import get_attack, list_attacks
    probes = get_attack("dan", variant="dan_11").apply([{"prompt": "...", "category": "..."}])
"""

from harc.eval.attacks.base import ATTACKS, Attack, Probe, get_attack, list_attacks, register_attack

__all__ = ["ATTACKS", "Attack", "Probe", "get_attack", "list_attacks", "register_attack"]
