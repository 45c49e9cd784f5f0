"""ldm: Latent Diffusion Models."""
