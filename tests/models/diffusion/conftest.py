"""The task-model tests' shared fixture (a frozen BERT text stage over the shapes captions) and their helper module
`tiny_ldm` on the import path."""
import sys
from pathlib import Path

import pytest

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption_of
from ldm.modules.encoders.modules import train_wordpiece_tokenizer

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def text_stage(tmp_path_factory):
    """A frozen, randomly initialised BERTEmbedder over a WordPiece tokenizer of the shapes captions."""
    captions = [caption_of(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]
    path = train_wordpiece_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=120)
    return {"target": "ldm.modules.encoders.modules.BERTEmbedder",
            "params": {"n_embed": 16, "n_layer": 1, "vocab_size": 120, "max_seq_len": 16, "tokenizer_path": str(path)}}
