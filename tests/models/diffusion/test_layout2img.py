"""Layout-to-image: BoundingBoxLayout reads and draws `coordinates_bbox` token sequences (written here with the
documented formula), and Layout2ImgDiffusion trains on them through a trainable BERTEmbedder over the tokens and
logs the layouts it was given."""
from types import SimpleNamespace

import pytest
import torch

from ldm.data.shapes import ShapesTrain
from ldm.models.diffusion.ddpm import Layout2ImgDiffusion
from ldm.modules.encoders.layout import BoundingBoxLayout, LayoutObject
from ldm.util import ConfigError, instantiate_from_config
from tiny_ldm import batch_of, model_config, train
from tiny_ldm import unet as tiny_unet

N_TOKENS, N_CLASSES, N_OBJECTS = 100, 5, 3  # a 10 x 10 grid; 3 objects + crop = 11 tokens
GRID = 10
LAYOUT = {"target": "ldm.modules.encoders.layout.BoundingBoxLayout",
          "params": {"no_object_classes": N_CLASSES, "no_max_objects": N_OBJECTS, "no_tokens": N_TOKENS,
                     "category_names": ["circle", "square", "triangle", "star", "moon"]}}


def token(x, y):
    return round(y * (GRID - 1)) * GRID + round(x * (GRID - 1))


def encode(objects, crop=(0.0, 0.0, 1.0, 1.0)):
    """Token sequence of [(category_no, flags, (x0, y0, w, h)), ...]: triples, 'none' padding, the crop corners."""
    tokens = []
    for category, flags, (x0, y0, w, h) in objects:
        tokens += [category + N_CLASSES * flags, token(x0, y0), token(x0 + w, y0 + h)]
    tokens += [N_TOKENS - 1] * (3 * (N_OBJECTS - len(objects)))
    return torch.tensor(tokens + [token(crop[0], crop[1]), token(crop[0] + crop[2], crop[1] + crop[3])])


def test_layout_reads_back_objects_flags_and_crop():
    layout = instantiate_from_config(LAYOUT)
    assert layout.embedding_dim == 11 and layout.none == 99
    tokens = encode([(2, 0, (1 / 9, 2 / 9, 4 / 9, 3 / 9)), (4, 1 | 4, (0.0, 0.0, 1.0, 5 / 9))],
                    crop=(1 / 9, 0.0, 7 / 9, 1.0))
    objects, crop = layout.inverse_build(tokens)
    assert [obj for obj, _ in objects] == [LayoutObject(2), LayoutObject(4, is_group_of=True, is_depiction=True)]
    torch.testing.assert_close(torch.tensor([box for _, box in objects]),
                               torch.tensor([(1 / 9, 2 / 9, 4 / 9, 3 / 9), (0.0, 0.0, 1.0, 5 / 9)]))
    torch.testing.assert_close(torch.tensor(crop), torch.tensor((1 / 9, 0.0, 7 / 9, 1.0)))
    assert objects[1][0].flags_string() == "(g,d)" and layout.label(4) == "moon" and layout.label(7) == "#7"
    # the published layout2img sequences: 30 objects x 3 + crop = the BERTEmbedder's max_seq_len 92 on 90 x 90
    assert BoundingBoxLayout(300, 30, 8192).embedding_dim == 92 and BoundingBoxLayout(300).no_sections == 90
    with pytest.raises(ValueError, match="sequence of 10 tokens; this builder reads 11"):
        layout.inverse_build(tokens[:10])
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\)"):
        layout.inverse_build(torch.cat([tokens[:-1], torch.tensor([100])]))


def test_layout_plot_draws_each_box_in_its_colour():
    layout = instantiate_from_config(LAYOUT)
    tokens = encode([(0, 0, (0.0, 0.0, 1.0, 1.0)), (1, 0, (1 / 9, 1 / 9, 3 / 9, 3 / 9))], crop=(0.0, 0.0, 1.0, 1.0))
    image = layout.plot(tokens, figure_size=(90, 90), line_width=2)
    assert image.shape == (3, 90, 90) and image.min() >= -1 and image.max() <= 1
    rgb = ((image + 1) * 127.5).round().long()
    assert rgb[:, 45, 89].tolist() == [63, 63, 63]  # the crop outline (drawn last) on the right edge
    assert rgb[:, 25, 10].tolist() == [255, 126, 13]  # the second box's left edge: the palette's second colour
    assert rgb[:, 60, 60].tolist() == [255, 255, 255]  # background


def layout_data(n=8):
    """Shapes images with a layout each: its shape's class and a box, plus a second random box."""
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i, example in enumerate(ShapesTrain(size=32, length=n)):
        x0, y0 = torch.rand(2, generator=gen).tolist()
        objects = [(i % N_CLASSES, 0, (x0 / 2, y0 / 2, 0.5, 0.5)), ((i + 1) % N_CLASSES, 1, (0.0, 0.0, 1.0, 1.0))]
        examples.append({**example, "coordinates_bbox": encode(objects)})
    return examples


def layout_config(**extra):
    bert = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
            "params": {"n_embed": 16, "n_layer": 1, "vocab_size": N_TOKENS, "max_seq_len": 11, "use_tokenizer": False}}
    extra.setdefault("cond_key", "coordinates_bbox")
    return model_config("ldm.models.diffusion.ddpm.Layout2ImgDiffusion", tiny_unet(4), bert, "crossattn",
                        cond_stage_trainable=True, **extra)


def test_layout2img_trains_its_token_encoder_and_logs_the_layouts():
    torch.manual_seed(0)
    model = instantiate_from_config(layout_config(bbox_tokenizer_config=LAYOUT))
    assert isinstance(model, Layout2ImgDiffusion)
    data = layout_data()
    encoder_before = model.cond_stage_model.transformer.token_emb.weight.detach().clone()
    train(model, data, steps=3)
    assert not torch.equal(model.cond_stage_model.transformer.token_emb.weight, encoder_before)  # trained with it
    model.eval()
    batch = batch_of(data, 2)
    _, c = model.get_input(batch, "image", force_c_encode=True)
    assert c.shape == (2, 11, 16)
    other = model.get_learned_conditioning(torch.flip(batch["coordinates_bbox"], [0]))
    assert not torch.allclose(c, other)  # the layout changes the conditioning
    log = model.log_images(batch, N=2, ddim_steps=4, inpaint=False, plot_progressive_rows=False,
                           plot_diffusion_rows=False)
    assert log["bbox_image"].shape == (2, 3, 32, 32) and log["samples"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(log["bbox_image"][1], model.bbox_tokenizer.plot(batch["coordinates_bbox"][1],
                                                                               figure_size=(32, 32)))


def test_layout2img_uses_the_dataset_builder_as_the_original_or_says_what_is_missing():
    torch.manual_seed(0)
    model = instantiate_from_config(layout_config()).eval()
    batch = batch_of(layout_data(2), 2)
    kw = dict(N=2, ddim_steps=4, inpaint=False, plot_progressive_rows=False, plot_diffusion_rows=False, sample=False)
    with pytest.raises(ValueError, match="set model.params.bbox_tokenizer_config"):
        model.log_images(batch, **kw)
    builder = instantiate_from_config(LAYOUT)
    labels = []
    dataset = SimpleNamespace(conditional_builders={"coordinates_bbox": builder}, get_category_id=lambda no: f"/m/{no}",
                              get_textual_label=lambda cid: labels.append(cid) or cid)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(datasets={"validation": dataset}))
    log = model.log_images(batch, **kw)
    assert log["bbox_image"].shape == (2, 3, 32, 32) and "/m/0" in labels  # labels through the dataset
    with pytest.raises(ConfigError, match="reads 'coordinates_bbox'"):
        instantiate_from_config(layout_config(cond_key="caption"))


def test_published_layout_encoder_reads_published_sequences():
    """layout2img-openimages256's cond stage (BERTEmbedder over 8192 tokens, 92 positions, 16 layers of 512; no
    x-transformers option beyond these is used by any published config) embeds a 92-token layout sequence."""
    from ldm.modules.encoders.modules import BERTEmbedder

    with torch.device("meta"):
        encoder = BERTEmbedder(n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92, use_tokenizer=False)
        tokens = torch.zeros(2, BoundingBoxLayout(300, 30, 8192).embedding_dim, dtype=torch.long)
        assert encoder(tokens).shape == (2, 92, 512)
    assert sum(k.endswith("to_q.weight") for k in encoder.state_dict()) == 16
