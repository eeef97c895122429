"""Text -> image: a CogView4-style DiT (`diffusion.denoiser`), relay diffusion's blur and block noise
(`diffusion.relay`), EDM preconditioning and samplers (`diffusion.sampling`), GLM text encoding
(`diffusion.text_encoder`) and the pipelines with their checkpoint folders (`diffusion.pipeline`)."""

from diffusion.denoiser import DiT, DiTConfig, dit_config
from diffusion.pipeline import LatentFlowPipeline, RelayConfig, RelayPipeline, load_relay_pipeline

__all__ = ["DiT", "DiTConfig", "dit_config", "RelayConfig", "RelayPipeline", "LatentFlowPipeline",
           "load_relay_pipeline"]
