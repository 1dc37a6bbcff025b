"""SEGA: semantic guidance for Stable Diffusion on diffusers components."""
