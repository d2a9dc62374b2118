"""TEMPORARY placeholder (being replaced by the fused dispatch): forwards to the reference."""
from lorafast.reference import lora_linear  # noqa: F401
