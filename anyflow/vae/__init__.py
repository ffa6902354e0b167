"""The Wan2.1 video VAE in plain PyTorch: encode videos to the AnyFlow latents and decode them back,
whole or streamed chunk by chunk.

    from anyflow.vae import WanVAE

    vae = WanVAE.from_pretrained("AnyFlow-FAR-Wan2.1-1.3B-Diffusers/vae")
    latents = vae.encode(video)                 # (B, 3, 4k + 1, H, W) -> (B, 16, k + 1, H/8, W/8)
    stream = vae.decoder_stream()
    frames = stream.push(latents[:, :, :1])     # the first frame, then 4 per latent frame pushed

Modules: ``config`` (no torch), ``cache`` (frame-by-frame causal state), ``ops`` (how the
primitives are computed), ``layers``, ``model``, ``stream``, ``tiling``; ``names`` (diffusers' and Wan's
parameter names against ours, no torch) and ``checkpoint`` (the VAE checkpoints users hold, read and
checked). Names are imported on first use.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "WanVAEConfig": "config",
    "WanVAE": "model",
    "VAEDecoderStream": "stream",
    "TemporalCache": "cache",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
