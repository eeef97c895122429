"""Text -> image: a CogView4-style DiT (`diffusion.denoiser`), relay diffusion's blur and block noise
(`diffusion.relay`), EDM preconditioning and samplers (`diffusion.sampling`), GLM text encoding
(`diffusion.text_encoder`), the relay pipeline with its checkpoint folders (`diffusion.pipeline`) and CogView4's
latent pipeline with diffusers' folder layout (`diffusion.cogview4`)."""

from diffusion.cogview4 import LatentFlowPipeline, load_cogview4
from diffusion.denoiser import DiT, DiTConfig, dit_config
from diffusion.pipeline import RelayConfig, RelayPipeline, load_relay_pipeline

__all__ = ["DiT", "DiTConfig", "dit_config", "RelayConfig", "RelayPipeline", "LatentFlowPipeline",
           "load_relay_pipeline", "load_cogview4"]
