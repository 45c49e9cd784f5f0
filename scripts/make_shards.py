"""Image folder (with captions) -> tar shards in the img2dataset layout, for `ldm.data.laion.WebDataModuleFromConfig`.

    python scripts/make_shards.py --images my_images/ --out shards/ --samples-per-shard 1000
    python scripts/make_shards.py --images my_images/ --captions captions.jsonl --out shards/ --resize 512 --parquet

Writes `shards/00000.tar`, `00001.tar`, ... with `<key>.jpg|png|webp` (the file's bytes; other formats, or all with
--format, re-encoded), `<key>.txt` (the caption) and `<key>.json` (`width`, `height`, `original_width`,
`original_height`, `key`, `file_name`), a `<shard>_stats.json` each and with --parquet a `<shard>.parquet`. Keys are
`<shard:05d><index:04d>` as img2dataset numbers them. Captions: `--captions` names a .jsonl file (`{"file_name": ...,
"text": ...}` per line) or a .csv/.tsv (file name, caption), paths relative to --images; without it `<name>.txt`
beside each image (or `metadata.jsonl` files, see ImageFolderDataset). Unreadable images are skipped and named.
Prints the shard count and the shards' data section to paste into a config.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.data.base import load_rgb, resize_shorter_side  # noqa: E402
from ldm.data.imagefolder import ImageFolderDataset  # noqa: E402
from ldm.data.shard_writer import write_shards  # noqa: E402

KEPT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def get_parser() -> argparse.ArgumentParser:
    """Input folder, captions, output folder and shard size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--images", required=True, help="folder of images (searched recursively)")
    add("--captions", default=None, help="a .jsonl (file_name, text) or .csv/.tsv (file name, caption) file; "
        "default: <name>.txt beside each image")
    add("--out", required=True, help="output folder for 00000.tar, ...")
    add("--samples-per-shard", dest="per_shard", type=int, default=1000, help="samples per shard (max 10000)")
    add("--format", choices=["keep", *FORMATS], default="keep",
        help="keep jpg/png/webp bytes as they are (others become png), or re-encode every image")
    add("--resize", type=int, default=None, help="downscale so the shorter side is at most this many pixels")
    add("--parquet", action="store_true", help="also write <shard>.parquet with the metadata (needs pyarrow)")
    return parser


def read_captions_file(path: str) -> dict[str, str]:
    """{relative file name: caption} from a .jsonl or .csv/.tsv file."""
    if not os.path.isfile(path):
        raise inf.ScriptError(f"--captions: '{path}' does not exist")
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        if path.endswith(".jsonl"):
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        captions[str(record["file_name"])] = str(record.get("text", record.get("caption", "")))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise inf.ScriptError(f"--captions: {path}:{number}: expected a JSON object with "
                                              "'file_name' and 'text'") from None
        elif path.endswith((".csv", ".tsv")):
            for row in csv.reader(handle, delimiter="\t" if path.endswith(".tsv") else ","):
                if len(row) >= 2 and row[0] not in ("file_name", "file", "filename"):
                    captions[row[0]] = row[1]
        else:
            raise inf.ScriptError(f"--captions: '{path}' must be a .jsonl, .csv or .tsv file")
    return {os.path.normpath(name): text.strip() for name, text in captions.items()}


def encode_image(path: Path, fmt: str, resize: int | None) -> tuple[str, bytes, tuple[int, int], tuple[int, int]]:
    """(extension, bytes, stored size, original size) of one image."""
    ext = KEPT.get(path.suffix.lower())
    with Image.open(path) as probe:
        original = probe.size
    if ext is not None and fmt in ("keep", ext) and (resize is None or min(original) <= resize):
        return ext, path.read_bytes(), original, original
    image = load_rgb(path)
    if resize is not None and min(image.size) > resize:
        image = resize_shorter_side(image, resize)
    ext = ext if fmt == "keep" and ext is not None else ("png" if fmt == "keep" else fmt)
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[ext], **({"quality": 95} if ext in ("jpg", "webp") else {}))
    return ext, buffer.getvalue(), image.size, original


def samples(folder: ImageFolderDataset, captions: dict[str, str] | None, args: argparse.Namespace
            ) -> Iterator[dict]:
    """One shard sample per image, keyed as img2dataset does."""
    for index, (path, caption) in enumerate(zip(folder.files, folder.captions)):
        relative = os.path.normpath(str(path.relative_to(folder.root)))
        if captions is not None:
            caption = captions.get(relative, "")
        ext, data, size, original = encode_image(path, args.format, args.resize)
        key = f"{index // args.per_shard:05d}{index % args.per_shard:04d}"
        yield {"__key__": key, ext: data, "txt": caption,
               "json": {"key": key, "file_name": relative, "caption": caption, "width": size[0], "height": size[1],
                        "original_width": original[0], "original_height": original[1]}}


def make_shards(args: argparse.Namespace) -> list[str]:
    """Write the shards; returns their paths."""
    if not 1 <= args.per_shard <= 10000:
        raise inf.ScriptError(f"--samples-per-shard: expected 1 ... 10000, got {args.per_shard}")
    if not os.path.isdir(args.images):
        raise inf.ScriptError(f"--images: '{args.images}' is not a folder")
    captions = read_captions_file(args.captions) if args.captions else None
    try:
        folder = ImageFolderDataset(args.images, caption_source="none" if captions is not None else "auto")
    except FileNotFoundError as err:
        raise inf.ScriptError(f"--images: {err}") from None
    paths = write_shards(samples(folder, captions, args), args.out, args.per_shard, parquet=args.parquet)
    missing = sum(1 for c in folder.captions if not c) if captions is None else \
        sum(1 for f in folder.files if os.path.normpath(str(f.relative_to(folder.root))) not in captions)
    print(f"{len(folder.files)} images -> {len(paths)} shard(s) in {args.out}"
          f"{f' ({missing} without a caption)' if missing else ''}")
    last = len(paths) - 1
    print(f"train: {{shards: \"{os.path.abspath(args.out)}/{{00000..{last:05d}}}.tar\"}}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and write the shards; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), make_shards, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
