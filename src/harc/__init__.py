"""harc: Harmfulness-And-Refusal Coupling, made usable (extract, diagnose, train, evaluate, report)."""

__version__ = "0.1.0"

from harc.chat import ChatFormat  # noqa: E402
from harc.directions import Directions, extract_directions  # noqa: E402
from harc.errors import HarcError  # noqa: E402
from harc.layers import layer_scores, select_layers  # noqa: E402
from harc.models import load_adapter, load_model  # noqa: E402

__all__ = [
    "ChatFormat",
    "Directions",
    "HarcError",
    "extract_directions",
    "layer_scores",
    "load_adapter",
    "load_model",
    "select_layers",
]
