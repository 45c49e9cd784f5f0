"""scripts/benchmark_unet.py runs its grid (here on a tiny SD-like UNet): both models, the fusion ablation column."""
from tests.scripts.conftest import load_script

TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
            context_dim=32, use_checkpoint=False, legacy=False)


def test_grid_with_fusion_ablation(monkeypatch, capsys):
    bench = load_script("benchmark_unet")
    monkeypatch.setattr(bench, "SD_V1_UNET", TINY)
    bench.main(["--device", "cpu", "--sizes", "8", "--batches", "1", "--dtypes", "fp32", "--repeats", "1",
                "--ablate-fusions"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu")]
    assert len(rows) == 1 and rows[0].count("|") == 9  # ours, diffusers, ratio and the fused-q/k/v column
