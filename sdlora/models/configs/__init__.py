"""The diffusers configurations and CLIP vocabulary that load single-file checkpoints offline (see README.md)."""
