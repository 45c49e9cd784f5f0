"""The MiDaS networks: DPT (ViT) and MidasNet (CNN) depth models, their building blocks and input transforms."""
