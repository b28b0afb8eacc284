"""`difftrain data fonts | emoji | shard | inspect`: make and check data sets. Importing it does not import torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difftrain.config_checks import (
    COUNT_OPTION,
    EMOJI_SIZE_OPTION,
    FONT_SIZE_OPTION,
    OFF_OR_COUNT_OPTION,
    PER_CLASS_OPTION,
    SEED_OPTION,
    SIDE_OPTION,
)


def cmd_data_fonts(args: argparse.Namespace) -> int:
    from difftrain.data.font_render import render_fonts

    report = render_fonts(args.out, args.font or None, size=args.size, include_default=not args.no_default_font,
                          max_fonts=args.max_fonts, preview=args.preview or None)
    for face, reason, detail in report.dropped:
        where = face if isinstance(face, str) else f"{face.family} ({face.where})"
        print(f"dropped {where}: {reason}: {detail}", file=sys.stderr)
    print(report.summary())
    print(f"wrote {len(report.kept)} fonts x 26 letters ({args.size}x{args.size}) to {report.path}"
          + (f"; preview {report.preview}" if report.preview else ""))
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from difftrain.data.emoji import render_emoji

    report = render_emoji(args.out, args.size, font=args.font, emoji_test=args.emoji_test, preview=args.preview or None)
    for e, reason in report.dropped:
        print(f"dropped {e.hex} ({e.name}): {reason}", file=sys.stderr)
    print(report.summary())
    print(f"wrote {len(report.kept)} emoji ({args.size}x{args.size} RGB) to {report.path}"
          + (f"; preview {report.preview}" if report.preview else ""))
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from difftrain.data.shards import INDEX_NAME, write_shards

    meta = write_shards(args.folder, args.out, args.shard_size, image_size=args.image_size, channels=args.channels,
                        class_from=args.class_from, seed=args.seed, prefix=args.prefix)
    n = sum(s["count"] for s in meta["shards"])
    print(f"wrote {n} images in {len(meta['shards'])} shards, {len(meta['classes'])} classes, to {args.out} "
          f"(index {Path(args.out) / INDEX_NAME}); {len(meta['skipped'])} unreadable left out")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from difftrain.data.inspect import inspect_source

    report = inspect_source(args.source, name=args.name, preview=args.preview or None, image_size=args.image_size,
                            per_class=args.per_class, limit=args.limit, download=args.download,
                            image_column=args.image_column, label_column=args.label_column)
    print(report.format())
    return 0


def add_data_commands(sub) -> None:
    d = sub.add_parser("data", help="prepare and inspect data sets", description="Prepare and inspect data sets.")
    dsub = d.add_subparsers(dest="data_command", required=True)

    f = dsub.add_parser("fonts", help="render the letters-in-fonts data set",
                        description="Render A-Z once per font family found on this machine (or given) as "
                        "black-and-white images, one family per row, into OUT (.npz or .csv); fonts missing letters "
                        "and near-duplicates of another are dropped and counted; a preview grid is written beside OUT.")
    f.add_argument("out", help="output file, .npz or .csv")
    f.add_argument("--font", action="append", metavar="PATH", help="a font file (repeatable); default: the fonts found")
    f.add_argument("--size", type=FONT_SIZE_OPTION, default=32, help="letter image side in pixels (default 32)")
    f.add_argument("--max-fonts", type=OFF_OR_COUNT_OPTION, default=0, help="use at most this many fonts (0: all)")
    f.add_argument("--no-default-font", action="store_true", help="leave out Pillow's built-in font")
    f.add_argument("--preview", default="auto", help="preview grid PNG (default OUT-preview.png; '' for none)")
    f.set_defaults(func=cmd_data_fonts)

    e = dsub.add_parser("emoji", help="render the colour emoji data set (labelled by Unicode group)",
                        description="Render the fully-qualified emoji of emoji-test.txt from a colour emoji font "
                        "on white, labelled by group, into OUT (.npz: images uint8 (N, 3, S, S), labels, class_names, "
                        "codepoints); a preview grid is written beside OUT.")
    e.add_argument("out", help="output file, .npz")
    e.add_argument("--size", type=EMOJI_SIZE_OPTION, default=32, help="image side: 32, 64 or 128 (default 32)")
    e.add_argument("--font", default=None, help="colour emoji font (default: Noto Color Emoji of fonts-noto-color-emoji)")
    e.add_argument("--emoji-test", default=None, help="emoji list (default: emoji-test.txt of unicode-data)")
    e.add_argument("--preview", default="auto", help="preview grid PNG (default OUT-preview.png; '' for none)")
    e.set_defaults(func=cmd_data_emoji)

    s = dsub.add_parser("shard", help="write an image folder as WebDataset tar shards",
                        description="Write the images under FOLDER, shuffled, as tar shards (KEY.png + KEY.cls) "
                        "plus shards.json into OUT.")
    s.add_argument("folder")
    s.add_argument("out")
    s.add_argument("--shard-size", type=COUNT_OPTION, default=10000, help="images per shard (default 10000)")
    s.add_argument("--image-size", type=SIDE_OPTION, default=None, help="resize and center-crop to this side first")
    s.add_argument("--channels", type=int, choices=[1, 3], default=None)
    s.add_argument("--class-from", default="auto", choices=["auto", "dir", "prefix", "none"])
    s.add_argument("--seed", type=SEED_OPTION, default=0, help="seed of the shuffle before writing")
    s.add_argument("--prefix", default="shard", help="shard file name prefix (default shard-000000.tar)")
    s.set_defaults(func=cmd_data_shard)

    i = dsub.add_parser("inspect", help="counts, classes, sizes, preview grid, unreadable files",
                        description="Report on SOURCE: a data set name (digits, mnist, ...), an image folder, "
                        "a CIFAR folder, a fonts .npz/.csv, shards (folder, shards.json, pattern) or parquet files; "
                        "paths may be URLs (https://, s3://, gs://, hf://).")
    i.add_argument("source")
    i.add_argument("--name", default=None, help="the data set kind when the guess is wrong (e.g. mnist, celebahq)")
    i.add_argument("--preview", default="preview.png", help="preview grid PNG (default preview.png; '' for none)")
    i.add_argument("--image-size", type=SIDE_OPTION, default=None, help="preview image side (default: native, 32 for folders)")
    i.add_argument("--per-class", type=PER_CLASS_OPTION, default=8, help="preview images per class (default 8)")
    i.add_argument("--limit", type=OFF_OR_COUNT_OPTION, default=0, help="shards: read at most this many samples (0: all)")
    i.add_argument("--download", action="store_true", help="fetch mnist / cifar files when missing")
    i.add_argument("--image-column", default="image", help="parquet: the column of encoded images (default image)")
    i.add_argument("--label-column", default=None, help="parquet: the class column (default: none, unlabelled)")
    i.set_defaults(func=cmd_data_inspect)
