"""Jailbreak attacks, one per module, registered by name.

    from harc.attacks import get_attack, list_attacks
    probes = get_attack("dan", variant="dan_11").apply([{"prompt": "...", "category": "..."}])
"""

from harc.attacks.base import Attack, Probe
from harc.attacks.registry import get_attack, list_attacks, register_attack

__all__ = ["Attack", "Probe", "get_attack", "list_attacks", "register_attack"]
