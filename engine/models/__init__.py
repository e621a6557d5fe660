"""Family adapters, one per pipeline family."""

from engine.catalog import ModelEntry
from engine.models.audioldm2 import AudioLDM2Adapter
from engine.models.base import FamilyAdapter
from engine.models.cogvideox import CogVideoXAdapter
from engine.models.generic import GenericAdapter
from engine.models.hunyuan_video15 import HunyuanVideo15Adapter
from engine.models.svd import SVDAdapter
from engine.models.wan import WanAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "cogvideox": CogVideoXAdapter,
    "svd": SVDAdapter,
    "audioldm2": AudioLDM2Adapter,
    "wan": WanAdapter,
    "hunyuanvideo15": HunyuanVideo15Adapter,
}


def adapter_for(entry: ModelEntry) -> FamilyAdapter:
    if entry.family in ADAPTERS:
        return ADAPTERS[entry.family]()
    return GenericAdapter(entry)


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for"]
