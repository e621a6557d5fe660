"""Family adapters, one per pipeline family."""

from engine.catalog import ModelEntry
from engine.models.audioldm2 import AudioLDM2Adapter
from engine.models.base import FamilyAdapter
from engine.models.cogvideox import CogVideoXAdapter
from engine.models.generic import GenericAdapter
from engine.models.hunyuan_video15 import HunyuanVideo15Adapter
from engine.models.ltx import LTXAdapter
from engine.models.stable_audio import StableAudioAdapter
from engine.models.svd import SVDAdapter
from engine.models.wan import WanAdapter, WanImageToVideoAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "cogvideox": CogVideoXAdapter,
    "svd": SVDAdapter,
    "audioldm2": AudioLDM2Adapter,
    "wan": WanAdapter,
    "wan-i2v": WanImageToVideoAdapter,
    "stable-audio": StableAudioAdapter,
    "ltx": LTXAdapter,
    "hunyuanvideo15": HunyuanVideo15Adapter,
}


def adapter_for_denoiser(class_name: str | None) -> FamilyAdapter | None:
    """The adapter of the family whose loop calls a denoiser of this class (None: no family's)."""
    for cls in ADAPTERS.values():
        if class_name and cls.denoiser_class == class_name:
            return cls()
    return None


def adapter_for(entry: ModelEntry) -> FamilyAdapter:
    if entry.family in ADAPTERS:
        return ADAPTERS[entry.family]()
    return GenericAdapter(entry)


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for", "adapter_for_denoiser"]
