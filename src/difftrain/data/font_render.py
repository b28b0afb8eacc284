"""`difftrain data fonts OUT`: render A-Z once per font family found on this machine (or given).

1. Faces: `fc-list` (file and face index), else the usual font folders; each face is named by Pillow's
   `font.getname()` (family, style).
2. One face per family: the regular style (`style_rank`), so a family's bold and italic never sit
   beside it as further "fonts" (or across the train/test split).
3. Each family's face is rendered (`render_letters`) and dropped when a letter is missing: no glyph
   in the font's character map, a letter that renders empty or as the .notdef box, or two letters that
   render the same; when its A-Z are symbols (`cmap_problem`: Dingbats, Symbol); or when it cannot be read.
4. Near-duplicates: a family whose 26 letters differ from an earlier kept family's (in name order) in
   under `DUPLICATE_TOLERANCE` of their ink pixels (Jaccard distance of the black-and-white letters) is
   dropped: metric-compatible clones (Liberation / Arimo, Vera / DejaVu) and optical sizes of one design.
The kept families' letters go to OUT (data/fonts.py layouts) with a preview grid PNG beside it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difftrain.data import DataError
from difftrain.data.fonts import LETTERS, write_fonts_file
from difftrain.data.images import labelled_grid

FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
DEFAULT_FONT = "pillow-default"  # Pillow's built-in scalable font (Aileron), needs Pillow >= 10.1
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")
REGULAR_STYLES = ("regular", "book", "roman", "normal", "plain", "medium", "text", "upright")
NOT_REGULAR = {"bold", "italic", "oblique", "light", "thin", "black", "heavy", "semibold", "demibold", "extrabold",
               "ultrabold", "extralight", "ultralight", "condensed", "narrow", "expanded", "extended", "slanted"}
NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no font maps: Pillow draws the font's .notdef glyph
DUPLICATE_TOLERANCE = 0.10  # Jaccard distance of the ink below which two families count as one design (README: measured)
DROP_REASONS = ("unreadable", "missing letters", "symbol font", "near-duplicate")


@dataclass(frozen=True)
class Face:
    """One face of a font file (index: its number in a .ttc collection) with Pillow's family and style names."""

    spec: str
    index: int
    family: str
    style: str

    @property
    def where(self) -> str:
        return self.spec if self.index == 0 else f"{self.spec}#{self.index}"


@dataclass
class FontsReport:
    """What `render_fonts` found, kept and dropped."""

    path: Path
    faces: int  # readable faces found
    families: int  # distinct family names among them
    kept: list[Face] = field(default_factory=list)
    dropped: list[tuple[Face | str, str, str]] = field(default_factory=list)  # (face or file, reason, detail)
    preview: Path | None = None

    def counts(self) -> Counter:
        return Counter(reason for _, reason, _ in self.dropped)

    def summary(self) -> str:
        by = self.counts()
        reasons = ", ".join(f"{r} {by[r]}" for r in DROP_REASONS if by[r])
        return (f"{self.faces} font faces in {self.families} families found; kept {len(self.kept)}, "
                f"dropped {sum(by.values())}" + (f" ({reasons})" if reasons else ""))


class FontDropped(Exception):
    """A family left out of the data set; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --- finding faces and families -----------------------------------------------------------------

def find_fonts() -> list[tuple[str, int]]:
    """(file, face index) of the TrueType/OpenType faces on this machine: `fc-list` when present, else the
    usual font folders (every face of a .ttc collection)."""
    found: set[tuple[str, int]] = set()
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", "--format", "%{file}\t%{index}\n"], capture_output=True, text=True,
                                 timeout=60).stdout
            for line in out.splitlines():
                file, _, index = line.strip().partition("\t")
                if file.lower().endswith(FONT_EXTENSIONS):
                    found.add((file, int(index) if index.isdigit() else 0))
        except (OSError, subprocess.SubprocessError):
            pass
    if not found:
        for d in FONT_DIRS:
            root = Path(d).expanduser()
            if root.is_dir():
                found.update((str(p), -1) for p in root.rglob("*") if p.suffix.lower() in FONT_EXTENSIONS)
    return sorted(found)


def load_font(spec: str, px: int, index: int = 0):
    from PIL import ImageFont

    if spec == DEFAULT_FONT:
        return ImageFont.load_default(size=px)
    return ImageFont.truetype(spec, size=px, index=index)


def describe_faces(specs: list[tuple[str, int]]) -> tuple[list[Face], list[tuple[str, str, str]]]:
    """Faces named by Pillow, and (file, "unreadable", why) for those it cannot open. Index -1: every face
    of the file (a .ttc holds several)."""
    faces, unreadable = [], []
    for spec, index in specs:
        indices = range(64) if index < 0 and spec.lower().endswith(".ttc") else [max(index, 0)]
        for i in indices:
            try:
                family, style = load_font(spec, 16, i).getname()
            except (OSError, ValueError) as e:
                if i == indices[0]:
                    unreadable.append((spec, "unreadable", str(e)))
                break
            if family:
                faces.append(Face(spec, i, family.strip(), (style or "Regular").strip()))
    return faces, unreadable


def style_rank(style: str) -> tuple[int, int, str]:
    """Lower is more regular: Regular / Book / Roman ..., then styles without a weight or slant word, then the rest."""
    s = style.lower().replace("-", " ").strip()
    if s in REGULAR_STYLES:
        return (0, REGULAR_STYLES.index(s), s)
    words = set(s.split())
    return (1, len(words), s) if not words & NOT_REGULAR else (2, len(words & NOT_REGULAR), s)


def pick_families(faces: list[Face]) -> list[Face]:
    """One face per family name (case-insensitive): its most regular style (ties: file, index), sorted by family."""
    best: dict[str, Face] = {}
    for face in faces:
        key = face.family.casefold()
        if key not in best or (style_rank(face.style), face.spec, face.index) < (
                style_rank(best[key].style), best[key].spec, best[key].index):
            best[key] = face
    return [best[k] for k in sorted(best)]


# --- rendering and checks -----------------------------------------------------------------------

def cmap_problem(spec: str, index: int = 0) -> FontDropped | None:
    """Why the font's character map disqualifies it, or None: letters A-Z it lacks ("missing letters"), or
    letters mapped to glyphs named as other characters (Dingbats' a10, Symbol's Alpha: "symbol font").
    A file fontTools cannot parse gives None: rendering still checks it."""
    if spec == DEFAULT_FONT:
        return None
    try:
        import logging

        from fontTools.ttLib import TTFont  # installed with matplotlib

        logging.getLogger("fontTools").setLevel(logging.ERROR)  # it logs each oddity of a table it reads
        with TTFont(spec, fontNumber=index, lazy=True) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # fontTools raises many kinds on fonts FreeType still reads
        return None
    absent = [c for c in LETTERS if ord(c) not in cmap]
    if absent:
        return FontDropped("missing letters", f"no glyph for {', '.join(absent)}")
    other = [cmap[ord(c)] for c in LETTERS if not _letter_glyph_name(cmap[ord(c)], c)]
    if len(other) > len(LETTERS) // 2:
        return FontDropped("symbol font", f"A-Z map to glyphs named {', '.join(other[:4])}, ...")
    return None


def _letter_glyph_name(name: str, letter: str) -> bool:
    """Whether a glyph name is the letter's: A, A.alt, A_hack, uni0041, u0041, or a generic glyph00036."""
    base = name.split(".")[0].split("_")[0]
    return base == letter or base.lower() in (f"uni{ord(letter):04x}", f"u{ord(letter):04x}") or \
        base.lower().startswith(("glyph", "gid", "cid"))


def render_letters(font_spec: str, size: int = 32, margin: int = 2, threshold: int = 128, index: int = 0) -> np.ndarray:
    """(26, size, size) uint8: A-Z in one font, black ink (0) on white (255).

    Each glyph is drawn large, cropped to its ink, scaled by one factor per font (so the letters keep
    their relative size), centred and thresholded to black and white. A letter that renders empty or as
    the font's .notdef glyph, or two letters that come out the same, raise FontDropped("missing letters").
    """
    from PIL import Image, ImageDraw

    big = 4 * size
    font = load_font(font_spec, big, index)

    def draw(text: str):
        canvas = Image.new("L", (3 * big, 3 * big), 0)
        ImageDraw.Draw(canvas).text((1.5 * big, 1.5 * big), text, fill=255, font=font, anchor="mm")
        box = canvas.getbbox()
        return canvas.crop(box) if box else None

    notdef = draw(NOTDEF_PROBE)
    glyphs = []
    for letter in LETTERS:
        g = draw(letter)
        if g is None:
            raise FontDropped("missing letters", f"{letter} renders empty")
        if notdef is not None and g.size == notdef.size and g.tobytes() == notdef.tobytes():
            raise FontDropped("missing letters", f"{letter} renders as the .notdef box")
        glyphs.append(g)
    scale = (size - 2 * margin) / max(max(g.size) for g in glyphs)
    out = np.full((26, size, size), 255, np.uint8)
    for i, g in enumerate(glyphs):
        w, h = max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))
        ink = np.asarray(g.resize((w, h), Image.Resampling.LANCZOS)) >= threshold
        top, left = (size - h) // 2, (size - w) // 2
        out[i, top : top + h, left : left + w][ink] = 0
    first: dict[bytes, str] = {}
    for letter, img in zip(LETTERS, out):
        if img.tobytes() in first:
            raise FontDropped("missing letters", f"{letter} renders the same as {first[img.tobytes()]}")
        first[img.tobytes()] = letter
    return out


def render_face(face: Face, size: int) -> np.ndarray:
    """The face's letters, or FontDropped naming why the family is left out."""
    problem = cmap_problem(face.spec, face.index)
    if problem:
        raise problem
    try:
        return render_letters(face.spec, size, index=face.index)
    except (OSError, ValueError, AttributeError, TypeError) as e:  # FreeType and Pillow errors on damaged fonts
        raise FontDropped("unreadable", str(e) or type(e).__name__) from None


def ink_distances(letters: np.ndarray) -> np.ndarray:
    """(F, F) Jaccard distances 1 - |a and b| / |a or b| of the fonts' ink pixels, letters (F, 26, S, S)."""
    ink = (letters < 128).reshape(len(letters), -1).astype(np.float64)  # (F, 26 S S) of 0 / 1
    both = ink @ ink.T  # exact integer counts in float64
    count = ink.sum(1)
    either = count[:, None] + count[None, :] - both
    return 1.0 - both / np.maximum(either, 1.0)


def near_duplicates(letters: np.ndarray, tolerance: float = DUPLICATE_TOLERANCE) -> dict[int, tuple[int, float]]:
    """{dropped index: (index of the earlier kept font it copies, distance)}: in order, a font within
    `tolerance` of a font kept before it is dropped."""
    dist = ink_distances(letters)
    kept: list[int] = []
    dropped: dict[int, tuple[int, float]] = {}
    for i in range(len(letters)):
        if kept:
            j = kept[int(np.argmin(dist[i, kept]))]
            if dist[i, j] < tolerance:
                dropped[i] = (j, float(dist[i, j]))
                continue
        kept.append(i)
    return dropped


def render_fonts(out: str | Path, fonts: list[str] | None = None, *, size: int = 32, include_default: bool = True,
                 max_fonts: int = 0, preview: str | Path | None = "auto", preview_rows: int = 32) -> FontsReport:
    """Render A-Z once per font family into OUT (.npz or .csv) and a preview grid; see the module docstring.

    `fonts`: font files to use instead of the ones found; `max_fonts`: the first that many families
    by name (0: all); preview "auto": OUT's name with "-preview.png", None: no preview."""
    out = Path(out).expanduser()
    if out.suffix not in (".npz", ".csv"):
        raise DataError(f"output '{out}': use a .npz or .csv file name")
    specs = [(f, -1) for f in fonts] if fonts else find_fonts()
    faces, unreadable = describe_faces(specs)
    if include_default:
        faces.append(Face(DEFAULT_FONT, 0, *load_font(DEFAULT_FONT, 16).getname()))
    families = pick_families(faces)
    if max_fonts > 0:
        families = families[:max_fonts]
    report = FontsReport(out, len(faces), len({f.family.casefold() for f in faces}), dropped=list(unreadable))
    rendered: list[tuple[Face, np.ndarray]] = []
    for face in families:
        try:
            rendered.append((face, render_face(face, size)))
        except FontDropped as e:
            report.dropped.append((face, e.reason, e.detail))
    if not rendered:
        raise DataError(f"no usable fonts among {len(families)} families ({len(specs)} files); "
                        "install some (README: Letters in fonts) or give font files with --font PATH")
    letters = np.stack([r for _, r in rendered])  # (F, 26, size, size)
    copies = near_duplicates(letters)
    for i, (j, d) in copies.items():
        report.dropped.append((rendered[i][0], "near-duplicate", f"of {rendered[j][0].family} (ink distance {d:.3f})"))
    keep = [i for i in range(len(rendered)) if i not in copies]
    report.kept = [rendered[i][0] for i in keep]
    letters = letters[keep]
    write_fonts_file(out, letters, [f.family for f in report.kept], files=[f.where for f in report.kept],
                     styles=[f.style for f in report.kept])
    if preview is not None:
        report.preview = out.with_name(out.stem + "-preview.png") if preview == "auto" else Path(preview)
        rows = np.unique(np.linspace(0, len(keep) - 1, min(preview_rows, len(keep))).round().astype(int))
        labelled_grid([letters[r][:, None] for r in rows], [report.kept[r].family for r in rows]).save(report.preview)
    return report
